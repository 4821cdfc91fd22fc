"""Every stage, declared once: what it is, what decides its output, what it writes.

The lists the rest of the code asks about (the stages a config may name, the classifiers
`register` and `compare` take, the text and image models, what `score` can load, which
stages `sparkloom <stage>` offers) are derived from `REGISTRY`, so adding a stage is one
entry here plus its code. This module imports nothing of ours: `config` builds its types
from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    cli: bool = True  # a `sparkloom <name>` command of its own
    # the catalog dataset it writes: None for none; models write <name>_model by default
    output: str | None = "{name}_model"


REGISTRY: tuple[StageSpec, ...] = (
    StageSpec("ingest", "data", ("ingest",), output="ingested"),
    StageSpec("features", "data", ("ingest", "features"), output="features"),
    StageSpec("baseline", "classifier", ("ingest", "features", "baseline")),
    StageSpec(
        "lstm", "classifier", ("ingest", "features", "lstm"), "text", torch=True, token_ids=True
    ),  # fmt: skip
    StageSpec(
        "textcnn",
        "classifier",
        ("ingest", "features", "textcnn"),
        "text",
        torch=True,
        token_ids=True,
        static_int8=True,
    ),  # fmt: skip
    StageSpec("cnn", "classifier", ("ingest", "cnn"), "image", torch=True, static_int8=True),
    StageSpec(
        "alexnet", "classifier", ("ingest", "alexnet"), "image", torch=True, static_int8=True
    ),  # fmt: skip
    StageSpec(
        "bert_pretrain", "language_model", ("ingest", "bert_pretrain"), "text", torch=True
    ),  # fmt: skip
    StageSpec("bert", "classifier", ("ingest", "bert_pretrain", "bert"), "text", torch=True),
    # the student's own section, and everything the teacher came from (its model's
    # fingerprint joins in the stage)
    StageSpec(
        "distill",
        "classifier",
        ("ingest", "features", "distill", "lstm", "textcnn", "bert_pretrain", "bert"),
        "text",
        torch=True,
        token_ids=True,
    ),  # fmt: skip
    StageSpec("gpt2", "language_model", ("ingest", "gpt2"), "text", torch=True),
    # and the source model (its fingerprint, in the stage); writes <source>_int8
    StageSpec("quantize", "classifier", ("quantize",), output="{source}_int8"),
    StageSpec("register", "action", ("register",), output=None),
    # and the model the alias names (in the stage's fingerprint)
    StageSpec("score", "action", ("ingest", "score"), cli=False, output="scores"),
    StageSpec("compare", "action", (), cli=False, output=None),
)
SPECS = {s.name: s for s in REGISTRY}


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
STAGE_COMMANDS = names(cli=True)
DEPENDS = {s.name: s.depends for s in REGISTRY}
