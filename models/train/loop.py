"""The loop: build, resume, train (micro-batch, step, epoch), evaluate, restore the best
weights, test."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from sparkloom.models import storage
from sparkloom.models.hparams import EarlyStoppingConfig, OptimizerConfig, ScheduleConfig
from sparkloom.models.registry import build_model, model_config
from sparkloom.models.train.checkpoint import (
    Checkpoints,
    export,
    load_exported,
    rng_state,
    set_rng_state,
)
from sparkloom.models.train.config import RunConfig, cfg_dict
from sparkloom.models.train.distributed import (
    Dist,
    all_sum,
    autocast,
    broadcast_weights,
    fault_hook,
    log,
    peak_flops,
    unwrap,
    wrap,
)
from sparkloom.models.train.evaluate import evaluate, model_inputs, scores
from sparkloom.models.train.tasks import task_for

# --- optimizer and schedule ------------------------------------------------------------------


def build_optimizer(
    model: nn.Module, oc: OptimizerConfig, layer_lr_decay: float = 1.0
) -> torch.optim.Optimizer:
    """No weight decay on biases, norms and other 1-d parameters (BERT's rule). With
    `layer_lr_decay` < 1, a model that numbers its layers (`layer_of`, `num_layers`: the
    transformer classifiers) trains layer d at lr x decay^(num_layers + 1 - d): the head at
    lr, each layer below at `decay` times the rate of the one above, the embeddings lowest."""
    inner = unwrap(model)
    layered = layer_lr_decay < 1
    if layered and not hasattr(inner, "layer_of"):
        raise ValueError(
            f"training.layer_lr_decay={layer_lr_decay} needs a model with numbered layers (a "
            f"transformer); {type(inner).__name__} has none: set it to 1"
        )
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            depth = inner.layer_of(name) if layered else 0
            groups.setdefault((depth, p.dim() >= 2), []).append(p)
    top = inner.num_layers + 1 if layered else 0
    params = [
        {"params": ps, "weight_decay": oc.weight_decay if decayed else 0.0,
         "lr": oc.lr * layer_lr_decay ** (top - depth)}
        for (depth, decayed), ps in sorted(groups.items())
    ]  # fmt: skip
    name = oc.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    if name == "adam":
        return torch.optim.Adam(params, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=oc.lr, momentum=oc.momentum, eps=oc.eps)
    if name == "sgd":
        return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum)
    raise ValueError(f"unknown optimizer '{oc.name}'; use adamw, adam, rmsprop or sgd")


def freeze_layers(model: nn.Module, n: int) -> int:
    """Stop training the embeddings and the first `n` layers of a model that numbers them;
    returns the parameters frozen (before DDP wraps it, which then leaves them alone)."""
    if n == 0:
        return 0
    if not hasattr(model, "layer_of"):
        raise ValueError(
            f"training.freeze_layers={n} needs a model with numbered layers (a transformer); "
            f"{type(model).__name__} has none: set it to 0"
        )
    if n > model.num_layers:
        raise ValueError(
            f"training.freeze_layers={n} but the model has {model.num_layers} layers; lower it"
        )
    frozen = 0
    for name, p in model.named_parameters():
        if model.layer_of(name) <= n:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


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


# --- the loop --------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where training is. Saved in every checkpoint (its fields are the checkpoint's keys
    beside the model, optimizer, scheduler and RNG) and restored on resume."""

    epoch: int = 0  # epochs finished
    batch: int = 0  # micro-batches of the current epoch already trained
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # a record per epoch
    best: float | None = None  # the early-stopping metric's best value
    best_loss: float | None = None  # val loss at it: breaks ties
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    steps: list[dict[str, float]] = field(default_factory=list)  # every log_every_steps
    evals: list[dict[str, float]] = field(default_factory=list)  # every eval_every_steps
    # since the epoch's start and since the last step record: loss, micro-batches, tokens,
    # samples (on the device while training: no sync per micro-batch)
    epoch_sums: list[float] = field(default_factory=lambda: [0.0] * 4)
    window_sums: list[float] = field(default_factory=lambda: [0.0] * 4)


def improved(record: dict[str, float], state: TrainState, es: EarlyStoppingConfig) -> bool:
    """Better on the monitored metric; on a tie (accuracy often plateaus at 1.0), lower val loss."""
    value, best = record.get(es.metric), state.best
    if value is None:
        return False
    if best is None:
        return True
    better = value > best + es.min_delta if es.maximize else value < best - es.min_delta
    tie = value == best and record.get("val_loss", math.inf) < (state.best_loss or math.inf)
    return better or tie


@dataclass
class Run:
    """What the loop trains with, built once: the model (and its DDP wrapper), the task, the
    training batches, the optimizer, the schedule and the checkpoints."""

    cfg: RunConfig
    ctx: Dist
    model: nn.Module
    ddp: nn.Module
    task: Any
    train: Any  # the training DataLoader
    opt: torch.optim.Optimizer
    sched: Any
    ckpt: Checkpoints
    peak: float | None  # the devices' peak FLOP/s, for MFU
    num_parameters: int

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train.dataset)

    def evaluate(
        self, path: str, num_errors: int = 0, save_to: str | None = None
    ) -> dict[str, Any]:
        return evaluate(self.ddp, path, self.cfg, self.ctx, self.task, num_errors, save_to)

    def snapshot(self, state: TrainState, sums: tuple[torch.Tensor, torch.Tensor]) -> dict:
        state.epoch_sums, state.window_sums = sums[0].tolist(), sums[1].tolist()
        return {"model": unwrap(self.ddp).state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": rng_state(),
                "config": cfg_dict(self.cfg), "model_config": model_config(unwrap(self.ddp)),
                **asdict(state)}  # fmt: skip

    def throughput(self, local: torch.Tensor, seconds: float) -> dict[str, float]:
        """Mean train loss over all ranks' micro-batches, samples/s and, for language models,
        tokens/s and model FLOPs utilisation (FLOPs per token x tokens/s over the peak)."""
        loss, n, tokens, rows = all_sum(local.clone(), self.ctx).tolist()
        out = {"train_loss": loss / max(1.0, n), "samples_per_s": rows / max(seconds, 1e-9)}
        if self.task.language_model:
            out["tokens_per_s"] = tokens / max(seconds, 1e-9)
            if self.peak:
                seq = tokens / max(1.0, rows)  # tokens per row: the context length
                per_token = getattr(self.model, "flops_per_token", None)  # else 6N (Kaplan)
                fpt = per_token(seq) if per_token else 6 * self.num_parameters
                out["mfu"] = fpt * out["tokens_per_s"] / (self.peak * self.ctx.world_size)
        return out


