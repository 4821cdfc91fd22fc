"""spark-submit entry point for the 'distill' stage (a student trained on a teacher's soft targets).

spark-submit --py-files dist/sparkloom.zip jobs/distill.py --conf conf/pipelines/text.yaml [distill.student=textcnn ...]
"""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
