"""Worker-side training runtime: the function TorchDistributor runs.

`train_fn(config) -> dict` takes plain, picklable arguments and imports neither
pyspark nor mlflow, so the same call runs under TorchDistributor, under
`torchrun` and in one plain process (`python -m models.train config.json`).

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
import importlib
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sparkloom.models import storage
from sparkloom.models.augment import AugmentConfig, ImageBatchTransform
from sparkloom.models.data import ColumnTransform, make_dataloader
from sparkloom.models.distill import distillation_loss
from sparkloom.models.masking import MaskingConfig, MLMBatchTransform
from sparkloom.models.registry import build_model, model_config
from sparkloom.models.weights import load_weights

# --- config -----------------------------------------------------------------------------------


@dataclass
class DataConfig:
    train: str
    validation: str | None = None
    test: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 16_384
    # model keyword -> batch column; "<col>_mask" is the loader's padding mask
    inputs: dict[str, str] = field(
        default_factory=lambda: {
            "input_ids": "input_ids",
            "attention_mask": "input_ids_mask",
            "labels": "label",
        }
    )

    # images: {"column", "shape": [C, H, W], "mean", "std", "augment": {...}}; the column holds
    # raw uint8 records that the loader standardizes (and, for training batches, augments)
    image: dict[str, Any] | None = None
    # masked-LM batches: {"mask_token_id", "vocab_size", "special_ids", "first_normal_id",
    # "probability"}; masks are drawn per batch (dynamic masking), seeded, also for evaluation.
    # None with static masking: the masked ids and their labels are columns of the data
    mlm: dict[str, Any] | None = None
    pad_values: dict[str, int | float] = field(default_factory=dict)  # per column; default 0
    id_column: str | None = None  # read along, to name misclassified test examples
    num_errors: int = 0  # misclassified test examples to return (ids, true and predicted)
    extra_columns: list[str] = field(default_factory=list)  # read along, not model inputs

    def columns(self) -> list[str]:
        """Parquet columns to read: the inputs, less the masks the loader derives."""
        cols = set(self.inputs.values()) | ({self.id_column} if self.id_column else set())
        cols |= set(self.extra_columns)
        cols -= (
            {self.mlm.get("label_column", "mlm_labels")} if self.mlm else set()
        )  # made by masking
        return sorted(c for c in cols if not (c.endswith("_mask") and c[: -len("_mask")] in cols))

    def transform(self, train: bool) -> ColumnTransform | MLMBatchTransform | None:
        if self.mlm:
            m = dict(self.mlm)
            masking = MaskingConfig(probability=m.pop("probability", 0.15))
            return MLMBatchTransform(cfg=masking, **m)
        if not self.image:
            return None
        im = self.image
        fn = ImageBatchTransform(tuple(im["shape"]), im["mean"], im["std"],
                                 AugmentConfig(**im.get("augment", {})), train=train)  # fmt: skip
        return ColumnTransform(im.get("column", "image"), fn)

    def loader(self, path: str, train: bool, seed: int) -> torch.utils.data.DataLoader:
        return make_dataloader(
            path, self.batch_size if train else self.eval_batch_size, shuffle=train, seed=seed,
            num_workers=self.num_workers, shuffle_buffer=self.shuffle_buffer,
            columns=self.columns(), transform=self.transform(train), pad_value=self.pad_values,
        )  # fmt: skip


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | rmsprop | sgd
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # of all steps; the larger of the two wins
    min_lr_ratio: float = 0.1


@dataclass
class EarlyStoppingConfig:
    metric: str = "val_accuracy"
    mode: str = "max"
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class CheckpointConfig:
    dir: str | None = None
    every_steps: int = 0  # 0: only at the end of each epoch
    keep: int = 2
    resume: bool = True


@dataclass
class RunConfig:
    model: dict[str, Any]  # {"name": ..., "config": {...}}
    data: DataConfig
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    epochs: int = 5
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU) | fp32 | bf16
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int | None = None
    timeout_s: int = 600  # process-group timeout: a hung rank fails the job after this
    log_every_steps: int = 0  # mean train loss, lr and tokens/s every N steps, in the result
    eval_every_steps: int = 0  # also evaluate on validation every N steps (besides each epoch)
    compile: bool = False  # torch.compile the model (nn.Module.compile: state-dict keys unchanged)
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the GPU's name
    eval_at_start: bool = True  # validation metrics of the untrained model (loss at init)
    status_dir: str | None = None  # per-rank started/done/error files, for the launcher
    fault: str | None = None  # test hook, as SPARKLOOM_FAULT
    attempt: int = 1  # which try of the launcher this is (1 + distributor.max_retries at most)
    # knowledge distillation: {"temperature", "alpha", and either "column": teacher logits in
    # the data, or "teacher": {"name", "dir"}: a model export run on each batch}; the training
    # loss becomes models.distill.distillation_loss (evaluation stays plain CE)
    distill: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        parts = {
            "data": DataConfig,
            "optimizer": OptimizerConfig,
            "schedule": ScheduleConfig,
            "early_stopping": EarlyStoppingConfig,
            "checkpoint": CheckpointConfig,
        }
        for key, klass in parts.items():
            if key in d and isinstance(d[key], dict):
                d[key] = klass(**d[key])
        cfg = cls(**d)
        if cfg.grad_accum < 1 or cfg.epochs < 1:
            raise ValueError("epochs and grad_accum must be >= 1")
        return cfg


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


# --- optimizer and schedule ------------------------------------------------------------------


def build_optimizer(model: nn.Module, oc: OptimizerConfig) -> torch.optim.Optimizer:
    """No weight decay on biases, norms and other 1-d parameters (BERT's rule)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": oc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name = oc.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    if name == "adam":
        return torch.optim.Adam(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=oc.lr, momentum=oc.momentum, eps=oc.eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum)
    raise ValueError(f"unknown optimizer '{oc.name}'; use adamw, adam, rmsprop or sgd")


def build_schedule(opt: torch.optim.Optimizer, sc: ScheduleConfig, total_steps: int):
    warmup = max(sc.warmup_steps, int(sc.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sc.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return sc.min_lr_ratio + (1 - sc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --- checkpoints -----------------------------------------------------------------------------


class Checkpoints:
    """step-N.pt files plus a `latest` pointer, each replaced whole; rank 0 writes.

    `dir` is a local path or any URI `models.storage` serves (hdfs://, s3://, ...), so a
    rank restarted on another host resumes from what rank 0 wrote."""

    def __init__(self, cc: CheckpointConfig, ctx: Dist, fault: str | None = None,
                 attempt: int = 1):  # fmt: skip
        self.dir, self.keep, self.ctx = cc.dir, max(1, cc.keep), ctx
        self.fault, self.attempt = fault, attempt  # the test hook (fault_hook, at=save)
        if self.dir and ctx.main:
            storage.makedirs(self.dir)

    def _steps(self) -> list[str]:
        return [p for p in storage.listdir(self.dir) if p.startswith("step-") and p.endswith(".pt")]

    def save(self, state: dict[str, Any], best: bool) -> str | None:
        if not self.dir or not self.ctx.main:
            return None
        name = f"step-{state['global_step']:09d}.pt"
        path = storage.join(self.dir, name)
        storage.torch_save(state, path)  # a kill mid-write leaves the previous files intact
        if best:
            fault_hook(self.ctx.rank, "save", state["global_step"], self.fault, self.attempt)
            storage.torch_save(state, storage.join(self.dir, "best.pt"))
        storage.write_text(storage.join(self.dir, "latest"), name)
        for old in self._steps()[: -self.keep]:
            storage.remove(storage.join(self.dir, old))
        return path

    def latest(self) -> str | None:
        if not self.dir or not storage.is_dir(self.dir):
            return None
        pointer = storage.join(self.dir, "latest")
        if storage.exists(pointer):
            path = storage.join(self.dir, storage.read_text(pointer).strip())
            if storage.exists(path):
                return path
        steps = self._steps()
        return storage.join(self.dir, steps[-1]) if steps else None

    @staticmethod
    def load(path: str) -> dict[str, Any]:
        return load_weights(path)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    """numpy's global generator as what weights-only loading takes (tensors and numbers)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    saved = state.get("numpy")
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["gauss"]))
    elif saved is not None:  # checkpoints before the position was saved: the key alone
        np.random.set_state(("MT19937", saved.numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- evaluation ------------------------------------------------------------------------------


def model_inputs(
    batch: dict[str, Any], inputs: dict[str, str], device: torch.device
) -> dict[str, Any]:
    out = {}
    for kw, col in inputs.items():
        if col in batch:
            out[kw] = batch[col].to(device, non_blocking=True)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, path: str, cfg: RunConfig, ctx: Dist, num_classes: int, num_errors: int = 0
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix over the whole split, summed across ranks; with
    `num_errors`, also up to that many misclassified examples (id, true, predicted, p).
    A causal LM (no labels) reports the mean loss per predicted token, token accuracy and
    perplexity instead."""
    model.eval()
    loader = cfg.data.loader(path, train=False, seed=cfg.seed)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=ctx.device)
    errors: list[dict[str, Any]] = []
    mlm = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
    lm = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count, rows
    for batch in loader:
        x = model_inputs(batch, cfg.data.inputs, ctx.device)
        with autocast(cfg, ctx):
            out = model(**x)
        if "lm_count" in out:  # next-token prediction: every target position counts
            n_tok = out["lm_count"].double()
            lm += torch.stack([out["lm_loss"].double() * n_tok, out["lm_correct"].double(),
                               n_tok, n_tok.new_tensor(float(out["logits"].shape[0]))])  # fmt: skip
            del out  # (B, T, V) logits: not alive into the next forward
            continue
        labels = x["labels"]
        loss_sum += out["loss"].double() * labels.numel()
        pred = out["logits"].argmax(-1)
        cm += torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
        if "mlm_count" in out:
            n_masked = out["mlm_count"].double()
            mlm += torch.stack([out["mlm_loss"].double() * n_masked,
                                out["mlm_correct"].double(), n_masked])  # fmt: skip
        if len(errors) < num_errors and cfg.data.id_column in batch:
            prob = out["logits"].float().softmax(-1).max(-1).values
            for i in (pred != labels).nonzero().flatten().tolist()[: num_errors - len(errors)]:
                errors.append({"id": batch[cfg.data.id_column][i], "label": int(labels[i]),
                               "pred": int(pred[i]), "prob": float(prob[i])})  # fmt: skip
    loss_sum, cm, mlm = all_sum(loss_sum, ctx), all_sum(cm, ctx), all_sum(mlm, ctx)
    if num_classes == 0:  # a language model
        loss_total, correct, count, rows = (float(v) for v in all_sum(lm, ctx).tolist())
        model.train()
        loss = loss_total / max(1.0, count)
        return {"loss": loss, "accuracy": correct / max(1.0, count), "confusion": [],
                "examples": int(rows), "tokens": int(count), "errors": [],
                "perplexity": math.exp(min(loss, 50))}  # fmt: skip
    if num_errors and ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, errors)
        errors = [e for part in gathered for e in part][:num_errors]
    cm = cm.view(num_classes, num_classes).cpu()
    n = int(cm.sum())
    model.train()
    return {
        "loss": float(loss_sum.item() / max(1, n)),
        "accuracy": float(cm.diag().sum().item() / max(1, n)),
        "confusion": cm.tolist(),
        "examples": n,
        "errors": errors,
        **mlm_metrics(mlm),
    }


MLM_KEYS = ("mlm_loss", "mlm_accuracy", "perplexity")


def mlm_metrics(sums: torch.Tensor) -> dict[str, float]:
    """MLM loss per masked token, accuracy on masked tokens, perplexity = exp(MLM loss)."""
    loss_sum, correct, count = (float(x) for x in sums.tolist())
    if not count:
        return {}
    loss = loss_sum / count
    return {
        "mlm_loss": loss,
        "mlm_accuracy": correct / count,
        "perplexity": math.exp(min(loss, 50)),
    }


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
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
    # bf16 on this CPU is ~10x slower than fp32: autocast only where it pays off
    return torch.autocast(
        ctx.device.type, dtype=torch.bfloat16, enabled=bf16 and ctx.device.type == "cuda"
    )


# --- the loop --------------------------------------------------------------------------------


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


def improved(record: dict[str, float], state: dict[str, Any], es: EarlyStoppingConfig) -> bool:
    """Better on the monitored metric; on a tie (accuracy often plateaus at 1.0), lower val loss."""
    value, best = record.get(es.metric), state["best"]
    if value is None:
        return False
    if best is None:
        return True
    better = value > best + es.min_delta if es.mode == "max" else value < best - es.min_delta
    tie = value == best and record.get("val_loss", math.inf) < (state.get("best_loss") or math.inf)
    return better or tie


def fit(cfg: RunConfig, ctx: Dist) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg.model["name"], cfg.model.get("config", {}), cfg.model.get("init"))
    lm = getattr(model, "task", "classify") == "lm"  # causal LM: no classes, tokens are targets
    num_classes = 0 if lm else getattr(model, "num_labels", None) or model.cfg.num_classes
    num_parameters = sum(p.numel() for p in model.parameters())
    teacher = None  # distillation with the teacher run here, on the student's own batches
    if cfg.distill and cfg.distill.get("teacher"):
        t = cfg.distill["teacher"]
        teacher = load_exported(t["dir"], t["name"]).to(ctx.device).requires_grad_(False)
    ddp = wrap(model, ctx)
    if cfg.compile:
        # in place, on the DDP module: DDP's optimizer splits the graph at gradient buckets, so
        # communication still overlaps backward; the state dict keeps its keys
        ddp.compile()
    peak = peak_flops(cfg, ctx)
    flops_per_token = getattr(model, "flops_per_token", None)  # else 6N (Kaplan et al., 2020)
    train = cfg.data.loader(cfg.data.train, train=True, seed=cfg.seed)
    batches_per_epoch = len(train.dataset)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    opt = build_optimizer(ddp, cfg.optimizer)
    sched = build_schedule(opt, cfg.schedule, steps_per_epoch * cfg.epochs)
    ckpt = Checkpoints(cfg.checkpoint, ctx, cfg.fault, cfg.attempt)

    # sums since the epoch's start and since the last step record: loss, micro-batches,
    # tokens, samples; kept on the device (no sync per micro-batch), saved with checkpoints
    state = {"epoch": 0, "batch": 0, "global_step": 0, "history": [], "best": None,
             "best_loss": None, "best_epoch": None, "bad_epochs": 0, "stopped_early": False,
             "steps": [], "evals": [], "epoch_sums": [0.0] * 4, "window_sums": [0.0] * 4}  # fmt: skip
    resumed_from = None
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest:
        saved = Checkpoints.load(latest)
        unwrap(ddp).load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state.update({k: saved.get(k, v) for k, v in state.items()})
        resumed_from = {"path": latest, "epoch": state["epoch"], "step": state["global_step"]}
        log(ctx, f"resuming from {latest}: epoch {state['epoch'] + 1}, step {state['global_step']}")
    log(ctx, f"{num_parameters:,} parameters, world size {ctx.world_size}, device {ctx.device}, "
             f"{batches_per_epoch} batches/epoch/rank, {cfg.epochs} epochs")  # fmt: skip

    def sums(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=ctx.device)

    epoch_sums, window_sums = sums(state["epoch_sums"]), sums(state["window_sums"])

    def snapshot() -> dict[str, Any]:
        state["epoch_sums"], state["window_sums"] = epoch_sums.tolist(), window_sums.tolist()
        return {"model": unwrap(ddp).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_state(), "config": cfg_dict(cfg),
                "model_config": model_config(unwrap(ddp)), **state}  # fmt: skip

    initial: dict[str, float] = {}
    if cfg.eval_at_start and cfg.data.validation and not latest:
        ev = evaluate(ddp, cfg.data.validation, cfg, ctx, num_classes)
        initial = {"val_loss": ev["loss"], "val_accuracy": ev["accuracy"],
                   **{f"val_{k}": ev[k] for k in MLM_KEYS if k in ev}}  # fmt: skip
        log(ctx, "before training " + " ".join(f"{k} {v:.4f}" for k, v in initial.items()))
    ddp.train()
    samples = 0

    def summary(local: torch.Tensor, seconds: float) -> dict[str, float]:
        """Mean train loss over all ranks' micro-batches, samples/s and, for language models,
        tokens/s and model FLOPs utilisation (FLOPs per token x tokens/s over the peak)."""
        loss, n, tokens, rows = all_sum(local.clone(), ctx).tolist()
        out = {"train_loss": loss / max(1.0, n), "samples_per_s": rows / max(seconds, 1e-9)}
        if lm:
            out["tokens_per_s"] = tokens / max(seconds, 1e-9)
            if peak:
                seq = tokens / max(1.0, rows)  # tokens per row: the context length
                fpt = flops_per_token(seq) if flops_per_token else 6 * num_parameters
                out["mfu"] = fpt * out["tokens_per_s"] / (peak * ctx.world_size)
        return out

    while state["epoch"] < cfg.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        epoch_start = window_start = time.perf_counter()
        train.dataset.set_epoch(epoch)
        for i, batch in enumerate(train):
            if i < state["batch"]:
                continue  # resumed mid-epoch: these batches were trained before the checkpoint
            micro = epoch * batches_per_epoch + i
            torch.manual_seed(hash((cfg.seed, ctx.rank, micro)) & 0x7FFF_FFFF)
            x = model_inputs(batch, cfg.data.inputs, ctx.device)
            last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == batches_per_epoch
            sync = ddp.no_sync() if ctx.world_size > 1 and not last_micro else _null()
            with sync, autocast(cfg, ctx):
                out = ddp(**x)
                if cfg.distill:  # soft targets from the teacher, plus the labels
                    d = cfg.distill
                    if teacher is not None:
                        with torch.no_grad():
                            soft = teacher(**{k: v for k, v in x.items() if k != "labels"})
                        soft = soft["logits"]
                    else:
                        soft = batch[d["column"]].to(ctx.device, non_blocking=True)
                    out["loss"] = distillation_loss(out["logits"], soft, x["labels"],
                                                    d["temperature"], d["alpha"])  # fmt: skip
                (out["loss"] / cfg.grad_accum).backward()
            rows = len(next(iter(x.values())))
            samples += rows
            for acc in (epoch_sums, window_sums):  # device-side adds: no sync here
                acc[0] += out["loss"].detach().double()
                acc[1] += 1
                if "lm_count" in out:
                    acc[2] += out["lm_count"]
                acc[3] += rows
            del out  # the logits are not kept alive into the next forward
            if not last_micro:
                continue
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["batch"] = i + 1
            step = state["global_step"]
            if cfg.log_every_steps and step % cfg.log_every_steps == 0:
                rec = {"step": step, "lr": sched.get_last_lr()[0],
                       **summary(window_sums, time.perf_counter() - window_start)}  # fmt: skip
                state["steps"].append(rec)
                window_sums.zero_()
                window_start = time.perf_counter()
                log(ctx, f"step {step} " + " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                    if k != "step"))  # fmt: skip
            if cfg.eval_every_steps and cfg.data.validation and step % cfg.eval_every_steps == 0:
                ev = evaluate(ddp, cfg.data.validation, cfg, ctx, num_classes)
                rec = {"step": step, "val_loss": ev["loss"], "val_accuracy": ev["accuracy"],
                       **{f"val_{k}": ev[k] for k in MLM_KEYS if k in ev}}  # fmt: skip
                state["evals"].append(rec)
                log(ctx, f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in rec.items()
                                                    if k != "step"))  # fmt: skip
                window_start = time.perf_counter()  # evaluation time is not training time
            every = cfg.checkpoint.every_steps
            if every and state["global_step"] % every == 0 and state["batch"] < batches_per_epoch:
                ckpt.save(snapshot(), best=False)
            fault_hook(ctx.rank, "step", state["global_step"], cfg.fault, cfg.attempt)

        seconds = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "step": state["global_step"],
                  "lr": sched.get_last_lr()[0], "seconds": seconds,
                  **summary(epoch_sums, seconds)}  # fmt: skip
        epoch_sums.zero_()
        if cfg.data.validation:
            val = evaluate(ddp, cfg.data.validation, cfg, ctx, num_classes)
            record |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
            record |= {f"val_{k}": val[k] for k in MLM_KEYS if k in val}
        metric = record.get(cfg.early_stopping.metric)
        is_best = improved(record, state, cfg.early_stopping)
        if is_best:
            state["best"], state["best_epoch"], state["bad_epochs"] = metric, epoch + 1, 0
            state["best_loss"] = record.get("val_loss")
        elif metric is not None:
            state["bad_epochs"] += 1
            state["stopped_early"] = state["bad_epochs"] >= cfg.early_stopping.patience
        state["history"].append(record)
        state["epoch"], state["batch"] = epoch + 1, 0
        ckpt.save(snapshot(), best=is_best or metric is None)
        log(ctx, f"epoch {epoch + 1}/{cfg.epochs} "
            + " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "step"))
            + (" *" if is_best else "") + (" (early stop)" if state["stopped_early"] else ""))  # fmt: skip

    best_path = storage.join(cfg.checkpoint.dir, "best.pt") if cfg.checkpoint.dir else None
    if best_path:
        # rank 0 wrote best.pt and reads it back; the other ranks get the weights from it, so
        # none reads the file while rank 0 still replaces it (they would evaluate the previous
        # best on their shard) or where it does not exist (a directory local to each host)
        if ctx.main and storage.exists(best_path):
            unwrap(ddp).load_state_dict(Checkpoints.load(best_path)["model"])
        broadcast_weights(unwrap(ddp), ctx)
    result: dict[str, Any] = {
        "history": state["history"],
        "steps": state["steps"],  # every log_every_steps: train loss, lr, throughput
        "evals": state["evals"],  # every eval_every_steps: validation metrics
        "best_epoch": state["best_epoch"],
        "stopped_early": state["stopped_early"],
        "global_step": state["global_step"],
        "best_checkpoint": best_path,
        "resumed_from": resumed_from,
        "initial": initial,
        "num_parameters": num_parameters,
        "world_size": ctx.world_size,
        "train_seconds": time.perf_counter() - started,
        "train_samples": samples,
        "model": {"name": cfg.model["name"], "config": model_config(unwrap(ddp))},
        "confusion": {},
        "metrics": {},
    }
    for split, path in (("validation", cfg.data.validation), ("test", cfg.data.test)):
        if path:
            ev = evaluate(ddp, path, cfg, ctx, num_classes,
                          num_errors=cfg.data.num_errors if split == "test" else 0)  # fmt: skip
            if split == "test":
                result["errors"] = ev["errors"]
            prefix = "val" if split == "validation" else split
            result["metrics"] |= {
                f"{prefix}_loss": ev["loss"],
                f"{prefix}_accuracy": ev["accuracy"],
                **{f"{prefix}_{k}": ev[k] for k in MLM_KEYS if k in ev},
            }
            if ev["confusion"]:
                result["confusion"][split] = ev["confusion"]
    if cfg.checkpoint.dir and ctx.main:
        export(unwrap(ddp), cfg.checkpoint.dir)
        result["export_dir"] = storage.join(cfg.checkpoint.dir, "export")
    return result