def build(cfg: RunConfig, ctx: Dist) -> Run:
    t = cfg.training
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(cfg.model["name"], cfg.model.get("config", {}), cfg.model.get("init"))
    loading = getattr(model, "loading", None)  # a transformers checkpoint's weights, by name
    if loading is not None:
        log(ctx, f"started from {cfg.model['init']['path']}: {loading.summary()}")
    task = task_for(model, cfg.distill, ctx.device, load_exported)
    frozen = freeze_layers(model, t.freeze_layers)
    if frozen:
        log(ctx, f"froze the embeddings and the first {t.freeze_layers} layers: {frozen:,} "
                 "parameters")  # fmt: skip
    ddp = wrap(model, ctx)
    if t.compile:
        # in place, on the DDP module: DDP's optimizer splits the graph at gradient buckets, so
        # communication still overlaps backward; the state dict keeps its keys
        ddp.compile()
    train = cfg.loader(cfg.data.train, train=True)
    steps_per_epoch = math.ceil(len(train.dataset) / t.grad_accum)
    opt = build_optimizer(ddp, t.optimizer, t.layer_lr_decay)
    sched = build_schedule(opt, t.schedule, steps_per_epoch * t.epochs)
    ckpt = Checkpoints(cfg.checkpoint, ctx, cfg.fault, cfg.attempt)
    return Run(cfg, ctx, model, ddp, task, train, opt, sched, ckpt, peak_flops(cfg, ctx),
               sum(p.numel() for p in model.parameters()))  # fmt: skip


