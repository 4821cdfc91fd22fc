"""Launch overhead on Spark Connect vs a classic session, side by side in one run.

What is measured
----------------
Each mode runs in a fresh client process on the same machine and cores:

- classic: `SparkSession.builder.master("local[2]")` in the client process (its own JVM).
- connect: a Spark Connect server (pyspark's own jars, `local[2]`, the same settings) in a
  separate JVM, started once by this script, and a thin client `sc://localhost:PORT` that
  has no JVM. The server's start is reported apart: a cluster's server is already running.

In each process: the session's start (the first query included, `spark.range(10).count()`),
then the median of 10 small DataFrame actions (`spark.range(1000).selectExpr("sum(id)")`),
then `--runs` launches of TorchDistributor (2 processes, barrier mode, local_mode=False,
gloo) with a train function that only returns its rank: the fixed cost of a launch, which
every deep stage pays once per try. Seconds are wall-clock medians.

Run: ``python benchmarks/connect_launch.py [--runs 5]``. Results go to
``benchmarks/results/connect_launch.{json,md}`` and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONF = {"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "2",
        "spark.default.parallelism": "2", "spark.driver.memory": "2g"}  # fmt: skip

CLIENT = r"""
import json, statistics, sys, time
from pyspark.sql import SparkSession
mode, url, runs, conf = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
t = time.perf_counter()
b = SparkSession.builder.remote(url) if mode == "connect" else SparkSession.builder.master(url)
if mode == "classic":
    for k, v in conf.items():
        b = b.config(k, v)
spark = b.getOrCreate()
spark.range(10).count()
start = time.perf_counter() - t
actions = []
for _ in range(10):
    t = time.perf_counter()
    spark.range(1000).selectExpr("sum(id)").collect()
    actions.append(time.perf_counter() - t)
from pyspark.ml.torch.distributor import TorchDistributor

def rank():
    import os
    return int(os.environ["RANK"])

launches = []
for _ in range(runs):
    t = time.perf_counter()
    assert TorchDistributor(num_processes=2, local_mode=False, use_gpu=False).run(rank) == 0
    launches.append(time.perf_counter() - t)
print(json.dumps({"session_start_s": start, "action_s": statistics.median(actions),
                  "launch_s": statistics.median(launches), "launches": launches}))
"""


def start_server(port: int) -> tuple[subprocess.Popen, float]:
    from sparkloom.pipelines.spark import connect_server_command

    cmd, env = connect_server_command("local[2]", port, CONF)
    t = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while True:
        if server.poll() is not None:
            raise SystemExit("the Spark Connect server exited at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, time.perf_counter() - t
        time.sleep(0.2)


def client(mode: str, url: str, runs: int) -> dict:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, mode, url, str(runs), json.dumps(CONF)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()

    results = {"classic": client("classic", "local[2]", args.runs)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, server_start = start_server(port)
    try:
        results["connect"] = client("connect", f"sc://localhost:{port}", args.runs)
    finally:
        server.terminate()
        server.wait(timeout=60)
    results["connect"]["server_start_s"] = server_start

    c, k = results["classic"], results["connect"]
    rows = [
        ("session start + first query", c["session_start_s"], k["session_start_s"]),
        ("small DataFrame action (median of 10)", c["action_s"], k["action_s"]),
        (f"TorchDistributor launch, 2 ranks (median of {args.runs})", c["launch_s"], k["launch_s"]),
    ]
    lines = ["| seconds | classic local[2] | Connect sc:// (server local[2]) | Connect / classic |",
             "| --- | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {name} | {a:.3f} | {b:.3f} | {b / a:.2f}x |" for name, a, b in rows]
    lines.append(
        f"\nThe Connect server's own start (its JVM, not the client's): {server_start:.1f} s."
    )
    table = "\n".join(lines)
    meta = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "runs": args.runs,
    }
    import pyspark

    meta["pyspark"] = pyspark.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "connect_launch.json").write_text(json.dumps({**meta, **results}, indent=2) + "\n")
    head = __doc__.split("Run:")[0].strip()
    (out / "connect_launch.md").write_text(
        f"# {head.splitlines()[0]}\n\n{meta['date']}, {meta['machine']}, Python "
        f"{meta['python']}, pyspark {meta['pyspark']}.\n\n{table}\n\n"
        + "\n".join(head.splitlines()[2:])
        + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
