"""Worker-side training runtime: the function TorchDistributor runs.

`train_fn(config) -> dict` takes plain, picklable arguments and imports neither
pyspark nor mlflow, so the same call runs under TorchDistributor, under
`torchrun` and in one plain process (`python -m sparkloom.models.train config.json`).

Order of work, after litgpt/nanoGPT: setup (process group, device, seeds) ->
build (model, DDP, optimizer, schedule) -> resume from the latest checkpoint ->
fit (per micro-batch: seed, forward, backward; per step: clip, step, schedule;
per epoch: evaluate, early stopping, checkpoint) -> restore the best weights ->
test -> every rank agrees it succeeded -> rank 0's result to all.

Determinism: data order depends only on (seed, epoch), and the torch RNG is
re-seeded from (seed, rank, micro-step) before every micro-batch, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would.

Testing hook: SPARKLOOM_FAULT="rank=1,step=3,mode=exit|raise|hang" makes that rank
fail right after that optimizer step (used by the fault-injection tests).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any

import torch
import torch.distributed as dist

from sparkloom.models import storage
from sparkloom.models.hparams import (
    EarlyStoppingConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainingConfig,
)
from sparkloom.models.train.checkpoint import (
    Checkpoints,
    export,
    load_exported,
    rng_state,
    set_rng_state,
)
from sparkloom.models.train.config import CheckpointConfig, DataConfig, RunConfig, cfg_dict
from sparkloom.models.train.distributed import (
    Dist,
    all_sum,
    fault_hook,
    peak_tflops_for,
    setup,
    unwrap,
    wrap,
)
from sparkloom.models.train.evaluate import evaluate, model_inputs
from sparkloom.models.train.loop import TrainState, build_optimizer, build_schedule, fit, improved
from sparkloom.models.train.tasks import MLM_KEYS, CausalLM, Classify, Distill, Pretrain, task_for

__all__ = [
    "MLM_KEYS", "STOPPED", "CheckpointConfig", "Checkpoints", "DataConfig", "Dist",
    "EarlyStoppingConfig", "OptimizerConfig", "RunConfig", "ScheduleConfig", "TrainingConfig",
    "all_sum", "build_optimizer", "build_schedule", "cfg_dict", "evaluate", "export", "fault_hook", "fit",
    "improved", "load_exported", "main", "model_inputs", "peak_tflops_for", "TrainState",
    "Classify", "Pretrain", "CausalLM", "Distill", "task_for",
    "rng_state", "set_rng_state", "setup", "train_fn", "unwrap", "wrap", "write_status",
]  # fmt: skip

# --- the entry point -------------------------------------------------------------------------


def write_status(status_dir: str | None, state: str, text: str = "") -> None:
    """rank-N.started / .done / .error files: the launcher reads them to name a failing rank."""
    if not status_dir:
        return
    rank = int(os.environ.get("RANK", 0))
    storage.write_text(storage.join(status_dir, f"rank-{rank}.{state}"),
                       f"pid {os.getpid()} host {socket.gethostname()}\n{text}")  # fmt: skip


STOPPED = "stopped by SIGTERM from its launcher"  # torchrun/Spark stopping the survivors


def _report_termination(status_dir: str) -> None:
    """A rank that torchrun or Spark stops (SIGTERM) after a peer failed says so in its
    status file, so the launcher names the peer that failed first, not this one."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stopped(signum, frame):
        write_status(status_dir, "error", f"{STOPPED}\n")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)


def train_fn(config: dict[str, Any]) -> dict[str, Any]:
    """Train as configured; every rank returns rank 0's result, only after all succeeded."""
    cfg = RunConfig.from_dict(config)
    if cfg.status_dir:
        os.environ["SPARKLOOM_STATUS_DIR"] = cfg.status_dir
        _report_termination(cfg.status_dir)
    write_status(cfg.status_dir, "started")
    try:
        result = _train(cfg)
    except BaseException:
        write_status(cfg.status_dir, "error", traceback.format_exc()[-4000:])
        raise
    write_status(cfg.status_dir, "done")
    return result


def _train(cfg: RunConfig) -> dict[str, Any]:
    ctx = setup(cfg)
    try:
        result = fit(cfg, ctx)
        fault_hook(ctx.rank, "end", result["global_step"], cfg.fault, cfg.attempt)
        if ctx.world_size > 1:
            # A rank that fails after rank 0 finished must still fail the job: TorchDistributor
            # alone reports success once rank 0 has returned. Every rank votes it is done;
            # a rank that died or raised breaks the collective, and rank 0 raises too.
            done = torch.ones(1, device=ctx.device)
            dist.all_reduce(done, op=dist.ReduceOp.SUM)
            if int(done.item()) != ctx.world_size:
                raise RuntimeError(f"only {int(done.item())} of {ctx.world_size} ranks finished")
            box = [result if ctx.main else None]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
            dist.barrier()  # no rank tears down its end while a peer is still in a collective
        return result
    finally:
        if dist.is_initialized():
            # Free the group (and stop gloo's threads) now, while the interpreter is whole; the
            # DDP wrapper of the finished model is garbage by now but may sit in a cycle.
            gc.collect()
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """`python -m sparkloom.models.train config.json` (or under torchrun): train over Parquet files."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m sparkloom.models.train CONFIG.json")
    with open(args[0]) as f:
        result = train_fn(json.load(f))
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2, default=str)
        )
