"""spark-submit entry point for the 'quantize' stage (an int8 copy of a trained classifier).

spark-submit --py-files dist/sparkloom.zip jobs/quantize.py --conf conf/pipelines/text.yaml [quantize.source=lstm ...]
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
