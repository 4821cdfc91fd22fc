"""The `quantize` stage: an int8 copy of a trained classifier for CPU scoring, measured
beside its float model on the same test split (models.quantize does the torch part).

The int8 model's files are the float model's (state dict, config, vocabulary, labels) plus
`quantization.json`: the recipe and the measurements. A dynamic recipe is deterministic, so
loading recomputes it from the float weights; a static one (the CNNs) depends on its
calibration images, so its int8 weights are stored too (`int8_state_dict.pt`). Either way
nothing but plain tensors is read from disk. Batch scoring (`sparkloom score`, the `score`
stage) recognises such a model and builds it once per executor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from pyspark.sql import functions as F

from sparkloom.models import storage
from sparkloom.pipelines.catalog import Catalog
from sparkloom.pipelines.config import Config
from sparkloom.pipelines.context import StageContext, stage
from sparkloom.pipelines.report import classification_metrics
from sparkloom.pipelines.stages import IMAGE_MODELS

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    source: str  # the stage whose model was quantized
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False

    @property
    def name(self) -> str:
        return f"{self.source}-int8"

    def summary(self) -> str:
        m = self.metrics
        return (
            f"{self.name}: test accuracy {m['test_accuracy']:.4f} vs float "
            f"{m['float_test_accuracy']:.4f} ({m['accuracy_delta']:+.4f}), "
            f"{m['int8_bytes'] / 1e6:.2f} MB vs {m['float_bytes'] / 1e6:.2f} MB, "
            f"{m['int8_rows_per_s']:.0f} vs {m['float_rows_per_s']:.0f} rows/s "
            f"({m['speedup']:.2f}x, {m['threads']} thread(s)); predictions agree on "
            f"{m['agreement']:.1%}"
        )


def test_inputs(
    cfg: Config, catalog: Catalog, stage: str, model_dir: str, split: str = "test",
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str]:  # fmt: skip
    """(model inputs, label indices, the forward keyword) for a split (the first `limit` rows
    by id), preprocessed the way batch scoring does it: token ids from raw text,
    standardized image pixels."""
    data = catalog.read("ingested", "ingest").filter(F.col("split") == split)
    if stage in IMAGE_MODELS:
        data = data.select("id", "image", "label_index").orderBy("id")
        rows = (data.limit(limit) if limit else data).collect()
        with open(os.path.join(model_dir, "preprocess.json")) as f:
            pre = json.load(f)
        raw = np.stack([np.frombuffer(bytes(r["image"]), np.uint8) for r in rows])
        x = torch.from_numpy(raw.reshape(-1, *pre["shape"]).astype(np.float32)) / 255.0
        mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
        labels = torch.tensor([r["label_index"] for r in rows])
        return (x - mean) / std, labels, "images"
    from sparkloom.pipelines.scoring import ModelRef, _token_ids

    config = cfg.model_dump(mode="json")
    ref = ModelRef("", stage, model_dir, [], config)
    ids = _token_ids(ref, data.select("id", "text"), ref.max_length)
    rows = ids.join(data.select("id", "label_index"), "id").orderBy("id")
    rows = (rows.limit(limit) if limit else rows).collect()
    x = torch.tensor([r["ids"] for r in rows], dtype=torch.int64)
    return x, torch.tensor([r["label_index"] for r in rows]), "input_ids"


@stage("quantize", QuantizeResult)
def run_quantize(ctx: StageContext) -> QuantizeResult:
    """Called as run_quantize(spark, cfg, catalog, force=False); writes <source>_int8."""
    from sparkloom.models.quantize import INT8_WEIGHTS, compare, quantize, recipe, static_quantize
    from sparkloom.models.train import load_exported

    cfg, catalog, out = ctx.cfg, ctx.catalog, ctx.output
    qc = cfg.quantize
    source = qc.source
    model_dir = catalog.local_path(f"{source}_model")
    float_model = load_exported(model_dir, source)
    how = recipe(source, qc.method)
    if how["method"] == "static":  # activation ranges from training rows, never test's
        calibration, _, _ = test_inputs(cfg, catalog, source, model_dir, "train",
                                        qc.calibration_rows)  # fmt: skip
        int8_model = static_quantize(float_model, how, calibration)
        how["calibration_rows"] = len(calibration)
    else:
        int8_model = quantize(float_model, how["modules"])
    inputs, labels, key = test_inputs(cfg, catalog, source, model_dir)
    metrics = compare(float_model, int8_model, inputs, labels, key, qc.threads)
    metrics["accuracy_delta"] = metrics["test_accuracy"] - metrics["float_test_accuracy"]
    if metrics["confusion"]:  # the register stage may rank by F1: the int8 model's own
        scores = classification_metrics(np.array(metrics["confusion"]), [])
        metrics["test_f1"], metrics["test_macro_f1"] = scores["f1"], scores["macro_f1"]
    result = QuantizeResult(source, metrics)
    written = {**how, "source": source, "source_fingerprint": ctx.upstream["fingerprint"],
               "measured": metrics}  # fmt: skip

    def save(tmp: str) -> None:
        with storage.staged(catalog.fs.qualify(tmp)) as local:  # uploaded when remote
            shutil.copytree(model_dir, local, ignore=shutil.ignore_patterns("_manifest.json"),
                            dirs_exist_ok=True)  # fmt: skip
            with open(os.path.join(local, "quantization.json"), "w") as f:
                json.dump(written, f, indent=2)
            if how["method"] == "static":
                torch.save(int8_model.state_dict(), os.path.join(local, INT8_WEIGHTS))

    catalog.write(out, save, ctx.common(result={**asdict(result), "skipped": False}))
    return result
