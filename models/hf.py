"""Local Hugging Face directories (as `save_pretrained` writes them): checks before loading,
their tokenizer as one `tokenizers` JSON, and any encoder with a sequence-classification head.

Nothing here downloads: every load is `local_files_only`, and a directory that lacks a file
fails with the path and the names looked for.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparkloom.models.outputs import ClassifierOutput

# what save_pretrained writes: one safetensors file, a sharded index, or the older .bin
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# what AutoTokenizer builds a fast (Rust) tokenizer from, in the order it prefers them
TOKENIZER_FILES = (
    ("tokenizer.json",),  # any fast tokenizer
    ("vocab.txt",),  # WordPiece: BERT, DistilBERT, ELECTRA
    ("vocab.json", "merges.txt"),  # byte-level BPE: GPT-2, RoBERTa
    ("spiece.model",),  # SentencePiece: ALBERT, T5, XLNet
    ("sentencepiece.bpe.model",),  # SentencePiece BPE: XLM-RoBERTa, CamemBERT
)
# models whose position ids start after the padding id (RoBERTa's offset of pad_token_id + 1)
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text")


def check_hf_directory(
    path: str | os.PathLike, model_type: str | None = None, name: str = "Hugging Face"
) -> str:
    """`path` as a str, once it holds config.json (of `model_type`, when given) and weights;
    otherwise an error naming the path and what is missing (never a download attempt)."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no config.json in {path!r}: expected a local Hugging Face {name} directory "
            f"(config.json + one of {WEIGHT_FILES}, as save_pretrained writes it)"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise FileNotFoundError(f"no weights in {path!r}: expected one of {WEIGHT_FILES}")
    found = hf_config(path).get("model_type")
    if model_type is not None and found != model_type:
        raise ValueError(f"{path!r} holds a {found!r} model, not a {name} one")
    return path


def hf_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def quiet() -> None:
    """transformers' progress bars and load-report tables off: we report keys by name."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest input the model's position embeddings take (None: no such limit)."""
    n = config.get("max_position_embeddings") or config.get("n_positions")
    if n and config.get("model_type") in OFFSET_POSITIONS:
        n -= (config.get("pad_token_id") or 1) + 1
    return n


@dataclass
class TokenizerInfo:
    pad_token_id: int
    max_length: int | None  # the tokenizer's and the model's limit, whichever is lower
    files: list[str] = field(default_factory=list)  # what it was built from
    special_tokens: dict[str, str] = field(default_factory=dict)


