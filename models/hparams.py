"""What a user chooses for each model, importable without torch: the pipeline's config
validates its `<stage>.model` sections as these dataclasses, and each model's own config
(models/lstm.py's LSTMConfig, ...) adds what the data decides (vocabulary, classes, image
shape). A check's message names the field as `<Class>.<field>`; the pipeline's config errors
turn that into the YAML key (`lstm.model.dropout`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args


def at_least(cfg: Any, low: float, *names: str) -> None:
    """Each of `names` is >= `low` (or None, where None means "the preset's")."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ValueError(f"{type(cfg).__name__}.{name} must be >= {low}, got {value}")


def at_least_one(cfg: Any, *names: str) -> None:
    at_least(cfg, 1, *names)


def probability(cfg: Any, *names: str) -> None:
    """Each of `names` is a dropout rate: in [0, 1)."""
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be in [0, 1), got {value}")


def one_of(cfg: Any, name: str, choices: Iterable[Any]) -> None:
    value, choices = getattr(cfg, name), tuple(choices)
    if value not in choices:
        raise ValueError(f"{type(cfg).__name__}.{name} must be one of {choices}, got {value!r}")


def index_below(cfg: Any, name: str, size: str) -> None:
    """`name` is a valid index into `size` (a padding id into the vocabulary)."""
    value, n = getattr(cfg, name), getattr(cfg, size)
    if not 0 <= value < n:
        raise ValueError(f"{type(cfg).__name__}.{name} must be in [0, {size}={n}), got {value}")


def preset_sizes(cfg: Any, presets: dict[str, Any], dims: type, custom: str | None) -> Any:
    """A preset's sizes (a `dims` tuple) with the ones `cfg` sets replacing them; with
    `custom` as the preset, `cfg` must set every size."""
    name, sizes = type(cfg).__name__, dims._fields
    if cfg.preset == custom:
        unset = [k for k in sizes if getattr(cfg, k) is None]
        if unset:
            raise ValueError(
                f"{name}.preset is {custom!r}, so every size must be given; set {unset} or "
                f"pick a preset from {list(presets)}"
            )
    elif cfg.preset not in presets:
        raise ValueError(
            f"unknown {name}.preset {cfg.preset!r}; choose one of {list(presets)} (or "
            f"{custom!r} with {', '.join(sizes)} set)"
        )
    at_least_one(cfg, *sizes)
    base = presets.get(cfg.preset, dims(*[0] * len(sizes)))
    return base._replace(**{k: getattr(cfg, k) for k in sizes if getattr(cfg, k) is not None})


# --- text classifiers --------------------------------------------------------------------------


Pooling = Literal["max", "mean", "last"]
POOLINGS = get_args(Pooling)


@dataclass(kw_only=True)
class LSTMParams:
    """The hyper-parameters a user chooses: the `lstm.model` config section."""

    embed_dim: int = 128
    hidden_dim: int = 128
    num_layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.3
    pooling: Pooling = "max"

    def __post_init__(self) -> None:
        at_least_one(self, "embed_dim", "hidden_dim", "num_layers")
        probability(self, "dropout")
        one_of(self, "pooling", POOLINGS)


@dataclass(kw_only=True)
class TextCNNParams:
    """The hyper-parameters a user chooses: the `textcnn.model` config section."""

    embed_dim: int = 128
    filter_sizes: tuple[int, ...] = (3, 4, 5)
    num_filters: int = 100
    dropout: float = 0.5

    def __post_init__(self) -> None:
        at_least_one(self, "embed_dim", "num_filters")
        self.filter_sizes = tuple(self.filter_sizes)
        if not self.filter_sizes or any(k < 1 for k in self.filter_sizes):
            raise ValueError(
                f"{type(self).__name__}.filter_sizes must be a non-empty tuple of ints >= 1, "
                f"got {self.filter_sizes}"
            )
        probability(self, "dropout")


# --- image classifiers -------------------------------------------------------------------------

Init = Literal["he", "default"]
Stem = Literal["auto", "imagenet", "small"]
INITS, STEMS = get_args(Init), get_args(Stem)


