"""Sampling text from a GPT2LM, a batch of prompts at a time, with a KV cache.

Every row draws from its own torch.Generator, seeded from (seed, key), so what a row generates
depends only on its prompt, the seed and its key: not on the other prompts in the batch, nor on
their order. Prompts are left-padded, with an attention mask and per-row positions, so padding
changes nothing either.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sparkloom.models.gpt2 import GPT2LM


def generate(
    model: GPT2LM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    keys: list | None = None,
    eos_token_id: int | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """The new token ids for each prompt: max_new_tokens of them, or fewer where a row emits
    eos_token_id (kept as its last token; None: never stop early).

    temperature 0 is greedy; otherwise logits / temperature, then top_k (0: off), then top_p
    (1.0: off). A prompt longer than n_positions - max_new_tokens keeps its last tokens.
    `keys` (default: the row index) name each row's random stream. `device` must be the
    model's (default), which this function never moves.
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, keys, eos_token_id)
    model_device = next(model.parameters()).device
    if device is not None and not _same_device(torch.device(device), model_device):
        raise ValueError(
            f"generate(device={device!r}) but the model is on {model_device}; "
            f"move it first with model.to({str(device)!r})"
        )
    keep = model.cfg.n_positions - max_new_tokens  # the prompt tokens that fit with the new ones
    prompts = [list(p[-keep:]) for p in prompts]
    keys = list(range(len(prompts))) if keys is None else keys
    generators = [_row_generator(seed, key, model_device) for key in keys]
    warpers = _warpers(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            new = _decode(model, prompts, max_new_tokens, warpers, generators, eos_token_id)
    finally:
        model.train(was_training)
    return [_cut_at_eos(row, eos_token_id) for row in new.tolist()]


def _decode(
    model: GPT2LM,
    prompts: list[list[int]],
    max_new_tokens: int,
    warpers: list | None,
    generators: list[torch.Generator],
    eos_token_id: int | None,
) -> torch.Tensor:
    """(B, <= max_new_tokens): a prefill over the left-padded prompts, then one token per step
    on the KV cache. Rows past their eos keep going (cheaper than reshaping the cache)."""
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long)  # pads are masked out: their id is irrelevant
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)  # (B, L)
    # Each row counts positions from its first real token; pads sit at 0 and are never seen.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    seq, step_ids, cache = ids, ids, None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        out = model.transformer(
            step_ids,
            past_key_values=cache,
            attention_mask=mask,  # (B, past + new): covers the cached tokens too
            position_ids=positions,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = model.lm_head(out.last_hidden_state[:, -1]).float()  # (B, V)
        token = _next_token(seq, logits, warpers, generators)  # (B,)
        seq = torch.cat([seq, token[:, None]], dim=1)  # (B, L + step + 1)
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            step_ids = token[:, None]  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, past + 1)
            positions = positions[:, -1:] + 1  # (B, 1)
    return seq[:, L:].cpu()


def _next_token(
    seq: torch.Tensor,
    logits: torch.Tensor,
    warpers: list | None,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """(B, V) float logits -> (B,) ids: argmax when `warpers` is None (temperature 0), else a
    draw from each row's warped distribution with that row's generator."""
    if warpers is None:
        return logits.argmax(-1)
    for warp in warpers:
        logits = warp(seq, logits)
    probs = logits.softmax(-1)  # (B, V); filtered tokens are -inf -> 0
    # One draw per row from its own generator: a row's stream never depends on its batch.
    draws = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(draws)  # (B,)


def _warpers(temperature: float, top_k: int, top_p: float) -> list | None:
    """transformers' warpers in its order (temperature, top-k, top-p); None for greedy."""
    if temperature == 0:
        return None
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))  # it refuses an int
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))  # it refuses top_p == 1.0
    return warpers


def _row_generator(seed: int, key: object, device: torch.device) -> torch.Generator:
    # hashlib, not hash(): Python salts str hashes per process, and rows must replay anywhere.
    # str(key), not repr: a numpy int key seeds the same stream as the Python int.
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return g


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    """ "cuda" means whichever GPU the model is on; "cuda:1" means that one."""
    return wanted.type == actual.type and wanted.index in (None, actual.index)


def _cut_at_eos(row: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is None or eos_token_id not in row:
        return row
    return row[: row.index(eos_token_id) + 1]


def _check_args(
    model: GPT2LM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    keys: list | None,
    eos_token_id: int | None,
) -> None:
    n_positions, vocab_size = model.cfg.n_positions, model.cfg.vocab_size
    if not 1 <= max_new_tokens < n_positions:
        raise ValueError(
            f"max_new_tokens must be in [1, n_positions={n_positions}) so that at least one "
            f"prompt token fits in the context, got {max_new_tokens}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1.0: off), got {top_p}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size})")
    if keys is not None and len(keys) != len(prompts):
        raise ValueError(f"got {len(keys)} keys for {len(prompts)} prompts; give one per prompt")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id must be in [0, vocab_size={vocab_size}) or None")
