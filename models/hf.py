"""Local Hugging Face model directories: what one must hold before transformers loads it."""

from __future__ import annotations

import json
import os

# what save_pretrained writes: one safetensors file, a sharded index, or the older .bin
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_hf_directory(path: str | os.PathLike, model_type: str, name: str) -> str:
    """`path` as a str, once it holds config.json of `model_type` and weights; otherwise an
    error naming the path and what is missing (never a download attempt)."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no config.json in {path!r}: expected a local Hugging Face {name} directory "
            f"(config.json + one of {WEIGHT_FILES}, as save_pretrained writes it)"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise FileNotFoundError(f"no weights in {path!r}: expected one of {WEIGHT_FILES}")
    with open(config_path) as f:
        found = json.load(f).get("model_type")
    if found != model_type:
        raise ValueError(f"{path!r} holds a {found!r} model, not a {name} one")
    return path
