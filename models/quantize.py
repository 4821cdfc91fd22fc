"""Int8 models for CPU scoring, with PyTorch's own post-training dynamic quantization.

`quantize(model)` swaps nn.Linear and nn.LSTM for int8 versions (weights int8, activations
quantized per batch at run time) and nn.Embedding for an 8-bit weight-only embedding. That
covers every layer of the LSTM, TextCNN's head, BERT's attention and feed-forward blocks,
and the CNNs' fully connected layers (AlexNet's hold most of its weights).

The quantized model is rebuilt from the float state dict at load time: `quantize` is
deterministic (scales come from the weights alone), so the stored files stay a plain state
dict that loads weights-only, and nothing is unpickled. `recipe(name)` records what is done.

Uses `torch.ao.quantization.quantize_dynamic`, which ships with torch. PyTorch points new
users to torchao, but torchao quantizes Linear layers only, not nn.LSTM.
"""

from __future__ import annotations

import io
import time
import warnings
from typing import Any

import torch
from torch import nn

MODULES = ("Linear", "LSTM", "Embedding")


def recipe(name: str) -> dict[str, Any]:
    """What `quantize` does to model `name`. BERT keeps float embeddings: the 8-bit
    embedding takes contiguous indices only, and Hugging Face's BERT looks positions up
    through a slice of its position-id buffer."""
    modules = ["Linear"] if name == "bert" else list(MODULES)
    return {"method": "dynamic", "dtype": "qint8", "modules": modules}


def quantize(model: nn.Module, modules: tuple[str, ...] | list[str] = MODULES) -> nn.Module:
    """An int8 copy of a float model in eval mode (the original is left as it is): `modules`
    names the layer types to quantize (Linear, LSTM: int8 weights and activations;
    Embedding: 8-bit weights)."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        quantize_dynamic,
    )

    known = {"Linear": (nn.Linear, default_dynamic_qconfig),
             "LSTM": (nn.LSTM, default_dynamic_qconfig),
             "Embedding": (nn.Embedding, float_qparams_weight_only_qconfig)}  # fmt: skip
    unknown = set(modules) - set(known)
    if unknown:
        raise ValueError(f"cannot quantize {sorted(unknown)}; choose from {list(known)}")
    spec = dict(known[m] for m in modules)
    with warnings.catch_warnings():  # the module's deprecation notice, once per call
        warnings.simplefilter("ignore")
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=False)


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as torch.save writes it (int8 weights stay int8)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64,
            key: str = "input_ids") -> torch.Tensor:  # fmt: skip
    """Class probabilities for `inputs` (token ids, or standardized images with key="images")."""
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            out.append(model(**{key: inputs[i : i + batch_size]})["logits"].float().softmax(-1))
    return torch.cat(out) if out else torch.empty(0)


def rows_per_second(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64,
                    key: str = "input_ids", threads: int = 1, repeats: int = 3) -> float:  # fmt: skip
    """Scoring throughput on the CPU with `threads` threads: best of `repeats` passes."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predict(model, inputs[:batch_size], batch_size, key)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            predict(model, inputs, batch_size, key)
            best = min(best, time.perf_counter() - start)
        return len(inputs) / best
    finally:
        torch.set_num_threads(before)


def compare(float_model: nn.Module, int8_model: nn.Module, inputs: torch.Tensor,
            labels: torch.Tensor, key: str = "input_ids", threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """Accuracy, agreement, size and throughput of an int8 model beside its float model,
    measured in one process on the same inputs."""
    pf, pq = predict(float_model, inputs, key=key), predict(int8_model, inputs, key=key)
    yf, yq = pf.argmax(-1), pq.argmax(-1)
    rf = rows_per_second(float_model, inputs, key=key, threads=threads)
    rq = rows_per_second(int8_model, inputs, key=key, threads=threads)
    sf, sq = serialized_bytes(float_model), serialized_bytes(int8_model)
    return {
        "float_test_accuracy": (yf == labels).float().mean().item(),
        "test_accuracy": (yq == labels).float().mean().item(),
        "agreement": (yf == yq).float().mean().item(),
        "max_probability_diff": (pf - pq).abs().max().item() if len(pf) else 0.0,
        "float_bytes": sf,
        "int8_bytes": sq,
        "size_ratio": sq / sf,
        "float_rows_per_s": rf,
        "int8_rows_per_s": rq,
        "speedup": rq / rf,
        "rows": len(labels),
        "threads": threads,
    }
