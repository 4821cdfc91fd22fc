"""Typed pipeline configuration: YAML files in, validated objects out.

A run's configuration is one or more YAML files merged left to right (a file may
`extends:` others, relative to itself), then `key.sub=value` overrides from the
command line. Everything is validated before Spark starts; an error names the key
and says how to fix it.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, is_dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparkloom.models.hparams import (
    AlexNetParams,
    AugmentConfig,
    BertParams,
    CNNParams,
    EarlyStoppingConfig,
    GPT2Params,
    LSTMParams,
    TextCNNParams,
    TrainingConfig,
)
from sparkloom.pipelines.errors import ConfigError
from sparkloom.pipelines.stages import (
    CLASSIFIERS,
    DEPENDS,
    IMAGE_MODELS,
    SPECS,
    STAGES,
    STATIC_INT8,
    TEXT_MODELS,
)  # fmt: skip

IMAGE_FORMATS = ("image_dirs", "idx", "image_parquet")
Stage = Literal[STAGES]  # type: ignore[valid-type]  # the names REGISTRY declares
STOPWORD_LANGUAGES = (
    "danish", "dutch", "english", "finnish", "french", "german", "hungarian", "italian",
    "norwegian", "portuguese", "russian", "spanish", "swedish", "turkish",
)  # fmt: skip


def _as_mapping(value: Any) -> dict[str, Any] | None:
    """A section value (a Section or a models/ dataclass) as the mapping it was made from."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, data: Any) -> Any:
        """A partial mapping updates the field's own default, not its type's: gpt2's training
        default stops early on val_loss, and `gpt2.training.epochs=2` must keep that."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            if isinstance(given := out.get(name), dict):
                base = _as_mapping(field.default)
                out[name] = given if base is None else _deep_merge(base, given)
        return out


# --- where things run and are recorded -------------------------------------------------------


class PipelineConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data_root: str = "data"  # local path or any Hadoop filesystem URI (hdfs://, s3a://, file://)
    stages: list[Stage] = ["ingest", "features", "baseline"]
    cache_dir: str | None = (
        None  # Spark -> torch Parquet cache; None: <data_root>/<name>/converter_cache
    )


class SparkConfig(Section):
    master: str | None = None  # None: spark-submit's --master, else local[*]
    # Spark Connect: sc://host:15002[/;token=...] for a server, or local[N] for one started in
    # this process; None: the SPARK_REMOTE environment variable if set, else a classic session
    remote: str | None = None
    app_name: str = "sparkloom"
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "WARN"
    conf: dict[str, str | int | float | bool] = {}

    @field_validator("remote")
    @classmethod
    def _connect_url(cls, v: str | None) -> str | None:
        if v is not None and not (
            v.startswith("sc://") or re.fullmatch(r"local(\[(\d+|\*)\])?", v)
        ):
            raise ValueError(
                f"{v!r} is not a Spark Connect address; give sc://host:port (a Connect server) "
                "or local[N] (a local server started for this run)"
            )
        return v

    @model_validator(mode="after")
    def _one_of_master_and_remote(self) -> SparkConfig:
        if self.master and self.remote:
            raise ValueError(
                f"spark.master ({self.master}) and spark.remote ({self.remote}) are both set; a "
                "Spark Connect client has no master (the server has one): set spark.master=null, "
                "or spark.remote=local[N] for a local Connect server"
            )
        return self

    def connect_url(self) -> str | None:
        """Where to connect: spark.remote, else SPARK_REMOTE (as pyspark reads it)."""
        return self.remote or os.environ.get("SPARK_REMOTE") or None


class PreflightConfig(Section):
    """Checks before a pipeline's first stage (pipelines.preflight); `sparkloom preflight`
    runs them alone."""

    enabled: bool = True
    timeout_s: int = Field(60, ge=1)  # how long to wait for executors to register


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the pipeline name
    log_models: bool = True


# --- ingest ------------------------------------------------------------------------------------


class ColumnsConfig(Section):
    id: str | None = None  # None: a deterministic id is made from label and content
    text: str = "text"
    label: str = "label"
    image: str = "image"  # image_parquet: a numeric array of pixels (row-major H, W[, C])
    shape: str | None = "shape"  # image_parquet: [H, W] or [H, W, C] per row; None: ingest.image


class CsvConfig(Section):
    """How the CSV was written. The defaults are RFC 4180, as pandas, Excel, Python's csv
    module and database exports write it: a quote inside a quoted field is doubled (`""`),
    and quoted fields may hold commas and line breaks."""

    header: bool = True
    sep: str | None = None  # None: "," for csv, tab for tsv
    quote: str = Field('"', min_length=1, max_length=1)
    escape: str = Field('"', min_length=1, max_length=1)  # '\\' for files that write \"
    multiline: bool = (
        True  # quoted fields may span lines (an unclosed quote fails, naming its line)
    )


SPLITS = ("train", "validation", "test")


class SplitConfig(Section):
    """By a hash of the id with these ratios (the default), or the data's own split:
    `column` names a column holding train/validation/test, or `ingest.path` maps each split
    to its own input. A given split without validation rows gets `validation_ratio` of its
    training rows, by the id hash."""

    train: float = Field(0.8, gt=0, le=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    seed: int = 42
    column: str | None = None
    validation_ratio: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"split ratios train+validation+test add up to {total:g}, not 1; "
                "set ingest.split.train/validation/test so they sum to 1"
            )
        return self


class LabelsConfig(Section):
    # `Sport` and `sport ` are one class written two ways far more often than two classes
    case_sensitive: bool = False


class ImageConfig(Section):
    """What every image becomes at ingest: size, channels, and how to get there."""

    height: int = Field(28, ge=1)
    width: int = Field(28, ge=1)
    channels: Literal[1, 3] = 1  # 1: grayscale, 3: RGB
    # center_crop: scale the shorter side to fit, crop the middle; pad: scale the longer side
    # to fit, pad with black; stretch: scale each side on its own (changes the aspect ratio)
    resize: Literal["center_crop", "pad", "stretch"] = "center_crop"
    max_value: float = Field(255.0, gt=0)  # image_parquet: the value of a white pixel


# which files in a folder are data, when ingest.file_glob is not set: a README.txt beside
# part-1.csv is not a CSV record
DEFAULT_GLOBS = {
    "csv": ("*.csv", "*.csv.*"), "tsv": ("*.tsv", "*.tsv.*", "*.tab"),
    "json": ("*.json", "*.jsonl", "*.ndjson", "*.json.*", "*.jsonl.*", "*.ndjson.*"),
    "parquet": ("*.parquet", "part-*"), "image_parquet": ("*.parquet", "part-*"),
    "text_dirs": ("*",), "image_dirs": ("*",), "idx": ("*",),
}  # fmt: skip


class IngestConfig(Section):
    format: Literal[
        "csv", "tsv", "json", "parquet", "text_dirs", "image_dirs", "idx", "image_parquet",
        "table", "sql",
    ]  # fmt: skip
    # a file or folder: local path, Hadoop filesystem URI, or pkg://<package>/<dir> for data a
    # package ships; or {train: ..., validation: ..., test: ...}, the data's own split
    path: str | dict[Literal["train", "validation", "test"], str] | None = None
    table: str | None = None  # format=table: [catalog.][db.]name, from the session's catalog
    query: str | None = None  # format=sql: a Spark SQL / HiveQL query
    columns: ColumnsConfig = ColumnsConfig()
    csv: CsvConfig = CsvConfig()
    encoding: str = "utf-8"  # csv/tsv/json/text_dirs: utf-8, latin-1, cp1252, utf-16, ...
    # which files under a folder are read (a name pattern, or a list); None: by format
    file_glob: str | list[str] | None = None
    image: ImageConfig = ImageConfig()
    split: SplitConfig = SplitConfig()
    labels: LabelsConfig = LabelsConfig()
    max_labels: int = Field(1000, ge=2)  # more distinct labels than this: a mis-read file
    # read only the files not taken in before (by path, size, mtime, content hash) and append
    # them as a new batch; a changed file replaces its rows (docs/incremental.md)
    incremental: bool = False
    # incremental: a file that is gone keeps its rows (reported every run) or drops them
    on_deleted: Literal["keep", "drop"] = "keep"

    @model_validator(mode="after")
    def _source(self) -> IngestConfig:
        needs = {"table": "table", "sql": "query"}.get(self.format, "path")
        for key in ("path", "table", "query"):
            given = getattr(self, key) is not None
            if key == needs and not given:
                raise ValueError(
                    f"ingest.format={self.format} reads ingest.{key}; set it"
                    + (" (a file, a folder, or {train: ..., test: ...})" if key == "path" else "")
                )
            if key != needs and given:
                raise ValueError(
                    f"ingest.{key} does not apply to ingest.format={self.format} (it reads "
                    f"ingest.{needs}); remove it"
                )
        if isinstance(self.path, dict):
            if not {"train", "test"} <= set(self.path):
                raise ValueError(
                    "ingest.path by split needs at least train and test, e.g. "
                    "{train: data/train.csv, test: data/test.csv}"
                )
            if self.split.column:
                raise ValueError(
                    "give the split by ingest.path per split or by ingest.split.column, not both"
                )
        if self.incremental and self.format in ("idx", "table", "sql"):
            raise ValueError(
                f"ingest.incremental reads new files of a folder; ingest.format={self.format} "
                "has none to tell apart. Export the new rows as files (csv, json, parquet) or "
                "set ingest.incremental=false"
            )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(
                f"ingest.encoding {self.encoding!r} is not an encoding Python knows; use e.g. "
                "utf-8, latin-1, cp1252 or utf-16"
            ) from None
        return self

    @property
    def modality(self) -> Literal["text", "image"]:
        return "image" if self.format in IMAGE_FORMATS else "text"

    @property
    def globs(self) -> tuple[str, ...]:
        if self.file_glob is None:
            return DEFAULT_GLOBS.get(self.format, ("*",))
        return (self.file_glob,) if isinstance(self.file_glob, str) else tuple(self.file_glob)

    def paths(self) -> dict[str | None, str]:
        """Split name (None: split by ratios or column) -> input path."""
        if isinstance(self.path, dict):
            return {s: self.path[s] for s in SPLITS if s in self.path}
        return {None: self.path} if self.path is not None else {}


# --- features ----------------------------------------------------------------------------------


class TokenizerConfig(Section):
    pattern: str = r"\W+"
    gaps: bool = True  # True: pattern matches separators; False: it matches tokens
    lowercase: bool = True
    min_token_length: int = Field(2, ge=1)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression ({e})") from None
        return v


class StopwordsConfig(Section):
    enabled: bool = True
    language: str = "english"
    extra: list[str] = []  # added to the language's list
    case_sensitive: bool = False

    @field_validator("language")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in STOPWORD_LANGUAGES:
            raise ValueError(f"unknown language {v!r}; use one of {', '.join(STOPWORD_LANGUAGES)}")
        return v


class NGramConfig(Section):
    n: int = Field(1, ge=1, le=5)  # 1: words only; n >= 2 adds n-grams to the words


class TermFrequencyConfig(Section):
    method: Literal["hashing", "count"] = "hashing"
    num_features: int = Field(1 << 16, ge=2)  # hash buckets, or vocabulary size for count
    min_df: float = Field(1.0, gt=0)  # count only: min documents (>= 1) or fraction (< 1)
    binary: bool = False


class IdfConfig(Section):
    enabled: bool = True
    min_doc_freq: int = Field(0, ge=0)


class Word2VecConfig(Section):
    enabled: bool = False
    vector_size: int = Field(100, ge=1)
    min_count: int = Field(5, ge=0)
    max_iter: int = Field(1, ge=1)
    seed: int = 42


class SequenceConfig(Section):
    """Token ids for the deep text models: 0 is padding, 1 unknown, then the vocabulary."""

    enabled: bool = True
    vocab_size: int = Field(20_000, ge=3)  # including [PAD] and [UNK]
    min_df: float = Field(2.0, gt=0)  # documents (>= 1) or fraction (< 1) a word must be in
    max_length: int = Field(256, ge=1)  # longer documents keep their first max_length tokens


class FeaturesConfig(Section):
    tokenizer: TokenizerConfig = TokenizerConfig()
    stopwords: StopwordsConfig = StopwordsConfig()
    ngram: NGramConfig = NGramConfig()
    tf: TermFrequencyConfig = TermFrequencyConfig()
    idf: IdfConfig = IdfConfig()
    word2vec: Word2VecConfig = Word2VecConfig()
    sequence: SequenceConfig = SequenceConfig()
    # incremental ingest: fit the feature model (IDF, vocabularies) again on every batch, never
    # (new rows get the first fit's transform), or when a batch's out-of-vocabulary rate
    # exceeds the training rows' rate at the fit by more than max_oov_increase
    refit: Literal["always", "never", "when_drift"] = "when_drift"
    max_oov_increase: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> FeaturesConfig:
        if self.tf.method == "hashing" and self.tf.min_df != 1.0:
            raise ValueError(
                "features.tf.min_df only applies to features.tf.method=count; "
                "remove it or set features.tf.method=count"
            )
        return self


# --- baseline ----------------------------------------------------------------------------------


class GridConfig(Section):
    # a decade apart from 1e-6 to 1e-1: MLlib's regParam scales the mean loss, so the
    # optimum shrinks as the training set grows (about 1 / (C * n) in scikit-learn's terms)
    reg_param: list[float] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    elastic_net_param: list[float] = [0.0]
    max_iter: list[int] = [100]
    # whether MLlib scales each feature by its standard deviation before penalising; which
    # wins depends on the corpus (see docs/baseline.md), so both are tried
    standardization: list[bool] = [False, True]

    @model_validator(mode="after")
    def _ranges(self) -> GridConfig:
        for name, values, ok, rule in (
            ("reg_param", self.reg_param, lambda x: x >= 0, ">= 0"),
            ("elastic_net_param", self.elastic_net_param, lambda x: 0 <= x <= 1, "in [0, 1]"),
            ("max_iter", self.max_iter, lambda x: x >= 1, ">= 1"),
            ("standardization", self.standardization, lambda x: True, "true or false"),
        ):
            if not values:
                raise ValueError(f"baseline.grid.{name} is empty; give at least one value")
            bad = [v for v in values if not ok(v)]
            if bad:
                raise ValueError(f"baseline.grid.{name} values must be {rule}; got {bad}")
        return self


class BaselineConfig(Section):
    # features: TF-IDF (features stage); word2vec: its averaged word vectors; embedding: the
    # embed stage's vectors; features+embedding: TF-IDF and embedding side by side (by id)
    features_col: Literal["features", "word2vec", "embedding", "features+embedding"] = "features"
    # validation: one fit per grid point on the training split, scored on the validation
    # split ingest made (no refit); cross_validation and train_validation_split re-split
    # the training split (num_folds + 1, or 1 + 1 fits per point); none: the first point
    tuning: Literal["validation", "cross_validation", "train_validation_split", "none"] = (
        "validation"
    )
    num_folds: int = Field(3, ge=2)
    train_ratio: float = Field(0.8, gt=0, lt=1)  # train_validation_split only
    # fits run at once; fewer when that many coefficient matrices would not fit the driver
    parallelism: int = Field(2, ge=1)
    # null: as many partitions as Spark has cores (MLlib runs one task per partition)
    partitions: int | None = Field(None, ge=1)
    # balanced: weight each training row by n / (classes * rows of its class)
    class_weight: Literal["none", "balanced"] = "none"
    metric: Literal["f1", "accuracy", "weightedPrecision", "weightedRecall"] = "f1"
    grid: GridConfig = GridConfig()
    seed: int = 42


# --- embed --------------------------------------------------------------------------------------


class EmbedConfig(Section):
    """The `embed` stage: every ingested text through a pretrained encoder, in Spark (one
    model load per Python worker), as an ML vector column for the MLlib baselines."""

    # a local Hugging Face encoder directory (config.json, model.safetensors or
    # pytorch_model.bin, tokenizer.json or vocab.txt), as save_pretrained writes it
    model: str | None = None
    pooling: Literal["mean", "cls"] = "mean"  # mean of the real tokens, or the CLS token
    normalize: bool = False  # L2-normalize each vector
    max_length: int = Field(256, ge=8)  # tokens per text; capped at the model's own limit
    batch_size: int = Field(32, ge=1)  # texts per forward pass
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # half precision: CUDA only
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the worker has one

    @model_validator(mode="after")
    def _half_on_gpu(self) -> EmbedConfig:
        if self.device == "cpu" and self.dtype != "float32":
            raise ValueError(
                f"embed.dtype={self.dtype} runs on CUDA only and embed.device=cpu; set "
                "embed.dtype=float32 (or embed.device=auto on GPU executors)"
            )
        return self


# --- deep models (TorchDistributor) -----------------------------------------------------------


class DistributorConfig(Section):
    num_processes: int = Field(2, ge=1)
    local_mode: bool = (
        False  # False: one process per Spark task (barrier mode); True: torchrun on the driver
    )
    use_gpu: bool | None = None  # None: when the Spark conf gives tasks GPUs
    timeout_s: int = Field(600, ge=10)  # a hung rank fails the job after this
    # a failed training run is tried again this many times, resuming from its last checkpoint
    # (Spark never retries a failed barrier stage)
    max_retries: int = Field(1, ge=0)


class DeepStageConfig(Section):
    """What every deep stage has; each model adds its `model` section (images: `augment`),
    validated as that model's own dataclass of hyper-parameters (models/hparams.py)."""

    training: TrainingConfig = TrainingConfig()
    distributor: DistributorConfig = DistributorConfig()