@dataclass(kw_only=True)
class CNNParams:
    """The hyper-parameters a user chooses: the `cnn.model` config section."""

    conv1_channels: int = 32
    conv2_channels: int = 64
    kernel_size: int = 5
    hidden_dim: int = 128
    dropout: float = 0.5
    batch_norm: bool = False
    init: Init = "he"

    def __post_init__(self) -> None:
        at_least_one(self, "conv1_channels", "conv2_channels", "kernel_size", "hidden_dim")
        probability(self, "dropout")
        one_of(self, "init", INITS)


@dataclass(kw_only=True)
class AlexNetParams:
    """The hyper-parameters a user chooses: the `alexnet.model` config section."""

    width_mult: float = 1.0  # scales the conv channels and the fc6/fc7 width
    batch_norm: bool = True
    dropout: float = 0.5
    init: Init = "he"
    stem: Stem = "auto"  # auto: small below 64x64 inputs

    def __post_init__(self) -> None:
        if not self.width_mult > 0:
            raise ValueError(f"{type(self).__name__}.width_mult must be > 0, got {self.width_mult}")
        probability(self, "dropout")
        one_of(self, "init", INITS)
        one_of(self, "stem", STEMS)


@dataclass(kw_only=True)
class AugmentConfig:
    """Training batches only, on the training processes, seeded; evaluation is never
    augmented: the `cnn.augment` and `alexnet.augment` config sections."""

    crop_padding: int = 0  # random crop after this much zero padding per side; 0 = off
    horizontal_flip: bool = False  # off by default: digits are not mirror-symmetric
    standardize: bool = True  # per channel, with the training split's mean/std from ingest

    def __post_init__(self) -> None:
        at_least(self, 0, "crop_padding")


# --- BERT and GPT-2 ------------------------------------------------------------------------------


class BertDims(NamedTuple):
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int


BertPreset = Literal["tiny", "mini", "small", "medium", "base"]
# (L, H, A, I) from Turc et al. (2019); intermediate is 4H throughout.
BERT_PRESETS: dict[str, BertDims] = {
    "tiny": BertDims(2, 128, 2, 512),
    "mini": BertDims(4, 256, 4, 1024),
    "small": BertDims(4, 512, 8, 2048),
    "medium": BertDims(8, 512, 8, 2048),
    "base": BertDims(12, 768, 12, 3072),
}


@dataclass(kw_only=True)
class BertParams:
    """The hyper-parameters a user chooses: the `bert_pretrain.model` config section."""

    preset: BertPreset | None = "mini"  # None: all four sizes below are given
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # Each one, when set, overrides the preset's value.
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        at_least_one(self, "max_position_embeddings")
        dims = self.dims
        if dims.hidden_size % dims.num_attention_heads:
            raise ValueError(
                f"{name}: hidden_size {dims.hidden_size} must be divisible by "
                f"num_attention_heads {dims.num_attention_heads}"
            )
        probability(self, "hidden_dropout", "attention_dropout")

    @property
    def dims(self) -> BertDims:
        """(layers, hidden, heads, intermediate): the preset's, with the overrides applied."""
        return preset_sizes(self, BERT_PRESETS, BertDims, None)


class GPT2Dims(NamedTuple):
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int


# (layers, heads, width, context). "small" is the 124M model OpenAI released as "gpt2";
# medium and large are gpt2-medium (355M) and gpt2-large (774M).
GPT2_PRESETS: dict[str, GPT2Dims] = {
    "tiny": GPT2Dims(2, 2, 128, 256),
    "mini": GPT2Dims(4, 4, 256, 512),
    "small": GPT2Dims(12, 12, 768, 1024),
    "medium": GPT2Dims(24, 16, 1024, 1024),
    "large": GPT2Dims(36, 20, 1280, 1024),
}
CUSTOM_PRESET = "custom"  # no preset: all four sizes are given
GPT2Preset = Literal["tiny", "mini", "small", "medium", "large", "custom"]


@dataclass(kw_only=True)
class GPT2Params:
    """The hyper-parameters a user chooses: the `gpt2.model` config section."""

    preset: GPT2Preset = "tiny"  # or "custom" with all four sizes below given
    # Each one, when set, overrides the preset's value (None: the preset's).
    n_positions: int | None = None  # the longest context
    n_embd: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    dropout: float = 0.1  # residual, embedding and attention dropout alike

    def __post_init__(self) -> None:
        name = type(self).__name__
        dims = self.dims
        if dims.n_embd % dims.n_head:
            raise ValueError(
                f"{name}: n_embd {dims.n_embd} must be divisible by n_head {dims.n_head}; "
                f"change n_embd or n_head"
            )
        probability(self, "dropout")

    @property
    def dims(self) -> GPT2Dims:
        """(layers, heads, width, context): the preset's, with the overrides applied."""
        return preset_sizes(self, GPT2_PRESETS, GPT2Dims, CUSTOM_PRESET)


