"""BERT (Devlin et al., 2019) on transformers: pretraining (MLM + NSP) and sequence classification.

Sizes follow Turc et al. (2019), "Well-Read Students Learn Better": BERT-Tiny to BERT-Base.
Both models hold the transformers modules under transformers' own attribute names (`bert`, `cls`,
`classifier`), so their state dicts are exactly those of BertForPreTraining and
BertForSequenceClassification: checkpoints move between here and Hugging Face with no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from sparkloom.models.heads import padding_mask
from sparkloom.models.hf import check_hf_directory
from sparkloom.models.hparams import (
    BertDims,
    BertParams,
    at_least_one,
    index_below,
    one_of,
)
from sparkloom.models.outputs import ClassifierOutput, PretrainingOutput

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
ENCODER_PREFIXES = ("bert.embeddings.", "bert.encoder.", "bert.pooler.")


@dataclass(kw_only=True)
class BertConfig(BertParams):
    """What builds the model: the hyper-parameters and what the data or the task decides."""

    vocab_size: int = 30522
    type_vocab_size: int = 2
    pad_token_id: int = 0
    num_classes: int = 0  # 0: the pretraining model; >= 2: the classifier
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least_one(self, "vocab_size", "type_vocab_size")
        index_below(self, "pad_token_id", "vocab_size")
        if self.num_classes == 1 or self.num_classes < 0:
            raise ValueError(
                f"BertConfig.num_classes must be 0 (pretraining) or >= 2 (classifier), "
                f"got {self.num_classes}"
            )
        one_of(self, "attn_implementation", ATTN_IMPLEMENTATIONS)

    def to_hf(self) -> transformers.BertConfig:
        extra = {"num_labels": self.num_classes} if self.num_classes else {}
        return transformers.BertConfig(
            vocab_size=self.vocab_size,
            **self.dims._asdict(),
            hidden_dropout_prob=self.hidden_dropout,
            attention_probs_dropout_prob=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            pad_token_id=self.pad_token_id,
            attn_implementation=self.attn_implementation,
            **extra,
        )

    @classmethod
    def from_hf(cls, hf: transformers.BertConfig, **overrides: Any) -> BertConfig:
        """Our config for a transformers one; raises if ours cannot rebuild the same model."""
        # Ours always builds with transformers' defaults for these; a checkpoint trained with
        # others would load but compute something else after an export + rebuild.
        defaults = transformers.BertConfig()
        for name in ("hidden_act", "layer_norm_eps", "is_decoder", "add_cross_attention"):
            if getattr(hf, name) != getattr(defaults, name):
                raise ValueError(
                    f"the Hugging Face config sets {name}={getattr(hf, name)!r}; BertConfig only "
                    f"builds models with {name}={getattr(defaults, name)!r}"
                )
        return cls(
            vocab_size=hf.vocab_size,
            preset=None,
            **{k: getattr(hf, k) for k in BertDims._fields},
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            hidden_dropout=hf.hidden_dropout_prob,
            attention_dropout=hf.attention_probs_dropout_prob,
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
            **overrides,
        )


def _mlm_metrics(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, correct, count) over the positions whose label is not -100."""
    chosen = labels != -100  # (B, T)
    count = chosen.sum()
    loss = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )  # (B*T, V) against (B*T,)
    # Sum / max(count, 1) rather than the mean: a batch that drew no masked position gives 0,
    # not NaN, and the value is the mean otherwise.
    loss = loss / count.clamp(min=1)
    correct = ((logits.argmax(-1) == labels) & chosen).sum()
    return loss, correct, count


