"""spark-submit entry point for the 'ingest' stage.

spark-submit --py-files dist/sparkloom.zip jobs/ingest.py --conf conf/text_classification.yaml [key=value ...]
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
