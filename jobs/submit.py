"""The spark-submit entry point: every `sparkloom` command, with the same arguments.

    spark-submit --py-files dist/sparkloom.zip jobs/submit.py run --conf conf/text_classification.yaml
    spark-submit --py-files dist/sparkloom.zip jobs/submit.py lstm --conf conf/text_classification.yaml
    spark-submit --py-files dist/sparkloom.zip jobs/submit.py score --model models:/NAME@champion \
        --input texts.parquet --output scores/

The command is the first argument (a stage, `run`, `preflight`, `score`, `compare` or
`generate`); `python jobs/submit.py --help` lists them.
"""

import sys

from sparkloom.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
