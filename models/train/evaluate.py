"""Evaluation over a whole split, summed across ranks; what is summed and reported is the
task's (models/train/tasks.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparkloom.models import storage
from sparkloom.models.train.config import RunConfig
from sparkloom.models.train.distributed import Dist, all_sum, autocast
from sparkloom.models.train.tasks import MLM_KEYS, Classify


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
    model: nn.Module, path: str, cfg: RunConfig, ctx: Dist, task: Any, num_errors: int = 0,
    save_to: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The task's report over the split at `path` (loss, accuracy, confusion matrix for a
    classifier; per-token loss, accuracy and perplexity for a language model), summed over
    all ranks; with `num_errors`, up to that many misclassified examples (id, true,
    predicted, p). With `save_to` (a classifier's), every row's id, label and logits go to
    `save_to`/rank-R.parquet: the driver calibrates and slices from them."""
    model.eval()
    loader = cfg.loader(path, train=False)
    sums = task.sums(ctx.device)
    errors: list[dict[str, Any]] = []
    keep = num_errors if isinstance(task, Classify) else 0
    saved: dict[str, list] = {"id": [], "label": [], "logits": []}
    for batch in loader:
        x = model_inputs(batch, cfg.data.inputs, ctx.device)
        with autocast(cfg, ctx):
            out = model(**x)
        task.add(sums, out, x)
        if save_to:
            saved["id"] += [str(i) for i in batch[cfg.data.id_column]]
            saved["label"].append(x[task.label].cpu())
            saved["logits"].append(out.logits.float().cpu())
        if len(errors) < keep and cfg.data.id_column in batch:
            labels, pred = x[task.label], out.logits.argmax(-1)
            prob = out.logits.float().softmax(-1).max(-1).values
            for i in (pred != labels).nonzero().flatten().tolist()[: keep - len(errors)]:
                errors.append({"id": batch[cfg.data.id_column][i], "label": int(labels[i]),
                               "pred": int(pred[i]), "prob": float(prob[i])})  # fmt: skip
        del out  # a language model's (B, T, V) logits: not alive into the next forward
    report = task.report({k: all_sum(v, ctx) for k, v in sums.items()})
    if keep and ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, errors)
        errors = [e for part in gathered for e in part][:keep]
    if save_to:
        write_predictions(saved, save_to, ctx.rank)
    model.train()
    return report | {"errors": errors}


def write_predictions(saved: dict[str, list], directory: str, rank: int) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    logits = torch.cat(saved["logits"]) if saved["logits"] else torch.zeros(0, 0)
    table = pa.table({
        "id": pa.array(saved["id"], pa.string()),
        "label": pa.array(torch.cat(saved["label"]).tolist() if saved["label"] else [], pa.int32()),
        "logits": pa.array(logits.tolist(), pa.list_(pa.float32())),
    })  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(directory, f"rank-{rank}.parquet"), buf.getvalue())


def scores(ev: dict[str, Any], prefix: str) -> dict[str, float]:
    """An evaluation's loss, accuracy and MLM/LM scores, as `prefix`_name metrics."""
    keys = ("loss", "accuracy", *MLM_KEYS)
    return {f"{prefix}_{k}": ev[k] for k in keys if k in ev}