class LSTMStageConfig(DeepStageConfig):
    model: LSTMParams = LSTMParams()


class TextCNNStageConfig(DeepStageConfig):
    model: TextCNNParams = TextCNNParams()


class CNNStageConfig(DeepStageConfig):
    model: CNNParams = CNNParams()
    augment: AugmentConfig = AugmentConfig()


class AlexNetStageConfig(DeepStageConfig):
    model: AlexNetParams = AlexNetParams()
    augment: AugmentConfig = AugmentConfig()


class WordPieceConfig(Section):
    vocab_size: int = Field(8000, ge=16)
    lowercase: bool = True
    min_frequency: int = Field(2, ge=1)
    sample_docs: int = Field(100_000, ge=1)  # training documents Spark draws for the driver
    vocab_file: str | None = None  # a local BERT vocab.txt to use instead of training one


class BertPretrainStageConfig(DeepStageConfig):
    """MLM + NSP on the ingested text's training split (validation/test for the metrics)."""

    tokenizer: WordPieceConfig = WordPieceConfig()
    model: BertParams = BertParams()
    # NSP accuracy saturates early; the total loss (MLM + NSP) is what keeps improving
    training: TrainingConfig = TrainingConfig(early_stopping=EarlyStoppingConfig(metric="val_loss"))
    max_length: int = Field(128, ge=8)  # [CLS] A [SEP] B [SEP]
    mask_probability: float = Field(0.15, gt=0, lt=1)
    # dynamic: a new mask every time a batch is made, in the training processes (RoBERTa);
    # static: masks drawn once in Spark and stored with the data (the original BERT recipe),
    # `static_copies` differently-masked copies of each training example (BERT's dupe_factor)
    masking: Literal["dynamic", "static"] = "dynamic"
    static_copies: int = Field(1, ge=1, le=100)

    @model_validator(mode="after")
    def _fits(self) -> BertPretrainStageConfig:
        if self.static_copies > 1 and self.masking != "static":
            raise ValueError(
                f"bert_pretrain.static_copies={self.static_copies} applies to static masking only; "
                "set bert_pretrain.masking=static, or drop static_copies (dynamic masking draws "
                "a new mask every epoch anyway)"
            )
        if self.max_length > self.model.max_position_embeddings:
            raise ValueError(
                f"bert_pretrain.max_length {self.max_length} exceeds model.max_position_embeddings "
                f"{self.model.max_position_embeddings}; lower one or raise the other"
            )
        return self