def resume(run: Run) -> tuple[TrainState, dict[str, Any] | None]:
    """The latest checkpoint's weights, optimizer, schedule, RNG and state, if resuming."""
    state = TrainState()
    latest = run.ckpt.latest() if run.cfg.checkpoint.resume else None
    if not latest:
        return state, None
    saved = Checkpoints.load(latest)
    unwrap(run.ddp).load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    state = TrainState(**{f.name: saved[f.name] for f in fields(TrainState) if f.name in saved})
    log(run.ctx, f"resuming from {latest}: epoch {state.epoch + 1}, step {state.global_step}")
    return state, {"path": latest, "epoch": state.epoch, "step": state.global_step}


def fit(cfg: RunConfig, ctx: Dist) -> dict[str, Any]:
    """Build, resume, train epoch by epoch (early stopping, a checkpoint each), restore the
    best weights, then evaluate every split."""
    started = time.perf_counter()
    run = build(cfg, ctx)
    state, resumed_from = resume(run)
    log(ctx, f"{run.num_parameters:,} parameters, world size {ctx.world_size}, device "
             f"{ctx.device}, {run.batches_per_epoch} batches/epoch/rank, {cfg.training.epochs} epochs")  # fmt: skip
    initial: dict[str, float] = {}
    if cfg.eval_at_start and cfg.data.validation and not resumed_from:
        initial = scores(run.evaluate(cfg.data.validation), "val")
        log(ctx, "before training " + " ".join(f"{k} {v:.4f}" for k, v in initial.items()))
    run.ddp.train()
    sums = tuple(torch.tensor(v, dtype=torch.float64, device=ctx.device)
                 for v in (state.epoch_sums, state.window_sums))  # fmt: skip
    samples = 0
    while state.epoch < cfg.training.epochs and not state.stopped_early:
        epoch_started = time.perf_counter()
        samples += train_epoch(run, state, sums)
        end_epoch(run, state, sums, time.perf_counter() - epoch_started)
    best_path = restore_best(run)
    result: dict[str, Any] = {
        "history": state.history,
        "steps": state.steps,  # every log_every_steps: train loss, lr, throughput
        "evals": state.evals,  # every eval_every_steps: validation metrics
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "global_step": state.global_step,
        "best_checkpoint": best_path,
        "resumed_from": resumed_from,
        "initial": initial,
        "num_parameters": run.num_parameters,
        "world_size": ctx.world_size,
        "train_seconds": time.perf_counter() - started,
        "train_samples": samples,
        "model": {"name": cfg.model["name"], "config": model_config(unwrap(run.ddp))},
        "init_report": asdict(run.model.loading) if hasattr(run.model, "loading") else {},
        "confusion": {},
        "metrics": {},
    }
    for split, path in (("validation", cfg.data.validation), ("test", cfg.data.test)):
        if path:
            save_to = (
                storage.join(cfg.predictions_dir, f"split={split}") if cfg.predictions_dir else None
            )
            ev = run.evaluate(path, cfg.data.num_errors if split == "test" else 0, save_to)
            if split == "test":
                result["errors"] = ev["errors"]
            result["metrics"] |= scores(ev, "val" if split == "validation" else split)
            if ev["confusion"]:
                result["confusion"][split] = ev["confusion"]
    if cfg.checkpoint.dir and ctx.main:
        export(unwrap(run.ddp), cfg.checkpoint.dir, cfg.model["name"])
        result["export_dir"] = storage.join(cfg.checkpoint.dir, "export")
    return result


