"""Warm-start training on the driver: which earlier model to start from, and what to train on.

With `<stage>.training.warm_start` set, a deep stage starts from the registered champion's
weights (when the champion is this stage's model; else the last run's, with a warning) or
from the last run's (`last`), and trains on the training rows of the batches that model has
not seen, plus a seeded sample of `replay_ratio` x as many earlier training rows, so it
learns the new data without forgetting the old. Validation and test rows are every batch's.
The weights are matched by name (models.warm_start): new labels get new head rows, a
refitted vocabulary keeps each known word's embedding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkloom.models import storage
from sparkloom.pipelines.context import StageContext

log = logging.getLogger(__name__)

BATCHES_FILE = "batches.json"  # beside a trained model: the data batches it trained on


def data_batches(manifest: dict) -> dict[str, str] | None:
    """batch -> version of an incremental dataset's manifest (features or ingested)."""
    inc = manifest.get("incremental")
    if not inc:
        return None
    got = inc["batches"]
    return {str(b["batch"]): b["version"] for b in got} if isinstance(got, list) else dict(got)


@dataclass
class WarmStart:
    """The decision, as logged: where from, and the rows it trains on."""

    source: str | None  # champion | last | None (from scratch)
    reason: str
    path: str | None = None  # the earlier model's files (a directory any rank can read)
    new_batches: list[str] = field(default_factory=list)
    rows_new: int = 0
    rows_replay: int = 0
    rows_earlier: int = 0

    def metrics(self) -> dict[str, float]:
        return {"warm_rows_new": self.rows_new, "warm_rows_replay": self.rows_replay,
                "warm_rows_earlier": self.rows_earlier}  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _champion(ctx: StageContext, arch: str) -> tuple[str | None, str]:
    """The champion's model files, when it is this stage's own (float) model."""
    from sparkloom.pipelines.errors import DataError
    from sparkloom.pipelines.scoring import resolve

    rc = ctx.cfg.register
    uri = f"models:/{rc.name or ctx.cfg.pipeline.name}@{rc.alias}"
    try:
        ref = resolve(uri)
    except DataError as e:
        return None, f"no {uri} ({str(e).splitlines()[0]})"
    if ref.stage != arch or ref.quantized or ref.run_id is None:
        what = f"{ref.stage}{' int8' if ref.quantized else ''}"
        return None, f"{uri} is a {what} model, not this stage's {arch}"
    return ref.files, f"{uri} (run {ref.run_id})"


def plan(ctx: StageContext, arch: str, data: DataFrame, work: str) -> tuple[WarmStart, DataFrame]:
    """Where to start from and the rows to train on (`data`: id, ..., split[, batch])."""
    tc = getattr(ctx.cfg, arch).training
    catalog = ctx.catalog
    found, why = None, ""
    if tc.warm_start == "champion":
        found, why = _champion(ctx, arch)
        if found is None:
            log.warning("%s: warm start from the champion: %s; using the last run's model",
                        ctx.stage, why)  # fmt: skip
    source = "champion" if found else "last"
    if found is None and catalog.manifest(ctx.output) is not None:
        found, why = catalog.uri(ctx.output), f"the last run's model ({catalog.path(ctx.output)})"
    if found is None:
        return WarmStart(None, "no earlier model: trained from scratch"), data
    seen = _read_batches(found)
    now = data_batches(ctx.upstream)
    if now is None or seen is None or "batch" not in data.columns:
        info = WarmStart(source, f"from {why}; all rows (the data has no batches)", found)
        return _staged(info, work), data
    new = sorted((b for b, v in now.items() if seen.get(b) != v), key=int)
    train = F.col("split") == "train"
    fresh = F.col("batch").cast("string").isin(new)
    counts = {r["fresh"]: r["count"] for r in
              data.filter(train).groupBy(fresh.alias("fresh")).count().collect()}  # fmt: skip
    n_new, n_old = counts.get(True, 0), counts.get(False, 0)
    if not n_new:
        reason = f"{why} has seen every batch's training rows; trained from scratch"
        log.warning("%s: %s", ctx.stage, reason)
        return WarmStart(None, reason), data
    want = min(n_old, round(tc.replay_ratio * n_new))
    # salted: the split hashes the same ids with its own seed (42 as well by default), and
    # an unsalted draw among training rows (split u < 0.8) would take 0.45, not 0.36, of them
    salt = F.lit(f"replay-{tc.seed}")
    u = F.pmod(F.xxhash64("id", salt), F.lit(1_000_000)) / 1_000_000.0
    replay = ~fresh & (u < (want / n_old if n_old else 0.0))
    rows = data.filter(~train | fresh | replay)
    n_replay = rows.filter(train & ~fresh).count()
    info = WarmStart(source, f"from {why}", found, new, n_new, n_replay, n_old)
    log.info("%s: warm start %s; training on %d new rows (batches %s) + %d of %d earlier rows "
             "replayed (replay_ratio %g)", ctx.stage, info.reason, n_new, ", ".join(new),
             n_replay, n_old, tc.replay_ratio)  # fmt: skip
    return _staged(info, work), rows


def _read_batches(path: str) -> dict[str, str] | None:
    file = storage.join(path, BATCHES_FILE)
    return json.loads(storage.read_text(file)) if storage.exists(file) else None


def _staged(info: WarmStart, work: str) -> WarmStart:
    """The earlier model's files where every rank can read them: a champion downloaded to
    the driver is copied under the stage's work directory (any filesystem)."""
    if info.source != "champion":
        return info
    to = storage.join(work, "warm_start")
    for name in ("state_dict.pt", "labels.json", "vocab.txt", "model.json", BATCHES_FILE):
        src = storage.join(info.path, name)
        if storage.exists(src):
            storage.copy(src, storage.join(to, name))
    info.path = to
    return info


def init_spec(info: WarmStart, labels: list[str], files: dict[str, str]) -> dict[str, Any]:
    """The `model.init` the training processes build from (models.registry)."""
    vocab = files.get("vocab.txt")
    return {"kind": "warm_start", "path": info.path, "labels": labels,
            "vocab": vocab.split("\n")[:-1] if vocab is not None else None}  # fmt: skip
