"""What a training run is told: data, model, optimizer, schedule, early stopping,
checkpoints. Plain dataclasses, built from the JSON dict the launcher sends."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from sparkloom.models.augment import AugmentConfig, ImageBatchTransform
from sparkloom.models.data import ColumnTransform, make_dataloader
from sparkloom.models.masking import MaskingConfig, MLMBatchTransform

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


def cfg_dict(cfg: RunConfig) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(cfg), default=str)
