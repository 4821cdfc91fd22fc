"""An Airflow DAG that runs the incremental text pipeline every day through spark-submit.

A copy-and-edit example, not a dependency of sparkloom: it needs Airflow with the
`apache-airflow-providers-apache-spark` package and a Spark connection (`spark_default`) that
points at the cluster. It submits the one sparkloom entry file, `jobs/submit.py`, with the
wheel as `--py-files`, exactly as docs/cluster.md does by hand.

One task is enough: the pipeline itself reads only the files that arrived since the last run,
skips every stage whose inputs did not change (a second run on the same day does nothing),
and exits non-zero on a failure, which Airflow retries. `max_active_runs=1` keeps two runs
from writing the same catalog at once (sparkloom's commits assume one writer per dataset).
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

SPARKLOOM = "/opt/sparkloom"  # a checkout with `make dist` run: dist/sparkloom.zip, jobs/, conf/

with DAG(
    dag_id="sparkloom_text_incremental",
    schedule="0 2 * * *",  # 02:00 every day, after the day's files have landed
    start_date=dt.datetime(2026, 12, 1),
    catchup=False,  # one run covers everything new: no need to replay missed days
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
) as dag:
    SparkSubmitOperator(
        task_id="run_pipeline",
        conn_id="spark_default",
        application=f"{SPARKLOOM}/jobs/submit.py",
        py_files=f"{SPARKLOOM}/dist/sparkloom.zip",
        driver_memory="8g",
        executor_memory="4g",
        executor_cores=1,
        conf={"spark.pyspark.python": "/opt/envs/sparkloom/bin/python"},
        application_args=[
            "run",
            "--conf",
            f"{SPARKLOOM}/conf/incremental.yaml",
            "--conf",
            f"{SPARKLOOM}/conf/spark/cluster.yaml",
            "ingest.path=hdfs:///landing/bbc",
            "pipeline.data_root=hdfs:///sparkloom",
            "mlflow.tracking_uri=http://mlflow:5000",
        ],
    )