# --- training ----------------------------------------------------------------------------------


Optimizer = Literal["adamw", "adam", "rmsprop", "sgd"]
Schedule = Literal["cosine", "constant"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Optimizer = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd and rmsprop
    betas: tuple[float, float] = (0.9, 0.999)  # Adam(W)'s; GPT-2 recipes use (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        one_of(self, "name", get_args(Optimizer))
        if not self.eps > 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0, got {self.eps}")
        at_least(self, 0, "lr", "weight_decay")  # lr 0: frozen weights, as torch allows
        probability(self, "momentum")
        self.betas = tuple(self.betas)


@dataclass(kw_only=True)
class ScheduleConfig:
    kind: Schedule = "cosine"  # both after a linear warmup
    warmup_ratio: float = 0.05  # of all steps; the larger of the two warmups wins
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio

    def __post_init__(self) -> None:
        one_of(self, "kind", get_args(Schedule))
        probability(self, "warmup_ratio")
        at_least(self, 0, "warmup_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"ScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"
            )


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    patience: int = 3  # epochs without improvement
    min_delta: float = 0.0
    mode: Literal["max", "min"] | None = None  # None: max for accuracy, min for loss

    def __post_init__(self) -> None:
        at_least_one(self, "patience")
        at_least(self, 0, "min_delta")
        if self.mode is not None:
            one_of(self, "mode", ("max", "min"))

    @property
    def maximize(self) -> bool:
        # derived, never stored: a config that changes the metric must not keep the old mode
        return self.mode == "max" if self.mode else self.metric.endswith("accuracy")


def _nested(cfg: Any, name: str, klass: type) -> None:
    value = getattr(cfg, name)
    if isinstance(value, dict):  # from JSON: the launcher sends plain dicts
        setattr(cfg, name, klass(**value))


WarmStart = Literal["none", "champion", "last"]


@dataclass(kw_only=True)
class TrainingConfig:
    """How a deep model is trained: the `<stage>.training` config section, and what the
    training processes are sent (models.train.RunConfig.training)."""

    epochs: int = 5
    batch_size: int = 32  # per process
    eval_batch_size: int = 128
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0: off
    precision: Precision = "auto"  # auto: bf16 autocast on GPU only
    num_workers: int = 0  # DataLoader workers per process
    checkpoint_every_steps: int = 0  # 0: at the end of each epoch only
    log_every_steps: int = 0  # train loss, lr, throughput every N steps (0: off)
    eval_every_steps: int = 0  # validation metrics every N steps too (0: per epoch)
    compile: bool = False  # torch.compile the model (pays off on GPUs, for long runs)
    seed: int = 42
    layer_lr_decay: float = 1.0  # transformers only: each layer at this x the rate above it; 1: off
    freeze_layers: int = 0  # transformers only: the embeddings and the first N layers do not train
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # incrementally ingested data: start from the registered champion's weights (when it is
    # this model) or the last run's, and train on the new batches' rows plus replay_ratio x
    # as many earlier training rows, a seeded sample (docs/incremental.md); none: all rows
    warm_start: WarmStart = "none"
    replay_ratio: float = 1.0

    def __post_init__(self) -> None:
        at_least_one(self, "epochs", "batch_size", "eval_batch_size", "grad_accum")
        one_of(self, "warm_start", get_args(WarmStart))
        at_least(self, 0, "replay_ratio")
        at_least(self, 0, "grad_clip", "num_workers", "checkpoint_every_steps",
                      "log_every_steps", "eval_every_steps", "freeze_layers")  # fmt: skip
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError(
                f"layer_lr_decay must be in (0, 1] (1: every layer at the same rate), got "
                f"{self.layer_lr_decay}"
            )
        one_of(self, "precision", get_args(Precision))
        _nested(self, "optimizer", OptimizerConfig)
        _nested(self, "schedule", ScheduleConfig)
        _nested(self, "early_stopping", EarlyStoppingConfig)
