"""spark-submit entry point for the 'run' pipeline (every stage in order).

spark-submit --py-files dist/sparkloom.zip jobs/run.py --conf conf/text_classification.yaml [key=value ...]
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
