"""spark-submit entry point for the 'features' stage.

spark-submit --py-files dist/sparkloom.zip jobs/features.py --conf conf/text_classification.yaml [key=value ...]
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["features", *sys.argv[1:]]))