class BertFinetuneStageConfig(DeepStageConfig):
    """Sequence classification on the ingested text, from our pretraining or a local model."""

    # bert_pretrain: our pretraining stage's model; or a local Hugging Face directory of any
    # encoder AutoModelForSequenceClassification takes (bert, distilbert, roberta, electra,
    # ...), fine-tuned with its own tokenizer, special tokens and position limit
    init_from: str = "bert_pretrain"
    max_length: int = Field(256, ge=8)  # capped at the checkpoint's own position limit
    dropout: float = Field(0.1, ge=0, lt=1)  # bert_pretrain's model; a checkpoint keeps its own


class BPEConfig(Section):
    vocab_size: int = Field(8192, ge=258)  # 256 byte symbols + <|endoftext|> + merges
    min_frequency: int = Field(2, ge=1)
    sample_docs: int = Field(100_000, ge=1)  # training documents Spark draws for the driver
    # a local GPT-2 vocabulary instead of training one: a tokenizer.json, or a directory with
    # tokenizer.json or vocab.json + merges.txt (it must have <|endoftext|>)
    vocab_path: str | None = None


class GenerateSection(Section):
    """Sampling settings: the samples logged after training, and `sparkloom generate`'s defaults."""

    prompts: list[str] = ["The", "In a statement, the company said", "The match"]
    max_new_tokens: int = Field(60, ge=1)
    temperature: float = Field(0.8, ge=0)  # 0: greedy
    top_k: int = Field(40, ge=0)  # 0: off
    top_p: float = Field(0.95, gt=0, le=1)  # 1: off
    seed: int = 0


