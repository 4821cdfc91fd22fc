"""Int8 models for CPU scoring, with PyTorch's own post-training quantization.

Dynamic (every model): `quantize(model)` swaps nn.Linear and nn.LSTM for int8 versions (weights int8, activations
quantized per batch at run time) and nn.Embedding for an 8-bit weight-only embedding. That
covers every layer of the LSTM, TextCNN's head, BERT's attention and feed-forward blocks,
and the CNNs' fully connected layers (AlexNet's hold most of its weights).

The quantized model is rebuilt from the float state dict at load time: `quantize` is
deterministic (scales come from the weights alone), so the stored files stay a plain state
dict that loads weights-only, and nothing is unpickled. `recipe(name)` records what is done.

Static (the CNNs): dynamic quantization leaves convolutions float, and they are where a CNN
spends its time. `static_quantize(model, calibration)` runs the conv trunk and the fully
connected layers in int8: FX graph mode folds each BatchNorm into its conv and fuses the
ReLU, observers record activation ranges on calibration images (training images,
standardized), and the modules are converted to quantized kernels. Activation
scales come from data, so here the int8 state dict is stored (`int8_state_dict.pt`, loaded
weights-only) and `load_int8` rebuilds the same module structure to receive it. TextCNN
takes the same path for each Conv1d and its head (calibrated on token ids, embedding 8-bit).

Uses `torch.ao.quantization` (`quantize_dynamic`, `quantize_fx`), which ships with torch.
PyTorch points new users to torchao, but torchao quantizes Linear layers only, not nn.LSTM,
and its static path needs torch.export, which our image models' input checks do not trace.
"""

from __future__ import annotations

import copy
import io
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MODULES = ("Linear", "LSTM", "Embedding")


# what static quantization runs in int8, per image model: the conv trunk (convolutions,
# BatchNorm, ReLU, pooling) and the fully connected layers, as submodules FX can trace (the
# models' own forward checks its input, which FX cannot trace). Every activation scale is
# then fixed, so a row's scores do not depend on the batch it is scored in.
STATIC_TRUNK = {"cnn": ["conv1", "conv2", "fc1", "head.classifier"],
                "alexnet": ["features", "fc", "head.classifier"],
                # every Conv1d (`.*`: one per filter size); embedding lookup, masking and
                # max-over-time stay float around them
                "textcnn": ["features.convs.*", "head.classifier"]}  # fmt: skip
# what `auto` quantizes statically: every CNN. TextCNN gains with its width (1.76x rows/s on
# BBC News at the demo size with accuracy kept, 1.0x at 16 / 32: slower never).
STATIC_AUTO = ("cnn", "alexnet", "textcnn")
INT8_WEIGHTS = "int8_state_dict.pt"


def recipe(name: str, method: str = "auto") -> dict[str, Any]:
    """What the quantize stage does to model `name`. `auto`: static for the CNNs (their
    time is in the convolutions), dynamic for the rest. BERT keeps float embeddings: the
    8-bit embedding takes contiguous indices only, and Hugging Face's BERT looks positions up
    through a slice of its position-id buffer."""
    if method == "auto":
        method = "static" if name in STATIC_AUTO else "dynamic"
    if method == "static":
        if name not in STATIC_TRUNK:
            raise ValueError(
                f"static quantization covers the CNNs {list(STATIC_TRUNK)}, not '{name}' "
                "(its embedding, LSTM and attention layers have no static int8 kernels); use "
                "quantize.method=dynamic"
            )
        # TextCNN's weights are mostly its embedding table: 8-bit, as dynamic does it
        return {"method": "static", "dtype": "quint8", "static": STATIC_TRUNK[name],
                "modules": ["Embedding"] if name == "textcnn" else [],
                "engine": _engine()}  # fmt: skip
    if method != "dynamic":
        raise ValueError(f"quantize method '{method}': choose auto, dynamic or static")
    modules = ["Linear"] if name == "bert" else list(MODULES)
    return {"method": "dynamic", "dtype": "qint8", "modules": modules}


def _engine() -> str:
    """The quantized kernels' backend: x86 (fbgemm + onednn) where there is one, else ARM's."""
    engines = torch.backends.quantized.supported_engines
    return "x86" if "x86" in engines else "qnnpack" if "qnnpack" in engines else engines[-1]


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


