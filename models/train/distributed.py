"""The process group, the device and the collectives: the one place that reads
RANK/WORLD_SIZE; also autocast and the device's peak FLOPs for MFU."""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from sparkloom.models import storage
from sparkloom.models.train.config import RunConfig

# --- distributed setup: the one place that reads RANK/WORLD_SIZE ------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: RunConfig) -> Dist:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible to this process")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if world_size > 1 and not dist.is_initialized():
        # DDP imports torch._dynamo on first use. Imported after the process group exists, that
        # import keeps references to the group (10 in torch 2.13) that destroy_process_group
        # cannot drop, so gloo's threads live on into interpreter exit and, now and then,
        # abort it (SIGABRT: "terminate called without an active exception") after a run
        # that succeeded. Imported first, it never sees the group.
        importlib.import_module("torch._dynamo")
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.timeout_s)
        )
    return Dist(rank, world_size, local_rank, device)


def wrap(model: nn.Module, ctx: Dist) -> nn.Module:
    model = model.to(ctx.device)
    if ctx.world_size > 1:
        device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_sum(t: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum over ranks, in place; the tensor must be on ctx.device (NCCL takes CUDA only)."""
    if ctx.world_size > 1:
        if t.device != ctx.device:
            raise ValueError(f"all_sum of a tensor on {t.device}; put it on {ctx.device}")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_weights(model: nn.Module, ctx: Dist) -> None:
    """Every rank takes rank 0's parameters and buffers, in place."""
    if ctx.world_size > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)


def log(ctx: Dist, msg: str) -> None:
    if ctx.main:
        print(f"[train] {msg}", flush=True)


# Dense bf16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets; matched in
# order against torch.cuda.get_device_name(). Set RunConfig.peak_tflops for anything else.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0),
)  # fmt: skip


def peak_flops(cfg: RunConfig, ctx: Dist) -> float | None:
    """Peak FLOP/s of one device, for MFU: from the config, or the GPU's name; None on CPU."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if ctx.device.type != "cuda":
        return None
    tflops = peak_tflops_for(torch.cuda.get_device_name(ctx.device))
    return tflops * 1e12 if tflops else None


def peak_tflops_for(device_name: str) -> float | None:
    """The first PEAK_BF16_TFLOPS entry named in `device_name` (e.g. "NVIDIA H100 80GB HBM3")."""
    return next((t for key, t in PEAK_BF16_TFLOPS if key in device_name), None)


def autocast(cfg: RunConfig, ctx: Dist):
    bf16 = cfg.training.precision == "bf16" or (
        cfg.training.precision == "auto" and ctx.device.type == "cuda"
    )
    # bf16 on this CPU is ~10x slower than fp32: autocast only where it pays off
    return torch.autocast(
        ctx.device.type, dtype=torch.bfloat16, enabled=bf16 and ctx.device.type == "cuda"
    )


def fault_hook(rank: int, where: str, step: int, spec: str | None, attempt: int = 1) -> None:
    """Test hook: inject a real fault into one rank. `spec` (or SPARKLOOM_FAULT) is
    "rank=R,step=S|at=end|at=save,mode=exit|raise|hang|slow[,attempt=N]": after global step
    S, or `at=end` (after training, 2 s late, so rank 0 is already waiting to return), or
    `at=save` (rank 0 about to write best.pt), rank R calls os._exit(13), raises, sleeps
    forever, or (slow) sleeps 3 s and goes on; only on attempt N of the launcher (default 1),
    so a retry runs clean."""
    spec = spec or os.environ.get("SPARKLOOM_FAULT")
    if not spec:
        return
    f = dict(kv.split("=", 1) for kv in spec.split(","))
    if int(f.get("rank", -1)) != rank or int(f.get("attempt", 1)) != attempt:
        return
    if f.get("at", "step") != where or (where == "step" and int(f.get("step", -1)) != step):
        return
    mode = f.get("mode", "exit")
    if where == "end":
        time.sleep(2.0)
    status_dir = os.environ.get("SPARKLOOM_STATUS_DIR")
    if status_dir:  # when the fault fired, for the tests' fault-to-error times
        storage.write_text(storage.join(status_dir, f"fault-{rank}.time"), repr(time.time()))
    print(f"[train] injected fault on rank {rank} at {where} {step}: {mode}", file=sys.stderr,
          flush=True)  # fmt: skip
    if mode == "slow":
        time.sleep(3.0)
        return
    if mode == "exit":
        os._exit(13)
    if mode == "hang":
        time.sleep(10**6)
    raise RuntimeError(f"injected fault on rank {rank} at {where} {step}")