class GPT2StageConfig(DeepStageConfig):
    """Causal LM on the ingested text: byte-level BPE, packed blocks, GPT2LMHeadModel."""

    tokenizer: BPEConfig = BPEConfig()
    model: GPT2Params = GPT2Params()
    block_size: int = Field(128, ge=8)  # context length; blocks hold block_size + 1 tokens
    # a local Hugging Face GPT-2 directory to start from (continued pretraining); its own
    # tokenizer there is used unless tokenizer.vocab_path names another
    init_from: str | None = None
    # evaluation batches hold (B, T, vocab) logits: small batches keep GPT-2 124M at 1024
    # tokens within a GPU's memory
    training: TrainingConfig = TrainingConfig(
        early_stopping=EarlyStoppingConfig(metric="val_loss"), log_every_steps=10,
        eval_batch_size=16,
    )  # fmt: skip
    generate: GenerateSection = GenerateSection()

    @model_validator(mode="after")
    def _fits(self) -> GPT2StageConfig:
        n = self.model.n_positions
        if n is not None and self.block_size > n:
            raise ValueError(
                f"gpt2.block_size {self.block_size} exceeds model.n_positions {n}; lower "
                "block_size or raise n_positions"
            )
        return self


class RegisterConfig(Section):
    """The `register` stage: the best classifier of this pipeline becomes a new version of a
    registered model; the alias moves to it only if it beats the alias's current holder on
    `metric` on the same test split."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # None: pipeline.name
    metric: Literal["test_accuracy", "test_f1", "test_macro_f1", "test_loss"] = "test_accuracy"
    candidates: list[Stage] = []  # default: every classifier stage in pipeline.stages
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    # the alias moves only when the candidate beats the holder by more than this
    min_delta: float = Field(0.0, ge=0)
    # incremental data: candidate and holder are both scored on the test rows of batches up to
    # this one (recorded by id as dataset eval_set), so a new batch cannot move the yardstick
    eval_batch: int = Field(1, ge=1)

    @field_validator("candidates")
    @classmethod
    def _classifiers(cls, v: list[str]) -> list[str]:
        wrong = [s for s in v if s not in CLASSIFIERS]
        if wrong:
            raise ValueError(
                f"{wrong} are not classifiers; candidates come from {list(CLASSIFIERS)}"
            )
        return v


class DriftConfig(Section):
    """The `drift` stage (incremental data): the newest batch against the earlier batches'
    training rows; a warning line for each threshold crossed (docs/incremental.md)."""

    max_label_psi: float = Field(0.2, ge=0)  # population stability index of the labels
    max_length_psi: float = Field(0.2, ge=0)  # of document lengths, in the reference's deciles
    max_oov_increase: float = Field(0.05, ge=0, le=1)  # out-of-vocabulary rate, absolute
    max_pixel_shift: float = Field(0.05, ge=0, le=1)  # images: per-channel mean of x/255
    max_accuracy_drop: float = Field(0.05, ge=0, le=1)  # the champion, new rows vs frozen set
    champion: bool = True  # score the new batch with the registered champion, when there is one


class EvaluationConfig(Section):
    """How every classifier is audited beyond accuracy (docs/explain.md): calibration on the
    test split, accuracy by slice, and explanations. Only `calibrate` changes a model (it
    decides whether scoring applies the temperature), so only it joins the stages' config
    hash; slices and explanations are reported again without retraining."""

    # temperature: probabilities softmax(logits / T), T fitted on the validation split by
    # NLL, stored with the model and applied by batch scoring; none: T is still fitted and
    # reported (ECE before/after), not applied
    calibrate: Literal["none", "temperature"] = "none"
    bins: int = Field(15, ge=2, le=100)  # equal-width confidence bins of the ECE
    # ingested columns, Spark SQL expressions over them, or length_quartile (words per text)
    slices: list[str] = Field(default_factory=list)
    max_gap: float = Field(0.05, ge=0, le=1)  # a slice this far below overall accuracy: flagged
    top_terms: int = Field(10, ge=1, le=100)  # baseline: terms per class and sign
    examples_correct: int = Field(2, ge=0, le=50)  # deep text models: test rows explained
    examples_wrong: int = Field(2, ge=0, le=50)
    attribution_steps: int = Field(50, ge=4, le=1000)  # Integrated Gradients' path points
    # completeness: rows whose attributions miss the logit gap by more than this share are
    # redone with twice the steps, up to attribution_max_steps, then marked incomplete
    attribution_tolerance: float = Field(0.05, gt=0, le=1)
    attribution_max_steps: int = Field(400, ge=4, le=10_000)


class DistillConfig(Section):
    """The `distill` stage: a student (the `student` stage's own model, training and
    distributor settings, same seed) trained on a teacher's soft targets plus the labels:
    alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy.

    `teacher_logits: precomputed` (the default) scores every example once, in Spark, by
    batch scoring the teacher with its own tokenizer and preprocessing, and stores the
    logits with the training data. It works for every teacher (BERT reads WordPiece ids the
    student never sees), costs one teacher pass per example instead of one per example per
    epoch, and keeps the teacher off the training processes' memory and time.
    `on_the_fly` runs the teacher inside each training process on the student's own batch:
    for a teacher that reads the student's inputs (the LSTM or TextCNN of the same features
    stage), when the data is too large to store logits for, or changes from epoch to epoch.
    """

    teacher: Literal["bert", "lstm", "textcnn"] = "bert"
    student: Literal["lstm", "textcnn"] = "textcnn"
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)  # weight of the soft (teacher) term
    teacher_logits: Literal["precomputed", "on_the_fly"] = "precomputed"

    @model_validator(mode="after")
    def _shared_inputs(self) -> DistillConfig:
        if self.teacher_logits == "on_the_fly" and self.teacher == "bert":
            raise ValueError(
                "distill.teacher_logits=on_the_fly runs the teacher on the student's word ids; "
                "BERT reads its own WordPiece ids, so use teacher_logits=precomputed for it"
            )
        return self


class QuantizeConfig(Section):
    """The `quantize` stage: an int8 copy of a trained classifier, measured beside it on the
    test split. `dynamic` quantizes Linear, LSTM and Embedding layers (BERT: Linear);
    `static` also runs the CNNs' convolutions in int8 (cnn, alexnet, textcnn), with
    activation ranges observed on `calibration_rows` training rows; `auto` is static for the
    CNNs, dynamic otherwise."""

    source: Literal["lstm", "textcnn", "bert", "cnn", "alexnet"] = "bert"
    method: Literal["auto", "dynamic", "static"] = "auto"
    calibration_rows: int = Field(512, ge=1)  # training rows the static ranges come from
    threads: int = Field(1, ge=1)  # CPU threads for the throughput measurement

    @model_validator(mode="after")
    def _static_for_cnns(self) -> QuantizeConfig:
        if self.method == "static" and self.source not in STATIC_INT8:
            raise ValueError(
                f"quantize.method=static covers the CNNs {list(STATIC_INT8)}, not "
                f"'{self.source}' (no static int8 kernels for its embedding/LSTM/attention "
                "layers); use quantize.method=dynamic or auto"
            )
        return self


class ScoreConfig(Section):
    """The `score` stage: a split of the ingested data scored in batch by a registered model,
    through the same code as `sparkloom score` (raw text or images in, the model's own
    preprocessing), and checked against the labels."""

    model: str | None = None  # default: models:/<register.name>@<register.alias>
    split: Literal["train", "validation", "test"] = "test"

    @field_validator("model")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("models:/", "runs:/")):
            raise ValueError(
                f"'{v}': give models:/NAME@ALIAS, models:/NAME/VERSION or runs:/ID/model"
            )
        return v


# pydantic warns that a field named `register` shadows ABCMeta.register (every model class has
# it); the field is the `register` stage's section, and nothing here calls Config.register()
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


def stage_output(cfg: Config, stage: str) -> str | None:
    """The catalog dataset a stage writes, if any (pipelines.stages declares it): <stage>_model
    for the trained models, <source>_int8 for quantize."""
    output = SPECS[stage].output
    return None if output is None else output.format(name=stage, source=cfg.quantize.source)


class Config(Section):
    pipeline: PipelineConfig
    spark: SparkConfig = SparkConfig()
    preflight: PreflightConfig = PreflightConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ingest: IngestConfig | None = None
    features: FeaturesConfig = FeaturesConfig()
    baseline: BaselineConfig = BaselineConfig()
    embed: EmbedConfig = EmbedConfig()
    embed_baseline: BaselineConfig = BaselineConfig(features_col="embedding")
    lstm: LSTMStageConfig = LSTMStageConfig()
    textcnn: TextCNNStageConfig = TextCNNStageConfig()
    cnn: CNNStageConfig = CNNStageConfig()
    alexnet: AlexNetStageConfig = AlexNetStageConfig()
    bert_pretrain: BertPretrainStageConfig = BertPretrainStageConfig()
    bert: BertFinetuneStageConfig = BertFinetuneStageConfig()
    gpt2: GPT2StageConfig = GPT2StageConfig()
    distill: DistillConfig = DistillConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    register: RegisterConfig = RegisterConfig()
    score: ScoreConfig = ScoreConfig()
    drift: DriftConfig = DriftConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        stages = self.pipeline.stages
        if self.ingest is not None:
            kind = self.ingest.modality
            wrong = [s for s in stages if s in (IMAGE_MODELS if kind == "text" else TEXT_MODELS)]
            if wrong:
                raise ValueError(
                    f"stages {wrong} do not fit ingest.format={self.ingest.format} ({kind} data); "
                    f"use {list(TEXT_MODELS if kind == 'text' else IMAGE_MODELS)} for {kind}"
                )
        deep = [s for s in stages if SPECS[s].token_ids]
        if deep and not self.features.sequence.enabled:
            raise ValueError(
                f"stages {deep} train on token ids; set features.sequence.enabled=true"
            )
        for name in ("baseline", "embed_baseline"):
            if (
                getattr(self, name).features_col == "word2vec"
                and not self.features.word2vec.enabled
            ):
                raise ValueError(
                    f"{name}.features_col=word2vec needs features.word2vec.enabled=true"
                )
        if "embed" in stages and self.embed.model is None:
            raise ValueError(
                "stage embed needs embed.model: a local Hugging Face encoder directory "
                "(config.json, model.safetensors or pytorch_model.bin, tokenizer.json or vocab.txt)"
            )
        if "embed" in stages and self.modality == "image":
            raise ValueError("stage embed embeds text; remove it for image data")
        for name in ("bert_pretrain", "bert", "gpt2"):  # their tokenizers are trained anew
            if getattr(self, name).training.warm_start != "none":
                raise ValueError(
                    f"{name}.training.warm_start: warm starts match embeddings by word through "
                    "the features vocabulary, which lstm, textcnn, cnn and alexnet read; "
                    f"{name} trains its own tokenizer, so set it to none"
                )
        return self

    @property
    def modality(self) -> Literal["text", "image"]:
        """What the pipeline's data is (text without an ingest section)."""
        return self.ingest.modality if self.ingest is not None else "text"

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.pipeline.name

    def require_ingest(self) -> IngestConfig:
        if self.ingest is None:
            raise ConfigError(
                "this stage needs an 'ingest' section (format, path); add it to the YAML "
                "or pass ingest.format=... ingest.path=..."
            )
        return self.ingest

    def stage_hash(self, stage: str) -> str:
        """Hash of everything that decides a stage's output: its section and those upstream."""
        data = self.model_dump(mode="json")
        relevant = {s: _at(data, s) for s in DEPENDS[stage]}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _at(data: dict, key: str) -> Any:
    """data["a"]["b"] for "a.b": a stage can depend on one key of a section."""
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


