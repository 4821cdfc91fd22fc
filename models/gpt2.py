"""GPT-2 (Radford et al., 2019) on transformers: a causal language model.

GPT2LM holds GPT2LMHeadModel's modules under transformers' own attribute names (`transformer`,
`lm_head`), so its state dict is exactly GPT2LMHeadModel's: checkpoints move between here and
Hugging Face with no renaming. Training follows nanoGPT: a block of T+1 tokens gives T inputs
and the T next tokens as targets, so a block needs a context of only T <= n_positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from sparkloom.models.hf import check_hf_directory
from sparkloom.models.hparams import (
    CUSTOM_PRESET,
    GPT2Dims,
    GPT2Params,
    at_least_one,
    index_below,
    one_of,
)
from sparkloom.models.outputs import CausalLMOutput

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(kw_only=True)
class GPT2Config(GPT2Params):
    """What builds the model: the hyper-parameters and what the tokenizer decides.
    __post_init__ fills the sizes in from the preset, so asdict(cfg) names every size and
    GPT2Config(**asdict(cfg)) == cfg."""

    vocab_size: int
    eos_token_id: int = 0  # also the BOS token, as in GPT-2's "<|endoftext|>"
    attn_implementation: str = "sdpa"  # "sdpa" | "eager"
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in self.dims._asdict().items():
            setattr(self, name, value)
        at_least_one(self, "vocab_size")
        index_below(self, "eos_token_id", "vocab_size")
        one_of(self, "attn_implementation", ATTN_IMPLEMENTATIONS)
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}"
            )

    def to_hf(self) -> transformers.GPT2Config:
        return transformers.GPT2Config(
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            layer_norm_epsilon=self.layer_norm_epsilon,
            bos_token_id=self.eos_token_id,
            eos_token_id=self.eos_token_id,
            tie_word_embeddings=True,
            attn_implementation=self.attn_implementation,
        )

    @classmethod
    def from_hf(cls, hf: transformers.GPT2Config, **overrides: Any) -> GPT2Config:
        """Our config for a transformers one; raises if ours cannot rebuild the same model."""
        # Ours always builds with transformers' defaults for these; a checkpoint trained with
        # others would load but compute something else after an export + rebuild.
        defaults = transformers.GPT2Config()
        for name in (
            "activation_function",
            "n_inner",
            "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn",
            "add_cross_attention",
            "tie_word_embeddings",
        ):
            if getattr(hf, name) != getattr(defaults, name):
                raise ValueError(
                    f"the Hugging Face config sets {name}={getattr(hf, name)!r}; GPT2Config only "
                    f"builds models with {name}={getattr(defaults, name)!r}"
                )
        eos = hf.eos_token_id
        if isinstance(eos, list):  # some configs list several; the first is the document end
            eos = eos[0] if eos else None
        return cls(
            vocab_size=hf.vocab_size,
            preset=CUSTOM_PRESET,
            **{k: getattr(hf, k) for k in GPT2Dims._fields},
            # GPT-2's three dropouts are equal in every released checkpoint; ours is one value.
            dropout=hf.resid_pdrop,
            eos_token_id=eos if eos is not None else 0,
            layer_norm_epsilon=hf.layer_norm_epsilon,
            **overrides,
        )


class GPT2LM(nn.Module):
    """GPT2LMHeadModel's transformer and tied LM head, trained on next-token prediction.

    forward(tokens (B, T+1)) scores tokens[:, 1:] given tokens[:, :-1]; "lm_loss", "lm_correct"
    and "lm_count" let the runtime average loss and accuracy over targets, as it does for MLM.
    """

    task = "lm"
    num_labels = 0  # no classes: `logits` are next-token scores over the vocabulary

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        hf = transformers.GPT2LMHeadModel(cfg.to_hf())
        # Its parts, not the wrapper: the state dict keys stay transformers' ("transformer.*",
        # "lm_head.weight"), and the head stays tied to the token embeddings (one Parameter).
        self.transformer = hf.transformer  # wte + wpe -> n_layer GPT2Blocks -> ln_f
        self.lm_head = hf.lm_head  # (n_embd -> vocab_size), weight is transformer.wte.weight

    def forward(self, tokens: torch.Tensor) -> CausalLMOutput:
        if tokens.dim() != 2 or tokens.size(1) < 2:
            raise ValueError(
                f"GPT2LM takes token blocks (B, T+1) with T >= 1, got shape {tuple(tokens.shape)}"
            )
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        B, T = inputs.shape
        if self.cfg.n_positions < T:
            raise ValueError(
                f"block_size {T} (blocks of {T + 1} tokens) exceeds the model's n_positions "
                f"{self.cfg.n_positions}; shorten the blocks or raise GPT2Config.n_positions"
            )
        # use_cache=False: the config says True (for generation), which would keep every K and V.
        hidden = self.transformer(inputs, use_cache=False).last_hidden_state  # (B, T, n_embd)
        logits = self.lm_head(hidden)  # (B, T, V)
        # float32 even when the logits come from bf16 autocast: log-softmax over a large
        # vocabulary loses too much in bf16.
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # (B*T, V)
        correct = (logits.argmax(-1) == targets).sum()
        return CausalLMOutput(logits, loss, correct, torch.tensor(B * T, device=tokens.device))

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def flops_per_token(self, seq_len: float) -> float:
        """Training FLOPs per token (forward + backward), as nanoGPT counts them for MFU
        (PaLM, Chowdhery et al. 2022, appendix B): 6 x the parameters less the position
        embeddings (a lookup, no matmul), plus 12 x layers x width x context for attention."""
        n = self.num_parameters() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len

    def to_hf(self) -> transformers.GPT2LMHeadModel:
        """A GPT2LMHeadModel sharing these very modules and weights (e.g. for save_pretrained)."""
        with torch.device("meta"):  # its own weights are replaced at once; don't allocate them
            hf = transformers.GPT2LMHeadModel(self.cfg.to_hf())
        hf.transformer = self.transformer
        hf.lm_head = self.lm_head
        return hf.train(self.training)

    def save_pretrained(self, directory: str) -> None:
        """A directory transformers loads as GPT2LMHeadModel (config.json, model.safetensors)."""
        self.to_hf().save_pretrained(directory, safe_serialization=True)

    def load_pretrained_weights(self, state: dict[str, torch.Tensor]) -> None:
        """What save_pretrained wrote (safetensors, loaded); the head is tied to the token
        embeddings, so save_pretrained leaves its copy out."""
        state = dict(state)
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
        self.load_state_dict(state)
        self.lm_head.weight = self.transformer.wte.weight

    @classmethod
    def from_hf_directory(
        cls, path: str | os.PathLike, attn_implementation: str = "sdpa"
    ) -> GPT2LM:
        """A local Hugging Face GPT-2 directory (config.json + model.safetensors or
        pytorch_model.bin, as save_pretrained writes it)."""
        path = check_hf_directory(path, "gpt2", "GPT-2")
        hf = transformers.GPT2LMHeadModel.from_pretrained(
            path, local_files_only=True, attn_implementation=attn_implementation
        )
        cfg = GPT2Config.from_hf(hf.config, attn_implementation=attn_implementation)
        # Built from our config and loaded strictly: proof that GPT2Config(**asdict(cfg)) plus
        # the exported state dict rebuilds this very model.
        model = cls(cfg)
        model.load_state_dict(hf.state_dict())
        return model
