"""Sentence embeddings from a local Hugging Face encoder: texts in, one vector per text out.

`TextEncoder` loads the directory once (its own tokenizer, weights only, safetensors first)
and pools the encoder's last hidden state: `mean` over the real tokens (the attention mask
hides padding; what sentence-transformers' all-MiniLM-L6-v2 uses) or the `cls` token's
state, optionally L2-normalized. Texts are sorted by length within a call so each batch is
padded to its own longest text, and returned in the order given.

Pure torch + transformers + tokenizers: the embed stage runs it inside Spark's Python
workers, a plain loop or a notebook runs it as is. Torch's thread count is the caller's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sparkloom.models.hf import (
    WEIGHT_FILES,
    TokenizerInfo,
    check_hf_directory,
    load_tokenizer,
    quiet,
)

Pooling = Literal["mean", "cls"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EncoderSettings:
    pooling: Pooling = "mean"
    normalize: bool = False
    max_length: int = 256  # capped at the tokenizer's and the model's own limit
    batch_size: int = 32
    dtype: str = "float32"  # bfloat16/float16 on CUDA only
    device: str = "auto"  # auto: cuda when available


def resolve_device(device: str, dtype: str) -> torch.device:
    """The torch device for `device` (auto: cuda when available); refuses half precision on
    CPU (bf16 is about 10x slower than fp32 there, fp16 lacks kernels)."""
    if dtype not in DTYPES:
        raise ValueError(f"embed.dtype={dtype!r}: choose one of {list(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("embed.device=cuda but torch sees no CUDA device; set embed.device=auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"embed.device={device!r}: choose auto, cpu or cuda")
    if device == "cpu" and dtype != "float32":
        raise ValueError(
            f"embed.dtype={dtype} runs on CUDA only and this encoder runs on the CPU; set "
            "embed.dtype=float32 (or run where torch sees a GPU)"
        )
    return torch.device(device)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row's real tokens: hidden (B, T, H), mask (B, T) -> (B, H)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextEncoder:
    """A local encoder directory, loaded once; `encode(texts)` -> (n, hidden) float32.

    `tokenizer`: what `models.hf.load_tokenizer(path)` returns, when the caller has it
    already (Spark workers get it from the driver instead of building it again)."""

    def __init__(
        self, path: str, settings: EncoderSettings = EncoderSettings(),
        tokenizer: tuple[str, TokenizerInfo] | None = None,
    ):  # fmt: skip
        from tokenizers import Tokenizer
        from transformers import AutoModel

        path = check_hf_directory(path)
        self.settings = s = settings
        self.device = resolve_device(s.device, s.dtype)
        tokenizer_json, info = tokenizer or load_tokenizer(path)
        self.max_length = min(s.max_length, info.max_length or s.max_length)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = info.pad_token_id
        quiet()
        safetensors = os.path.isfile(os.path.join(path, WEIGHT_FILES[0])) or os.path.isfile(
            os.path.join(path, WEIGHT_FILES[1])
        )
        self.model = AutoModel.from_pretrained(
            path, local_files_only=True, use_safetensors=safetensors or None,
            dtype=DTYPES[s.dtype],
        ).to(self.device).eval()  # fmt: skip
        self.dimension = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(len(texts), hidden) float32, row i for texts[i]."""
        batch_size = batch_size or self.settings.batch_size
        ids = self.tokenize(list(texts))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = np.zeros((len(ids), self.dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._forward([ids[i] for i in rows])
        return out

    def _forward(self, ids: list[list[int]]) -> np.ndarray:
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden = hidden.float()  # (B, T, H); pooled in float32 whatever the weights' dtype
        pooled = hidden[:, 0] if self.settings.pooling == "cls" else mean_pool(hidden, mask)
        if self.settings.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy()