# --- loading -----------------------------------------------------------------------------------


def load_config(paths: str | Path | list[str | Path], overrides: list[str] = ()) -> Config:
    """Merge YAML files left to right, apply `key.sub=value` overrides, validate."""
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise ConfigError("no config file given; pass --conf conf/<pipeline>.yaml")
    data: dict[str, Any] = {}
    for p in paths:
        data = _deep_merge(data, _read_yaml_with_extends(Path(p), seen=()))
    for ov in overrides:
        _apply_override(data, ov)
    return _validate(data)


def _read_yaml_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path} extends itself in a cycle; remove one 'extends' entry")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the --conf path")
    try:
        data = _load_yaml(path.read_text(), f"config file {path}") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at the top")
    parents = data.pop("extends", [])
    if not isinstance(parents, str) and not (
        isinstance(parents, list) and all(isinstance(p, str) for p in parents)
    ):
        raise ConfigError(f"'extends' in {path} must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = _deep_merge(merged, _read_yaml_with_extends(path.parent / parent, (*seen, path)))
    return _deep_merge(merged, data)


# Anchors and aliases stay allowed (`<<: *defaults` merges are common), but not how far they
# expand: nine nested lists of ten aliases ("billion laughs") parse in a millisecond into a
# structure that validation, the error formatter and the MLflow params then walk 10^9 times.
_MAX_YAML_NODES = 1_000_000


def _load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past _MAX_YAML_NODES nodes or
    contain themselves."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded, written = _yaml_size(node, where)
        if expanded > _MAX_YAML_NODES and expanded > written:
            raise ConfigError(
                f"{where} uses YAML aliases that expand to more than {_MAX_YAML_NODES:,} values;"
                " write the repeated parts out, or reuse whole sections with `<<: *anchor`"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply to be a config; flatten it") from None
    finally:
        loader.dispose()


def _yaml_size(root: yaml.Node, where: str) -> tuple[int, int]:
    """(nodes once every alias is expanded, nodes written in the text); linear in the latter."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise ConfigError(
                f"{where} has a YAML alias inside its own anchor (a value that contains itself);"
                " remove that alias"
            )
        open_.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(size(child) for child in children)
        open_.discard(id(node))
        return sizes[id(node)]

    return size(root), len(sizes)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep:
        raise ConfigError(
            f"override {_capped(override)} is not key=value; write e.g. ingest.split.seed=7"
        )
    if not key:  # the value may be a secret: not shown
        raise ConfigError("an override has no key before '='; write e.g. ingest.split.seed=7")
    try:
        value = _load_yaml(raw, f"override {key}=...") if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node, model = data, Config
    for i, part in enumerate(parts[:-1]):
        annotation = _fields(model).get(part)
        if get_origin(annotation) is dict:
            # free-form maps (spark.conf) take the rest of the dotted key as one key
            node.setdefault(part, {})[".".join(parts[i + 1 :])] = value
            return
        model = _section_class(annotation)
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _section_class(annotation: Any) -> type | None:
    """The section type a field holds (a Section, or a models/ dataclass), if any."""
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and (issubclass(t, Section) or is_dataclass(t)):
            return t
    return None


@functools.cache
def _fields(model: type | None) -> dict[str, Any]:
    """A section's keys and their types (a dataclass's annotations are strings here: resolved)."""
    if model is None:
        return {}
    if is_dataclass(model):
        hints = get_type_hints(model)
        return {f.name: hints[f.name] for f in dataclass_fields(model)}
    return {name: f.annotation for name, f in model.model_fields.items()}


def _validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, data)) from None


# pydantic adds the member's type to the path of a `str | int | ...` field: not a key to set
_UNION_MEMBER = re.compile(r"(str|int|float|bool|bytes|none|(list|dict|tuple|set)\[.*\])")


_CLASS_FIELD = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:Params|Config)(\.(?=\w)|:(?= ))")


def _explain(err: ValidationError, data: dict[str, Any]) -> str:
    lines: list[str | tuple[str, str]] = []  # a type error: (key, value shown), said once
    wanted: dict[str, list[str]] = {}  # key -> what each member of its union accepts
    for e in err.errors():
        loc = [str(x) for x in e["loc"] if not str(x).startswith(("function-", "literal"))]
        # pydantic adds the union member's class name to the path of `X | None` fields
        loc = [x for x in loc if not x[:1].isupper() and not _UNION_MEMBER.fullmatch(x)]
        key = ".".join(loc) or "<top level>"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # dataclass: the 2nd
            lines.append(f"unknown key '{key}'{_did_you_mean(loc)}")
        elif e["type"] == "dataclass_type":
            lines.append(f"{key}: must be a mapping (got {_shown(loc, e.get('input'))})")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'; add it to the YAML or pass {key}=...")
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            # a models/ dataclass names its field as Class.field: say the YAML key instead
            msg = _CLASS_FIELD.sub(lambda m, key=key: key + m[1], msg, count=1)
            plain = key == "<top level>" or msg.startswith((key + ".", key + ":"))
            lines.append(msg if plain else f"{key}: {msg}")
        else:
            if key not in wanted:
                lines.append((key, _shown(loc, e.get("input"))))
            wanted.setdefault(key, []).append(str(e["msg"]).lower())
    out = []
    for line in lines:
        if isinstance(line, tuple):
            key, shown = line
            first, *more = wanted[key]
            said = first + "".join(
                f"{' or' if i == len(more) - 1 else ','} {m.removeprefix('input should be ')}"
                for i, m in enumerate(more)
            )
            line = f"{key}: {said} (got {shown}); fix it in the YAML or pass {key}=..."
        out.append(line)
    return "bad config: " + "; ".join(out)


def _shown(loc: list[str], value: Any) -> str:
    """A rejected value as an error may show it: never a secret's, never more than 80 chars."""
    from sparkloom.pipelines.secrets import is_secret

    if any(is_secret(".".join(loc[: i + 1])) for i in range(len(loc))):
        return "a value, hidden because the key names a secret"
    return "a mapping" if isinstance(value, dict) else _capped(value)


def _capped(value: Any, limit: int = 80) -> str:
    import reprlib

    # reprlib, not repr: it stops after a few items per level, so a huge value costs nothing
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _did_you_mean(loc: list[str]) -> str:
    model: type | None = Config
    for part in loc[:-1]:
        model = _section_class(_fields(model).get(part))
    if model is None:
        return ""
    known = list(_fields(model))
    close = difflib.get_close_matches(loc[-1], known, n=1)
    where = ".".join(loc[:-1])
    hint = f"; did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
    return f"{hint} (keys allowed{' under ' + where if where else ''}: {', '.join(known)})"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def flatten(cfg: Config) -> dict[str, str]:
    """`section.key` -> value strings, for MLflow params (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list | dict):
            out[prefix] = json.dumps(node)
        else:
            out[prefix] = "" if node is None else str(node)

    walk("", cfg.model_dump(mode="json"))
    return out
