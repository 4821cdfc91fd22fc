"""Every stage, declared once: what it is, what decides its output, what it writes.

The lists the rest of the code asks about (the stages a config may name, the classifiers
`register` and `compare` take, the text and image models, what `score` can load, which
stages `sparkloom <stage>` offers) are derived from `REGISTRY`, so adding a stage is one
entry here plus its code. This module imports nothing of ours: `config` builds its types
from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["data", "classifier", "language_model", "action"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: Kind
    # config sections that decide the output: its own and those upstream of it
    depends: tuple[str, ...]
    # what it trains on: text or image rows; None for stages of either modality
    modality: Literal["text", "image"] | None = None
    torch: bool = False  # trained by TorchDistributor (the deep stages)
    token_ids: bool = False  # reads the features stage's token ids (features.sequence)
    static_int8: bool = False  # quantize.method=static has kernels for all its layers
    spark_model: bool = False  # its model is a Spark PipelineModel (raw input -> probability)
    cli: bool = True  # a `sparkloom <name>` command of its own
    # the catalog dataset it writes: None for none; models write <name>_model by default
    output: str | None = "{name}_model"
    # the catalog datasets it reads, the rows first (their fingerprints join its own): a
    # tuple, or a function of the config where a setting picks them
    inputs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()

    def inputs_for(self, cfg: Any) -> tuple[str, ...]:
        return self.inputs(cfg) if callable(self.inputs) else self.inputs


# whether scoring applies the fitted temperature: part of every classifier's model
CALIBRATE = "evaluation.calibrate"
FEATURES, INGESTED, EMBEDDINGS = ("features",), ("ingested",), ("embeddings",)


def _baseline_inputs(section: str) -> Callable[[Any], tuple[str, ...]]:
    """An MLlib baseline reads what its features_col names: TF-IDF/word2vec from features,
    the embed stage's vectors, or both (joined by id)."""

    def inputs(cfg: Any) -> tuple[str, ...]:
        col = getattr(cfg, section).features_col
        return {"embedding": EMBEDDINGS, "features+embedding": FEATURES + EMBEDDINGS}.get(
            col, FEATURES
        )

    return inputs


def _bert_inputs(cfg: Any) -> tuple[str, ...]:
    return INGESTED + (("bert_pretrain_model",) if cfg.bert.init_from == "bert_pretrain" else ())


REGISTRY: tuple[StageSpec, ...] = (
    StageSpec("ingest", "data", ("ingest",), output="ingested"),  # and its files' fingerprint
    # the newest incremental batch against the earlier training rows: labels, lengths, words
    # or pixels, and the champion's accuracy on it; before features, so the words are measured
    # against the vocabulary the models trained with
    StageSpec(
        "drift", "action", ("ingest", "features", "drift"), output="drift_report", inputs=INGESTED
    ),  # fmt: skip
    StageSpec("features", "data", ("ingest", "features"), output="features", inputs=INGESTED),
    StageSpec(
        "baseline",
        "classifier",
        ("ingest", "features", "baseline", CALIBRATE),
        spark_model=True,
        inputs=_baseline_inputs("baseline"),
    ),  # fmt: skip
    # a pretrained encoder's vectors of every ingested text (the model directory's
    # fingerprint joins its own)
    StageSpec("embed", "data", ("ingest", "embed"), "text", output="embeddings", inputs=INGESTED),
    # the baseline's code on the embeddings (embed_baseline.features_col, default embedding)
    StageSpec(
        "embed_baseline",
        "classifier",
        ("ingest", "features", "embed", "embed_baseline", CALIBRATE),
        "text",
        spark_model=True,
        inputs=_baseline_inputs("embed_baseline"),
    ),  # fmt: skip
    StageSpec(
        "lstm",
        "classifier",
        ("ingest", "features", "lstm", CALIBRATE),
        "text",
        torch=True,
        token_ids=True,
        inputs=FEATURES,
    ),  # fmt: skip
    StageSpec(
        "textcnn",
        "classifier",
        ("ingest", "features", "textcnn", CALIBRATE),
        "text",
        torch=True,
        token_ids=True,
        static_int8=True,
        inputs=FEATURES,
    ),  # fmt: skip
    StageSpec(
        "cnn",
        "classifier",
        ("ingest", "cnn", CALIBRATE),
        "image",
        torch=True,
        static_int8=True,
        inputs=INGESTED,
    ),  # fmt: skip
    StageSpec(
        "alexnet",
        "classifier",
        ("ingest", "alexnet", CALIBRATE),
        "image",
        torch=True,
        static_int8=True,
        inputs=INGESTED,
    ),  # fmt: skip
    StageSpec(
        "bert_pretrain",
        "language_model",
        ("ingest", "bert_pretrain"),
        "text",
        torch=True,
        inputs=INGESTED,
    ),  # fmt: skip
    StageSpec(
        "bert",
        "classifier",
        ("ingest", "bert_pretrain", "bert", CALIBRATE),
        "text",
        torch=True,
        inputs=_bert_inputs,
    ),  # fmt: skip
    # the student's own section, and everything the teacher came from; it reads the
    # teacher's current model too
    StageSpec(
        "distill",
        "classifier",
        ("ingest", "features", "distill", "lstm", "textcnn", "bert_pretrain", "bert", CALIBRATE),
        "text",
        torch=True,
        token_ids=True,
        inputs=lambda cfg: FEATURES + (f"{cfg.distill.teacher}_model",),
    ),  # fmt: skip
    StageSpec("gpt2", "language_model", ("ingest", "gpt2"), "text", torch=True, inputs=INGESTED),
    StageSpec(
        "quantize",
        "classifier",
        ("quantize",),
        output="{source}_int8",
        inputs=lambda cfg: (f"{cfg.quantize.source}_model",),
    ),  # fmt: skip
    # its decision, so a rerun with the same candidate models and champion is skipped
    StageSpec("register", "action", ("register",), output="register_decision"),
    # and the run of the model the alias names
    StageSpec("score", "action", ("ingest", "score"), cli=False, output="scores", inputs=INGESTED),
    StageSpec("compare", "action", (), cli=False, output=None),
)
SPECS = {s.name: s for s in REGISTRY}


def maker(dataset: str) -> str:
    """The stage that writes `dataset` (ingested -> ingest, lstm_model -> lstm)."""
    for spec in REGISTRY:
        if spec.output and spec.output.format(name=spec.name, source="") == dataset:
            return spec.name
    raise KeyError(f"no stage writes dataset {dataset!r}")


def names(**where: object) -> tuple[str, ...]:
    """The stages whose fields equal `where`, in pipeline order: names(kind="classifier")."""
    return tuple(s.name for s in REGISTRY if all(getattr(s, k) == v for k, v in where.items()))


STAGES = names()
CLASSIFIERS = names(kind="classifier")
LANGUAGE_MODELS = names(kind="language_model")
TEXT_MODELS = names(torch=True, modality="text")
IMAGE_MODELS = names(torch=True, modality="image")
DEEP_STAGES = names(torch=True)
STATIC_INT8 = names(static_int8=True)
SPARK_MODELS = names(spark_model=True)
STAGE_COMMANDS = names(cli=True)
DEPENDS = {s.name: s.depends for s in REGISTRY}
