"""Loading saved weights without running code from the file.

`torch.load` with `weights_only=True` unpickles tensors, containers and plain values only;
a file that holds anything else (a whole pickled model, or an object whose unpickling calls
a function) is refused with `UnsafeWeights`, unless the caller passes `allow_pickle=True`
(`--allow-pickle` on the command line) for a file it trusts.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import torch
from torch import nn

from sparkloom.models.storage import torch_source


class UnsafeWeights(ValueError):
    """A weights file that only full unpickling (which can run code) would load."""


def load_weights(path: str, allow_pickle: bool = False) -> Any:
    """The tensors (state dict, checkpoint) saved at `path` (a path or any URI), on the CPU."""
    try:
        with warnings.catch_warnings():  # quantized tensors trip torch's TypedStorage notice
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return torch.load(torch_source(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            what = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                        str(e).splitlines()[0])  # fmt: skip
            raise UnsafeWeights(
                f"{path} holds pickled Python objects, not only tensors ({what.strip()}); "
                "loading it could run code from the file, so it was refused. Save the model's "
                "state_dict() instead, or pass --allow-pickle if you trust where it came from"
            ) from None
    loaded = torch.load(
        torch_source(path), map_location="cpu", weights_only=False
    )  # the caller trusts it
    return loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