class BertPretrainer(nn.Module):
    """BertForPreTraining's encoder and heads: masked LM + next sentence prediction.

    Returns a PretrainingOutput: `logits` are the NSP logits (B, 2), which the Pretrain task
    scores as a two-class classification; `prediction_logits` the MLM scores (B, T, V).
    """

    task = "pretrain"  # models.train.tasks: MLM + NSP, reported per masked token and pair
    num_labels = 2  # what `logits` classify: is B the next segment (0) or random (1)

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.num_classes != 0:
            raise ValueError(
                f"BertPretrainer needs BertConfig.num_classes=0, got {cfg.num_classes}; "
                f"num_classes is for BertClassifier"
            )
        self.cfg = cfg
        hf = transformers.BertForPreTraining(cfg.to_hf())
        # Its parts, not the wrapper: the state dict keys stay transformers' ("bert.*", "cls.*"),
        # and the MLM decoder stays tied to the word embeddings (one shared Parameter).
        self.bert = hf.bert  # BertEmbeddings -> BertEncoder -> BertPooler
        self.cls = hf.cls  # BertPreTrainingHeads: MLM decoder and NSP classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
    ) -> PretrainingOutput:
        """The loss is the sum of the losses whose labels are given; None without any."""
        mask = padding_mask(input_ids, attention_mask, self.cfg.pad_token_id)  # (B, T)
        out = self.bert(input_ids, attention_mask=mask.long(), token_type_ids=token_type_ids)
        # sequence (B, T, H) and pooled [CLS] (B, H) -> MLM (B, T, V) and NSP (B, 2) logits
        mlm_logits, nsp_logits = self.cls(out.last_hidden_state, out.pooler_output)
        out = PretrainingOutput(nsp_logits, mlm_logits)
        if mlm_labels is not None:
            out.mlm_loss, out.mlm_correct, out.mlm_count = _mlm_metrics(mlm_logits, mlm_labels)
        if next_sentence_label is not None:
            out.nsp_loss = F.cross_entropy(nsp_logits, next_sentence_label, ignore_index=-100)
            out.nsp_correct = (nsp_logits.argmax(-1) == next_sentence_label).sum()
        losses = [loss for loss in (out.mlm_loss, out.nsp_loss) if loss is not None]
        out.loss = sum(losses) if losses else None
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def encoder_state_from_pretraining(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BertPretrainer (or BertForPreTraining) state dict -> the weights a BertClassifier
    shares with it: embeddings, encoder and pooler. Both use transformers' names, so the keys
    carry over as they are; the MLM and NSP heads ("cls.*") are dropped."""
    return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}


class BertClassifier(nn.Module):
    """BertForSequenceClassification: pooled [CLS] -> dropout -> linear, cross-entropy loss.

    transformers initialises the classifier with std 0.02 and zero bias, so the first logits
    are near zero and the loss at init is ~ln(num_classes).
    """

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError(
                f"BertClassifier needs BertConfig.num_classes >= 2, got {cfg.num_classes}"
            )
        self.cfg = cfg
        hf = transformers.BertForSequenceClassification(cfg.to_hf())
        # Its parts under transformers' names: the state dict is BertForSequenceClassification's.
        self.bert = hf.bert
        self.dropout = hf.dropout
        self.classifier = hf.classifier

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        mask = padding_mask(input_ids, attention_mask, self.cfg.pad_token_id)  # (B, T)
        out = self.bert(input_ids, attention_mask=mask.long(), token_type_ids=token_type_ids)
        logits = self.classifier(self.dropout(out.pooler_output))  # (B, H) -> (B, C)
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=-100)
        return ClassifierOutput(logits, loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @classmethod
    def from_pretraining(
        cls, cfg: BertConfig, pretrainer_state_dict: dict[str, torch.Tensor]
    ) -> BertClassifier:
        """A classifier whose embeddings, encoder and pooler are the pretrainer's; only the
        classification head is new. Raises ValueError unless every shared weight loads."""
        model = cls(cfg)
        state = encoder_state_from_pretraining(pretrainer_state_dict)
        own = model.state_dict()
        missing = sorted(k for k in own if k.startswith(ENCODER_PREFIXES) and k not in state)
        unexpected = sorted(k for k in state if k not in own)
        mismatched = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in sorted(state.items())
            if k in own and v.shape != own[k].shape
        ]
        problems = [
            f"{what}: {_names(keys)}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch (pretrained vs configured)", mismatched),
            )
            if keys
        ]
        if problems:
            raise ValueError(
                "the pretraining state dict does not fit this BertClassifier; "
                + "; ".join(problems)
                + ". Build the classifier with the pretrainer's sizes and vocabulary."
            )
        model.load_state_dict(state, strict=False)
        return model

    @classmethod
    def from_hf_directory(
        cls, path: str, num_classes: int, attn_implementation: str = "sdpa"
    ) -> BertClassifier:
        """A local Hugging Face BERT directory (config.json + model.safetensors or
        pytorch_model.bin, as save_pretrained writes it) with a new `num_classes` head, unless
        the directory's own head already has that many classes."""
        path = check_hf_directory(path, "bert", "BERT")
        hf = transformers.BertForSequenceClassification.from_pretrained(
            path,
            num_labels=num_classes,
            local_files_only=True,
            ignore_mismatched_sizes=True,  # a saved head with another class count starts anew
            attn_implementation=attn_implementation,
        )
        cfg = BertConfig.from_hf(
            hf.config, num_classes=num_classes, attn_implementation=attn_implementation
        )
        # Built from our config and loaded strictly: proof that build_model(asdict(cfg)) plus
        # the exported state dict rebuilds this very model.
        model = cls(cfg)
        model.load_state_dict(hf.state_dict())
        return model


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