def export(model: nn.Module, directory: str) -> None:
    """Weights as a plain state dict plus the config that builds the model: no pickled code."""
    out = storage.join(directory, "export")
    storage.torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                       storage.join(out, "state_dict.pt"))  # fmt: skip
    storage.write_text(storage.join(out, "model.json"),
                       json.dumps({"config": model_config(model)}, indent=2))  # fmt: skip


def load_exported(
    directory: str, name: str, prefix: str = "", allow_pickle: bool = False
) -> nn.Module:
    """The model `export` wrote: `prefix`model.json and `prefix`state_dict.pt in `directory`
    (weights only: a file that would unpickle code is refused unless `allow_pickle`)."""
    config = json.loads(storage.read_text(storage.join(directory, f"{prefix}model.json")))["config"]
    model = build_model(name, config)
    weights = storage.join(directory, f"{prefix}state_dict.pt")
    model.load_state_dict(load_weights(weights, allow_pickle))
    return model.eval()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cfg_dict(cfg: RunConfig) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(cfg), default=str)


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
    """`python -m models.train config.json` (or under torchrun): train over Parquet files."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m models.train CONFIG.json")
    with open(args[0]) as f:
        result = train_fn(json.load(f))
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2, default=str)
        )


if __name__ == "__main__":
    main()