def train_epoch(run: Run, state: TrainState, sums: tuple[torch.Tensor, torch.Tensor]) -> int:
    """One epoch from `state.batch` on: per micro-batch a seed, forward, the task's loss and
    backward; per optimizer step clipping, the step, the schedule, the step records and the
    mid-epoch checkpoints. Returns the rows trained."""
    cfg, t, ctx, ddp = run.cfg, run.cfg.training, run.ctx, run.ddp
    epoch, per_epoch, samples = state.epoch, run.batches_per_epoch, 0
    epoch_sums, window_sums = sums
    run.train.dataset.set_epoch(epoch)
    window_start = time.perf_counter()
    for i, batch in enumerate(run.train):
        if i < state.batch:
            continue  # resumed mid-epoch: these batches were trained before the checkpoint
        torch.manual_seed(hash((t.seed, ctx.rank, epoch * per_epoch + i)) & 0x7FFF_FFFF)
        x = model_inputs(batch, cfg.data.inputs, ctx.device)
        last_micro = (i + 1) % t.grad_accum == 0 or i + 1 == per_epoch
        sync = ddp.no_sync() if ctx.world_size > 1 and not last_micro else _null()
        with sync, autocast(cfg, ctx):
            out = ddp(**x)
            loss = run.task.loss(out, x, batch)
            (loss / t.grad_accum).backward()
        rows = len(next(iter(x.values())))
        samples += rows
        for acc in (epoch_sums, window_sums):  # device-side adds: no sync here
            acc[0] += loss.detach().double()
            acc[1] += 1
            acc[2] += run.task.tokens(out)
            acc[3] += rows
        del out, loss  # the logits are not kept alive into the next forward
        if not last_micro:
            continue
        if t.grad_clip > 0:
            nn.utils.clip_grad_norm_(ddp.parameters(), t.grad_clip)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        state.global_step += 1
        state.batch = step_batch = i + 1
        step = state.global_step
        if t.log_every_steps and step % t.log_every_steps == 0:
            rec = {"step": step, "lr": run.sched.get_last_lr()[0],
                   **run.throughput(window_sums, time.perf_counter() - window_start)}  # fmt: skip
            state.steps.append(rec)
            window_sums.zero_()
            window_start = time.perf_counter()
            log(ctx, f"step {step} " + " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                if k != "step"))  # fmt: skip
        if t.eval_every_steps and cfg.data.validation and step % t.eval_every_steps == 0:
            rec = {"step": step, **scores(run.evaluate(cfg.data.validation), "val")}
            state.evals.append(rec)
            log(ctx, f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in rec.items()
                                                if k != "step"))  # fmt: skip
            window_start = time.perf_counter()  # evaluation time is not training time
        every = t.checkpoint_every_steps
        if every and step % every == 0 and step_batch < per_epoch:
            run.ckpt.save(run.snapshot(state, sums), best=False)
        fault_hook(ctx.rank, "step", step, cfg.fault, cfg.attempt)
    return samples


def end_epoch(
    run: Run, state: TrainState, sums: tuple[torch.Tensor, torch.Tensor], seconds: float
) -> None:
    """The epoch's record (train loss, throughput, validation), early stopping, and its
    checkpoint (best.pt too when it improved)."""
    cfg, epoch = run.cfg, state.epoch
    record = {"epoch": epoch + 1, "step": state.global_step, "lr": run.sched.get_last_lr()[0],
              "seconds": seconds, **run.throughput(sums[0], seconds)}  # fmt: skip
    sums[0].zero_()
    if cfg.data.validation:
        record |= scores(run.evaluate(cfg.data.validation), "val")
    metric = record.get(cfg.training.early_stopping.metric)
    is_best = improved(record, state, cfg.training.early_stopping)
    if is_best:
        state.best, state.best_epoch, state.bad_epochs = metric, epoch + 1, 0
        state.best_loss = record.get("val_loss")
    elif metric is not None:
        state.bad_epochs += 1
        state.stopped_early = state.bad_epochs >= cfg.training.early_stopping.patience
    state.history.append(record)
    state.epoch, state.batch = epoch + 1, 0
    run.ckpt.save(run.snapshot(state, sums), best=is_best or metric is None)
    log(run.ctx, f"epoch {epoch + 1}/{cfg.training.epochs} "
        + " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "step"))
        + (" *" if is_best else "") + (" (early stop)" if state.stopped_early else ""))  # fmt: skip


def restore_best(run: Run) -> str | None:
    """The best epoch's weights on every rank, from best.pt; its path (None without one)."""
    cfg, ctx = run.cfg, run.ctx
    best_path = storage.join(cfg.checkpoint.dir, "best.pt") if cfg.checkpoint.dir else None
    if best_path:
        # rank 0 wrote best.pt and reads it back; the other ranks get the weights from it, so
        # none reads the file while rank 0 still replaces it (they would evaluate the previous
        # best on their shard) or where it does not exist (a directory local to each host)
        if ctx.main and storage.exists(best_path):
            unwrap(run.ddp).load_state_dict(Checkpoints.load(best_path)["model"])
        broadcast_weights(unwrap(run.ddp), ctx)
    return best_path


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
