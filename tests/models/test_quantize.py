"""Int8 dynamic quantization (models.quantize): which layers change, what stays float, and
that the int8 model predicts like the float one."""

from __future__ import annotations

import torch
from torch import nn

from sparkloom.models.quantize import compare, quantize, serialized_bytes
from sparkloom.models.registry import build_model

LSTM = {"vocab_size": 2000, "num_classes": 4, "embed_dim": 32, "hidden_dim": 32, "num_layers": 1}
TEXTCNN = {"vocab_size": 2000, "num_classes": 4, "embed_dim": 32}


def decisive(model: nn.Module) -> nn.Module:
    """Scale the last layer so logits are well apart, as in a trained model: then argmax is
    a fair test of agreement (at random init every class is a coin toss)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(50.0)
    return model.eval()


def test_quantize_swaps_linear_lstm_and_embedding_and_leaves_the_float_model():
    torch.manual_seed(0)
    model = decisive(build_model("lstm", LSTM))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model)
    swapped = {type(m).__name__ for m in q.modules()
               if type(m).__module__.startswith("torch.ao.nn.quantized")}  # fmt: skip
    assert {"LSTM", "Linear", "Embedding"} <= swapped
    assert not any(isinstance(m, nn.Linear | nn.LSTM | nn.Embedding) for m in q.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert serialized_bytes(q) < 0.45 * serialized_bytes(model)  # int8 weights: ~1/4 of fp32


def test_int8_predictions_agree_with_float_on_a_fixed_set():
    for name, cfg in (("lstm", LSTM), ("textcnn", TEXTCNN)):
        torch.manual_seed(0)
        model = decisive(build_model(name, cfg))
        ids = torch.randint(2, 2000, (256, 48), generator=torch.Generator().manual_seed(1))
        ids[:, 30:] = 0  # padding, as batches have it
        labels = model(input_ids=ids).logits.argmax(-1)  # the float model's own answers
        m = compare(model, quantize(model), ids, labels)
        assert m["float_test_accuracy"] == 1.0
        assert m["agreement"] >= 0.95, (name, m["agreement"])
        assert m["test_accuracy"] == m["agreement"]
        assert m["int8_bytes"] < m["float_bytes"] and m["rows"] == 256


def test_bert_quantizes_its_linear_layers():
    from sparkloom.models.quantize import recipe

    torch.manual_seed(0)
    cfg = {"vocab_size": 300, "num_classes": 3, "preset": "tiny", "max_position_embeddings": 64}
    model = decisive(build_model("bert", cfg))
    ids = torch.randint(5, 300, (64, 40), generator=torch.Generator().manual_seed(2))
    ids[:, 30:] = 0
    labels = model(input_ids=ids).logits.argmax(-1)
    how = recipe("bert")
    assert how["modules"] == ["Linear"]  # HF BERT indexes positions through a strided slice
    m = compare(model, quantize(model, how["modules"]), ids, labels)
    assert m["agreement"] >= 0.95 and m["int8_bytes"] < m["float_bytes"]


IMAGES = {"cnn": {"in_channels": 1, "height": 16, "width": 16, "num_classes": 5,
                  "conv1_channels": 8, "conv2_channels": 16, "kernel_size": 5, "hidden_dim": 32},
          "alexnet": {"in_channels": 1, "height": 16, "width": 16, "num_classes": 5,
                      "width_mult": 0.25, "batch_norm": True}}  # fmt: skip


def test_static_quantization_runs_the_cnn_trunks_in_int8_and_reloads_exactly(tmp_path):
    """Calibrated on one set, measured on another; the stored int8 weights rebuild the same
    model (weights-only), so scoring elsewhere gives the measured predictions."""
    from sparkloom.models.quantize import INT8_WEIGHTS, load_int8, recipe, static_quantize
    from sparkloom.models.weights import load_weights

    for name, cfg in IMAGES.items():
        torch.manual_seed(0)
        model = decisive(build_model(name, cfg))
        for m in model.modules():  # trained BatchNorm statistics, not the identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        gen = torch.Generator().manual_seed(3)
        calibration, images = (
            torch.randn(128, 1, 16, 16, generator=gen),
            torch.randn(256, 1, 16, 16, generator=gen),
        )
        how = recipe(name)
        assert how["method"] == "static"
        q = static_quantize(model, how, calibration)
        kinds = {type(m).__name__ for m in q.modules()}
        assert "ConvReLU2d" in kinds and "BatchNorm2d" not in kinds, kinds  # folded and fused
        assert not any(isinstance(m, nn.Conv2d | nn.Linear) for m in q.modules())
        with torch.no_grad():  # fixed scales: a row scores the same in any batch
            whole, alone = q(images=images).logits, q(images=images[:3]).logits
        assert torch.equal(whole[:3], alone)
        labels = model(images=images).logits.argmax(-1)
        m = compare(model, q, images, labels, key="images")
        assert m["agreement"] >= 0.9, (name, m["agreement"])
        assert m["int8_bytes"] < 0.5 * m["float_bytes"]  # ~1/4 at real sizes; tiny: headers

        torch.save(q.state_dict(), tmp_path / INT8_WEIGHTS)
        load_weights(str(tmp_path / INT8_WEIGHTS))  # plain tensors: weights-only loads it
        again = load_int8(build_model(name, cfg).eval(), how, str(tmp_path))
        with torch.no_grad():
            assert torch.equal(again(images=images).logits, q(images=images).logits)


def test_static_textcnn_runs_every_conv1d_in_int8_and_reloads_exactly(tmp_path):
    """TextCNN's convolutions (one per filter size) and head in int8, calibrated on token
    ids; padding and masking still decide which windows count, so padded rows score as
    unpadded ones, and the stored int8 weights rebuild the same model."""
    from sparkloom.models.quantize import INT8_WEIGHTS, load_int8, recipe, static_quantize

    torch.manual_seed(0)
    model = decisive(build_model("textcnn", TEXTCNN))
    gen = torch.Generator().manual_seed(3)
    calibration = torch.randint(1, 2000, (128, 24), generator=gen)
    ids = torch.randint(1, 2000, (256, 24), generator=gen)
    ids[::2, 12:] = 0  # half the rows padded
    how = recipe("textcnn")  # auto: static, as for the image CNNs
    assert how["method"] == "static" and recipe("textcnn", "dynamic")["method"] == "dynamic"
    q = static_quantize(model, how, calibration)
    kinds = [type(m).__name__ for m in q.modules()]
    assert kinds.count("Conv1d") == len(model.cfg.filter_sizes)  # the quantized kind
    assert not any(isinstance(m, nn.Conv1d | nn.Linear | nn.Embedding) for m in q.modules())
    assert serialized_bytes(q) < 0.45 * serialized_bytes(model)  # 8-bit embedding table too
    with torch.no_grad():
        whole = q(input_ids=ids).logits
        alone = q(input_ids=ids[:3]).logits
        trimmed = q(input_ids=ids[:1, :12]).logits  # the padded row without its pads
    assert torch.equal(whole[:3], alone) and torch.equal(whole[:1], trimmed)
    labels = model(input_ids=ids).logits.argmax(-1)
    assert compare(model, q, ids, labels)["agreement"] >= 0.9

    torch.save(q.state_dict(), tmp_path / INT8_WEIGHTS)
    again = load_int8(build_model("textcnn", TEXTCNN).eval(), how, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, whole)


def test_static_quantization_is_for_the_cnns_only():
    import pytest

    from sparkloom.models.quantize import recipe

    assert recipe("lstm")["method"] == "dynamic" and recipe("cnn", "dynamic")["method"] == "dynamic"
    with pytest.raises(ValueError, match="quantize.method=dynamic"):
        recipe("lstm", "static")
