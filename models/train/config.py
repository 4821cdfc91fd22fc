"""What a training run is told: the model, its data, how to train it (the user's
`<stage>.training` section, models/hparams.py's TrainingConfig, sent as is) and where to
checkpoint. Plain dataclasses, built from the JSON dict the launcher sends."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from sparkloom.models.augment import ImageBatchTransform
from sparkloom.models.data import ColumnTransform, make_dataloader
from sparkloom.models.hparams import AugmentConfig, TrainingConfig
from sparkloom.models.masking import MaskingConfig, MLMBatchTransform

# --- config -----------------------------------------------------------------------------------


@dataclass
class DataConfig:
    train: str
    validation: str | None = None
    test: str | None = None
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

    def loader(self, path: str, train: bool, t: TrainingConfig) -> torch.utils.data.DataLoader:
        return make_dataloader(
            path, t.batch_size if train else t.eval_batch_size, shuffle=train, seed=t.seed,
            num_workers=t.num_workers, shuffle_buffer=self.shuffle_buffer,
            columns=self.columns(), transform=self.transform(train), pad_value=self.pad_values,
        )  # fmt: skip


@dataclass
class CheckpointConfig:
    dir: str | None = None  # every training.checkpoint_every_steps, and after each epoch
    keep: int = 2
    resume: bool = True


@dataclass
class RunConfig:
    model: dict[str, Any]  # {"name": ..., "config": {...}}
    data: DataConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int | None = None
    timeout_s: int = 600  # process-group timeout: a hung rank fails the job after this
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the GPU's name
    eval_at_start: bool = True  # validation metrics of the untrained model (loss at init)
    status_dir: str | None = None  # per-rank started/done/error files, for the launcher
    fault: str | None = None  # test hook, as SPARKLOOM_FAULT
    attempt: int = 1  # which try of the launcher this is (1 + distributor.max_retries at most)
    # knowledge distillation: {"temperature", "alpha", and either "column": teacher logits in
    # the data, or "teacher": {"name", "dir"}: a model export run on each batch}; the training
    # loss becomes models.distill.distillation_loss (evaluation stays plain CE)
    distill: dict[str, Any] | None = None
    # a classifier's final validation and test rows (id, label, logits) as Parquet under
    # split=<split>/rank-R.parquet, for calibration and slices on the driver
    predictions_dir: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        parts = {"data": DataConfig, "training": TrainingConfig, "checkpoint": CheckpointConfig}
        for key, klass in parts.items():
            if key in d and isinstance(d[key], dict):
                d[key] = klass(**d[key])
        return cls(**d)

    def loader(self, path: str, train: bool) -> torch.utils.data.DataLoader:
        return self.data.loader(path, train, self.training)


def cfg_dict(cfg: RunConfig) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(cfg), default=str)