def _explicit_padding(model: nn.Module) -> None:
    """padding="same" -> the equal explicit padding (odd kernels, stride 1): the quantized
    conv kernels take numbers only. The same arithmetic, so the float model is unchanged."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.padding == "same":
            if any(k % 2 == 0 for k in m.kernel_size):
                raise ValueError(f"padding='same' with even kernel {m.kernel_size} cannot be "
                                 "made explicit for the int8 conv")  # fmt: skip
            m.padding = tuple(
                (d * (k - 1)) // 2 for k, d in zip(m.kernel_size, m.dilation, strict=True)
            )


def _key(inputs: torch.Tensor) -> str:
    """The forward keyword: float rows are images, integer rows token ids."""
    return "images" if inputs.is_floating_point() else "input_ids"


def _expand(model: nn.Module, names: list[str]) -> list[str]:
    """`a.b.*` -> the children of a.b (e.g. one Conv1d per filter size)."""
    out = []
    for name in names:
        if name.endswith(".*"):
            parent = name[:-2]
            out += [
                f"{parent}.{child}" for child, _ in model.get_submodule(parent).named_children()
            ]
        else:
            out.append(name)
    return out


def _trunk_inputs(model: nn.Module, trunk: list[str], example: torch.Tensor) -> dict[str, Any]:
    """What each trunk submodule receives when `example` goes through the model."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.setdefault(name, args[0])) for name in trunk]  # fmt: skip
    try:
        with torch.no_grad():
            model(**{_key(example): example})
    finally:
        for h in hooks:
            h.remove()
    return seen


def _static_structure(
    model: nn.Module, how: dict[str, Any], example: torch.Tensor,
    calibrate: Callable[[nn.Module], None] | None = None,
) -> nn.Module:  # fmt: skip
    """A copy of `model` with the recipe's submodules prepared (observers in), calibrated by
    `calibrate` if given, and converted to int8 kernels; then `modules` quantized
    dynamically, if the recipe names any."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = how["engine"]
    q = copy.deepcopy(model).eval()
    _explicit_padding(q)
    trunk = _expand(q, how["static"])
    feeds = _trunk_inputs(q, trunk, example)
    mapping = get_default_qconfig_mapping(how["engine"])
    with warnings.catch_warnings():  # deprecation notices, and "observer never ran" at load
        warnings.simplefilter("ignore")
        for name in trunk:
            module = q.get_submodule(name)
            if not list(module.children()):  # a lone layer traced as the root would become a
                module = nn.Sequential(module)  # function holding an unsaveable packed weight
            q.set_submodule(name, prepare_fx(module, mapping, (feeds[name],)))
        if calibrate is not None:
            with torch.no_grad():
                calibrate(q)
        for name in trunk:
            q.set_submodule(name, convert_fx(q.get_submodule(name)))
    return quantize(q, how["modules"]) if how["modules"] else q


def static_quantize(
    model: nn.Module, how: dict[str, Any], calibration: torch.Tensor, batch_size: int = 64
) -> nn.Module:
    """An int8 copy of a CNN whose trunk runs quantized kernels, with activation ranges
    observed on `calibration` (standardized images, as training saw them, or token ids)."""
    if len(calibration) == 0:
        raise ValueError("static quantization needs calibration rows; got none")
    key = _key(calibration)

    def calibrate(q: nn.Module) -> None:
        for i in range(0, len(calibration), batch_size):
            q(**{key: calibration[i : i + batch_size]})

    return _static_structure(model, how, calibration[:1], calibrate)


def load_int8(model: nn.Module, how: dict[str, Any], directory: str, prefix: str = "",
              allow_pickle: bool = False) -> nn.Module:  # fmt: skip
    """The int8 model the quantize stage measured, from its float model and recipe: dynamic
    recomputes it from the weights; static loads the stored int8 weights into the same
    structure (weights-only)."""
    from sparkloom.models.weights import load_weights

    if how["method"] == "dynamic":
        return quantize(model, how["modules"])
    cfg = model.cfg
    if hasattr(cfg, "in_channels"):
        example = torch.zeros(1, cfg.in_channels, cfg.height, cfg.width)
    else:  # token ids: any real ones (shapes only; ranges come from the stored weights)
        example = torch.ones(1, max(cfg.filter_sizes), dtype=torch.int64)
    q = _static_structure(model, how, example)
    q.load_state_dict(load_weights(os.path.join(directory, f"{prefix}{INT8_WEIGHTS}"),
                                   allow_pickle))  # fmt: skip
    return q.eval()


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
            out.append(model(**{key: inputs[i : i + batch_size]}).logits.float().softmax(-1))
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
    k = pq.shape[1] if len(pq) else 0
    truth = labels.long()
    confusion = torch.bincount(truth * k + yq, minlength=k * k).view(k, k) if k else None
    nll = -pq.clamp_min(1e-12).log().gather(1, truth[:, None]).mean() if k else torch.tensor(0.0)
    return {
        "float_test_accuracy": (yf == labels).float().mean().item(),
        "test_accuracy": (yq == labels).float().mean().item(),
        "test_loss": nll.item(),
        "confusion": confusion.tolist() if confusion is not None else [],  # [true][predicted]
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