def load_tokenizer(path: str) -> tuple[str, TokenizerInfo]:
    """The directory's own tokenizer as a `tokenizers` JSON string (its normalizer,
    pre-tokenizer, model and special-token template; padding and truncation off, so the
    caller sets max_length), and what the models need to know of it."""
    path = os.fspath(path)
    found = next(
        (g for g in TOKENIZER_FILES if all(os.path.isfile(os.path.join(path, f)) for f in g)),
        None,
    )
    if found is None:
        looked = ", ".join(" + ".join(g) for g in TOKENIZER_FILES)
        raise FileNotFoundError(
            f"no tokenizer in {path!r}: looked for {looked}; save the model's tokenizer there "
            "(tokenizer.save_pretrained(path))"
        )
    from transformers import AutoTokenizer

    quiet()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"the tokenizer in {path!r} has no fast (Rust) version; save a tokenizer.json there"
        )
    backend.no_padding()
    backend.no_truncation()
    limits = [
        n
        for n in (
            tok.model_max_length,
            max_positions(hf_config(path))
            if os.path.isfile(os.path.join(path, "config.json"))
            else None,
        )
        if n and n < 1_000_000
    ]  # fmt: skip  (an unset model_max_length is ~1e30)
    pad = tok.pad_token_id
    if pad is None:  # GPT-2 has none: pad with end-of-text, which the attention mask hides
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    special = {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    return backend.to_str(), TokenizerInfo(pad, min(limits) if limits else None, list(found),
                                           special)  # fmt: skip


def tokenizer_files(path: str) -> dict[str, str]:
    """The text files `AutoTokenizer.from_pretrained` reads back, as `save_pretrained` writes
    them for the directory's tokenizer (kept beside a fine-tuned model)."""
    from transformers import AutoTokenizer

    quiet()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            try:
                with open(os.path.join(tmp, name), encoding="utf-8") as f:
                    out[name] = f.read()
            except UnicodeDecodeError:  # a binary SentencePiece model: tokenizer.json has it all
                continue
        return out


# --- any encoder with a sequence-classification head ----------------------------------------


@dataclass(kw_only=True)
class HFClassifierConfig:
    """What rebuilds a fine-tuned Hugging Face classifier: its config.json (with the head's
    size and our label names) and the tokenizer's padding id."""

    hf_config: dict[str, Any]
    num_classes: int
    pad_token_id: int = 0  # ids are right-padded with it; the attention mask hides them
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {self.num_classes}")
        if "model_type" not in self.hf_config:
            raise ValueError(
                "hf_config has no model_type: give a config.json as transformers writes it"
            )


def _config_from_dict(d: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


class HFClassifier(nn.Module):
    """`AutoModelForSequenceClassification` for any encoder (BERT, DistilBERT, RoBERTa,
    ELECTRA, ...), returning our ClassifierOutput. The transformers model is `self.hf`, so
    `save_pretrained` writes a directory transformers loads as it is."""

    task = "classify"

    def __init__(self, cfg: HFClassifierConfig, hf: nn.Module | None = None):
        """`hf`: the transformers model already loaded (from_pretrained); else one is built
        from `cfg.hf_config` (weights to be loaded into it)."""
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        quiet()
        self.cfg = cfg
        self.hf = hf or AutoModelForSequenceClassification.from_config(
            _config_from_dict(cfg.hf_config)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,  # one segment: the model's default (zeros)
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        pad = self.cfg.pad_token_id
        mask = (input_ids != pad) if attention_mask is None else attention_mask.bool()  # (B, T)
        # padding written as the model's own pad id: RoBERTa counts positions from it
        ids = input_ids.masked_fill(~mask, pad)
        logits = self.hf(input_ids=ids, attention_mask=mask.long()).logits  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=-100)
        return ClassifierOutput(logits, loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # layers, for layer-wise learning-rate decay and freezing (models.train.loop)
    @property
    def num_layers(self) -> int:
        return int(self.hf.config.num_hidden_layers)

    def layer_of(self, name: str) -> int:
        """0 for the embeddings, i + 1 for transformer layer i, num_layers + 1 for the rest
        (pooler, head)."""
        name = name.removeprefix("module.").removeprefix("hf.")
        base = self.hf.base_model_prefix
        if name.startswith(f"{base}.") and ".embeddings." in f".{name}":
            return 0
        m = _LAYER.search(name)
        if name.startswith(f"{base}.") and m:
            return int(m.group(1)) + 1
        return self.num_layers + 1

    @classmethod
    def from_pretrained(
        cls, path: str, num_classes: int, pad_token_id: int = 0, labels: list[str] | None = None
    ) -> HFClassifier:
        """The encoder at `path` with a `num_classes` head: a head of another size (or none)
        starts anew, and is reported; any other missing weight is an error that names it."""
        from transformers import AutoModelForSequenceClassification

        check_hf_directory(path)
        quiet()
        labels = list(labels or [str(i) for i in range(num_classes)])
        hf, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_classes, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True,  # a saved head with another class count starts anew
            id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
        )  # fmt: skip
        report = loading_report(hf, info)
        if report.missing_encoder:
            raise ValueError(
                f"the checkpoint at {path!r} lacks encoder weights: "
                f"{', '.join(report.missing_encoder[:8])}"
                + (
                    f" and {len(report.missing_encoder) - 8} more"
                    if len(report.missing_encoder) > 8
                    else ""
                )
                + "; they would start random. Give a complete checkpoint (save_pretrained of the "
                "whole model)"
            )
        # the loaded model itself: building one from the config first would allocate and
        # randomly initialise a second copy of the encoder in every rank, only to drop it
        model = cls(HFClassifierConfig(hf_config=hf.config.to_dict(), num_classes=num_classes,
                                       pad_token_id=pad_token_id, labels=labels), hf)  # fmt: skip
        model.loading = report
        return model

    def save_pretrained(self, directory: str) -> None:
        self.hf.save_pretrained(directory, safe_serialization=True)

    def load_pretrained_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The weights `save_pretrained` wrote (model.safetensors, loaded), strictly but for
        the tied copies it leaves out."""
        missing, unexpected = self.hf.load_state_dict(state, strict=False)
        tied = set(getattr(self.hf, "all_tied_weights_keys", None) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError("the saved weights do not fit the model of its config.json: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")  # fmt: skip
        self.hf.tie_weights()


@dataclass
class LoadingReport:
    """What from_pretrained did with the checkpoint's weights, by name."""

    new_head: list[str]  # the classification head (and a pooler the checkpoint lacks)
    missing_encoder: list[str]
    unexpected: list[str]  # in the checkpoint, unused (e.g. a pretraining head)
    mismatched: list[str]

    def summary(self) -> str:
        parts = [f"new head ({', '.join(sorted(self.new_head))})" if self.new_head else
                 "the checkpoint's own head"]  # fmt: skip
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint weights unused: "
                         f"{', '.join(sorted(self.unexpected)[:6])}")  # fmt: skip
        if self.mismatched:
            parts.append(f"resized: {', '.join(sorted(self.mismatched))}")
        return "; ".join(parts)


def loading_report(hf: nn.Module, info: dict[str, Any]) -> LoadingReport:
    base = hf.base_model_prefix
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(
        k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or []
    )
    head = [k for k in missing if not k.startswith(f"{base}.") or ".pooler." in f".{k}"]
    encoder = [k for k in missing if k not in head]
    return LoadingReport(sorted(set(head) | set(mismatched)), encoder,
                         sorted(info.get("unexpected_keys") or []), mismatched)  # fmt: skip
