"""Int8 dynamic quantization (models.quantize): which layers change, what stays float, and
that the int8 model predicts like the float one."""

from __future__ import annotations

import torch
from torch import nn

from models.quantize import compare, quantize, serialized_bytes
from models.registry import build_model

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
        labels = model(input_ids=ids)["logits"].argmax(-1)  # the float model's own answers
        m = compare(model, quantize(model), ids, labels)
        assert m["float_test_accuracy"] == 1.0
        assert m["agreement"] >= 0.95, (name, m["agreement"])
        assert m["test_accuracy"] == m["agreement"]
        assert m["int8_bytes"] < m["float_bytes"] and m["rows"] == 256


def test_bert_quantizes_its_linear_layers():
    from models.quantize import recipe

    torch.manual_seed(0)
    cfg = {"vocab_size": 300, "num_classes": 3, "preset": "tiny", "max_position_embeddings": 64}
    model = decisive(build_model("bert", cfg))
    ids = torch.randint(5, 300, (64, 40), generator=torch.Generator().manual_seed(2))
    ids[:, 30:] = 0
    labels = model(input_ids=ids)["logits"].argmax(-1)
    how = recipe("bert")
    assert how["modules"] == ["Linear"]  # HF BERT indexes positions through a strided slice
    m = compare(model, quantize(model, how["modules"]), ids, labels)
    assert m["agreement"] >= 0.95 and m["int8_bytes"] < m["float_bytes"]
