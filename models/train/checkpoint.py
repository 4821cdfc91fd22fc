"""Checkpoints (step files, `latest`, `best.pt`) through models/storage.py, the RNG state
that makes a resumed run continue exactly, and the weights-only export."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from sparkloom.models import storage
from sparkloom.models.registry import build_model, model_config
from sparkloom.models.train.config import CheckpointConfig
from sparkloom.models.train.distributed import Dist, fault_hook
from sparkloom.models.weights import load_weights

# --- checkpoints -----------------------------------------------------------------------------


class Checkpoints:
    """step-N.pt files plus a `latest` pointer, each replaced whole; rank 0 writes.

    `dir` is a local path or any URI `models.storage` serves (hdfs://, s3://, ...), so a
    rank restarted on another host resumes from what rank 0 wrote."""

    def __init__(self, cc: CheckpointConfig, ctx: Dist, fault: str | None = None,
                 attempt: int = 1):  # fmt: skip
        self.dir, self.keep, self.ctx = cc.dir, max(1, cc.keep), ctx
        self.fault, self.attempt = fault, attempt  # the test hook (fault_hook, at=save)
        if self.dir and ctx.main:
            storage.makedirs(self.dir)

    def _steps(self) -> list[str]:
        return [p for p in storage.listdir(self.dir) if p.startswith("step-") and p.endswith(".pt")]

    def save(self, state: dict[str, Any], best: bool) -> str | None:
        if not self.dir or not self.ctx.main:
            return None
        name = f"step-{state['global_step']:09d}.pt"
        path = storage.join(self.dir, name)
        storage.torch_save(state, path)  # a kill mid-write leaves the previous files intact
        if best:
            fault_hook(self.ctx.rank, "save", state["global_step"], self.fault, self.attempt)
            storage.torch_save(state, storage.join(self.dir, "best.pt"))
        storage.write_text(storage.join(self.dir, "latest"), name)
        for old in self._steps()[: -self.keep]:
            storage.remove(storage.join(self.dir, old))
        return path

    def latest(self) -> str | None:
        if not self.dir or not storage.is_dir(self.dir):
            return None
        pointer = storage.join(self.dir, "latest")
        if storage.exists(pointer):
            path = storage.join(self.dir, storage.read_text(pointer).strip())
            if storage.exists(path):
                return path
        steps = self._steps()
        return storage.join(self.dir, steps[-1]) if steps else None

    @staticmethod
    def load(path: str) -> dict[str, Any]:
        return load_weights(path)


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    """numpy's global generator as what weights-only loading takes (tensors and numbers)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    saved = state.get("numpy")
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["gauss"]))
    elif saved is not None:  # checkpoints before the position was saved: the key alone
        np.random.set_state(("MT19937", saved.numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what an export may hold: our state dict + config, or a Hugging Face directory (config.json,
# model.safetensors) + our config for the models that are transformers models inside
EXPORT_FILES = ("model.json", "state_dict.pt", "config.json", "model.safetensors",
                "generation_config.json")  # fmt: skip


def export(model: nn.Module, directory: str, name: str | None = None) -> None:
    """Weights plus the config that builds the model, no pickled code: a state dict, or for
    a transformers model (HFClassifier) the directory `save_pretrained` writes (safetensors),
    which `transformers` loads as it is. `name` is the registry name that rebuilds it."""
    out = storage.join(directory, "export")
    saved: dict[str, Any] = {"config": model_config(model)}
    if name:
        saved["name"] = name
    if hasattr(model, "save_pretrained"):
        from sparkloom.models.hf import quiet

        quiet()
        with storage.staged(out) as local:
            model.save_pretrained(local)
    else:
        storage.torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                           storage.join(out, "state_dict.pt"))  # fmt: skip
    storage.write_text(storage.join(out, "model.json"), json.dumps(saved, indent=2))


def exported_files(directory: str) -> tuple[str, ...]:
    """The files of EXPORT_FILES that an export in `directory` holds."""
    return tuple(f for f in EXPORT_FILES if storage.exists(storage.join(directory, f)))


def load_exported(
    directory: str, name: str, prefix: str = "", allow_pickle: bool = False
) -> nn.Module:
    """The model `export` wrote: `prefix`model.json and `prefix`state_dict.pt (or
    `prefix`model.safetensors) in `directory`. Weights only: a .pt file that would unpickle
    code is refused unless `allow_pickle`; safetensors holds tensors only."""
    saved = json.loads(storage.read_text(storage.join(directory, f"{prefix}model.json")))
    model = build_model(saved.get("name", name), saved["config"])
    safetensors = storage.join(directory, f"{prefix}model.safetensors")
    if hasattr(model, "load_pretrained_weights") and storage.exists(safetensors):
        from safetensors.torch import load

        model.load_pretrained_weights(load(storage.read_bytes(safetensors)))
    else:
        weights = storage.join(directory, f"{prefix}state_dict.pt")
        model.load_state_dict(load_weights(weights, allow_pickle))
    return model.eval()
