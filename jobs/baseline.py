"""spark-submit entry point for the 'baseline' stage.

spark-submit --py-files dist/sparkloom.zip jobs/baseline.py --conf conf/text_classification.yaml [key=value ...]
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["baseline", *sys.argv[1:]]))
