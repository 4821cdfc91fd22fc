"""Integrated Gradients: completeness on every tiny model, a hand-built model whose answer is
known, the baseline the path starts from, batching, and no side effects on the model."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from sparkloom.models import attribution
from sparkloom.models.attribution import (
    embedding_layer,
    image_attributions,
    standardize,
    token_attributions,
)
from sparkloom.models.bert import BertClassifier, BertConfig
from sparkloom.models.cnn import AlexNet, AlexNetConfig, CNNConfig, SmallCNN
from sparkloom.models.hf import HFClassifier, HFClassifierConfig
from sparkloom.models.lstm import LSTMClassifier, LSTMConfig
from sparkloom.models.textcnn import TextCNN, TextCNNConfig

VOCAB, CLASSES, PAD, CLS, SEP = 50, 3, 0, 1, 2
LENGTHS = [7, 1, 4, 9, 3]
STEPS = 64
# Completeness: |delta| <= tol * max(1, |logit gap|) at `steps` Gauss-Legendre steps. A smooth
# model (BERT: GELU, tanh, softmax) is integrated almost exactly; ReLU and max pooling make
# the gradient jump along the path, so the error only falls as 1/steps. Measured (max over
# the batch, relative): BERT 2.9e-2 @24, 2.2e-4 @48, 5e-6 @64; LSTM (max over time) 1.2e-2
# @64; TextCNN 3.0e-2 @64; SmallCNN 3.1e-2 @64; AlexNet 1.1e-1 @64, 5.3e-3 @128.
COMPLETE = {  # model: (steps, tol)
    "bert": (48, 1e-3),
    "lstm": (64, 0.02),
    "textcnn": (64, 0.05),
    "cnn": (64, 0.05),
    "alexnet": (128, 0.02),
}


def sharpened(model: nn.Module, head: nn.Linear, embedding: nn.Embedding) -> nn.Module:
    """Bigger head and embeddings than the init's: logits that depend on the tokens by O(1),
    so the completeness check is not passed by near-zero gaps."""
    nn.init.normal_(head.weight, std=3.0)
    nn.init.normal_(head.bias, std=0.5)
    with torch.no_grad():
        embedding.weight.normal_(std=1.0)
        embedding.weight[PAD] = 0  # as training leaves a padding_idx row
    return model


def lstm() -> nn.Module:
    m = LSTMClassifier(LSTMConfig(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=16,
                                  hidden_dim=16))  # fmt: skip
    return sharpened(m, m.head.classifier, m.encoder.embedding)


def textcnn() -> nn.Module:
    m = TextCNN(TextCNNConfig(vocab_size=VOCAB, num_classes=CLASSES, embed_dim=16,
                              filter_sizes=(2, 3, 4), num_filters=8))  # fmt: skip
    return sharpened(m, m.head.classifier, m.embedding)


def bert() -> nn.Module:
    m = BertClassifier(BertConfig(vocab_size=VOCAB, preset=None, num_hidden_layers=2,
                                  hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, num_classes=CLASSES))  # fmt: skip
    # transformers' std 0.02 lets almost nothing but [CLS] itself reach the pooled [CLS]
    for lin in m.modules():
        if isinstance(lin, nn.Linear):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
    return sharpened(m, m.classifier, m.bert.embeddings.word_embeddings)


TEXT_MODELS = {"lstm": lstm, "textcnn": textcnn, "bert": bert}


def batch(bert_style: bool) -> torch.Tensor:
    """Right-padded ids (B, T), real ids >= 3; BERT's wrapped in [CLS] ... [SEP]."""
    g = torch.Generator().manual_seed(0)
    extra = 2 if bert_style else 0
    ids = torch.full((len(LENGTHS), max(LENGTHS) + extra), PAD)
    for row, n in enumerate(LENGTHS):
        words = torch.randint(3, VOCAB, (n,), generator=g)
        ids[row, : n + extra] = (
            torch.cat([torch.tensor([CLS]), words, torch.tensor([SEP])]) if bert_style else words
        )
    return ids


def attribute(name: str, steps: int = STEPS):
    torch.manual_seed(0)
    model = TEXT_MODELS[name]()
    keep = {CLS, SEP} if name == "bert" else None
    ids = batch(name == "bert")
    return model, ids, token_attributions(model, ids, None, PAD, steps=steps, keep_ids=keep)


@pytest.mark.parametrize("name", list(TEXT_MODELS))
def test_token_completeness(name):
    steps, tol = COMPLETE[name]
    model, ids, res = attribute(name, steps)
    gap = res.logit_gap
    assert abs(gap).max() > 0.3  # the check below has teeth
    assert (abs(res.delta) <= tol * abs(gap).clip(min=1)).all(), (res.delta, gap)
    assert res.attributions.shape == ids.shape and res.logits.shape == (len(ids), CLASSES)
    # targets default to the prediction; pads (and [CLS]/[SEP]) equal the baseline: exactly 0
    assert (res.targets == res.logits.argmax(-1)).all()
    assert (res.attributions[(ids == PAD).numpy()] == 0).all()
    if name == "bert":
        special = ((ids == CLS) | (ids == SEP)).numpy()
        assert (res.attributions[special] == 0).all()


@pytest.mark.parametrize("name", list(TEXT_MODELS))
def test_baseline_is_pads_under_the_real_mask(name):
    """The path starts at the pad embeddings with the real attention mask, not at the
    all-pad input (which an LSTM would run as one step, BERT would mask entirely; TextCNN's
    zero pad embedding gives the same features either way)."""
    model, ids, res = attribute(name, steps=4)
    keep = torch.isin(ids, torch.tensor([CLS, SEP])) if name == "bert" else ids == PAD
    baseline = ids.masked_fill(~keep, PAD)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=baseline, attention_mask=(ids != PAD).long()).logits
        all_pad = model(input_ids=baseline).logits
    torch.testing.assert_close(torch.from_numpy(res.baseline_logits), expected)
    if name != "textcnn":
        assert not torch.allclose(torch.from_numpy(res.baseline_logits), all_pad, atol=1e-3)


def one_token_model(token: int = 7) -> TextCNN:
    """A TextCNN whose class-0 logit is 0.5 + 3 * [token present]: filters of size 1 read
    only embedding channel 0, which is 1 for `token` and 0 for every other id (whose channel
    1 is random, so their input differs from the baseline yet must get nothing)."""
    m = TextCNN(TextCNNConfig(vocab_size=10, num_classes=2, embed_dim=2, filter_sizes=(1,),
                              num_filters=1, dropout=0.0))  # fmt: skip
    with torch.no_grad():
        m.embedding.weight[:, 0] = 0.0
        m.embedding.weight[:, 1] = torch.linspace(-2, 2, 10)
        m.embedding.weight[token] = torch.tensor([1.0, 0.0])
        m.embedding.weight[PAD] = 0.0
        m.features.convs[0].weight.copy_(torch.tensor([[[3.0], [0.0]]]))  # (F, E, k)
        m.features.convs[0].bias.fill_(0.5)
        m.head.classifier.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        m.head.classifier.bias.copy_(torch.tensor([0.5, 0.0]))
    return m


def test_one_token_model_gets_its_answer():
    ids = torch.tensor([[3, 4, 5, 7, 8, 9], [3, 7, 4, 0, 0, 0], [3, 4, 5, 6, 0, 0]])
    res = token_attributions(one_token_model(), ids, torch.tensor([0, 0, 0]), PAD, steps=32)
    # the class-0 logit rises from 1.0 (baseline: feature relu(0.5)) to 4.0 with the token
    # present, and IG gives all of the 3.0 to it: the logit, not the probability
    expected = torch.zeros(3, 6)
    expected[0, 3] = expected[1, 1] = 3.0
    torch.testing.assert_close(torch.from_numpy(res.attributions), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(res.logit_gap), torch.tensor([3.0, 3.0, 0.0]))
    assert abs(res.delta).max() < 1e-5


def test_roberta_path_starts_at_its_own_positions():
    """HFClassifier(RoBERTa) counts position ids from the non-pad ids: the baseline ids would
    get other positions than the path, whose ids stay real. Completeness holds only when the
    baseline logits are taken where the path starts (real ids, baseline embeddings)."""
    hf = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=70, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    model = HFClassifier(HFClassifierConfig(hf_config=hf.to_dict(), num_classes=CLASSES,
                                            pad_token_id=1))  # fmt: skip
    for lin in model.modules():
        if isinstance(lin, nn.Linear):
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
    embedding = embedding_layer(model)
    assert embedding is model.hf.roberta.embeddings.word_embeddings
    with torch.no_grad():
        embedding.weight.normal_(std=1.0)
        embedding.weight[1] = 0
    ids = batch(True)[:3]
    ids = torch.where(ids == CLS, 0, torch.where(ids == PAD, 1, ids))  # <s> 0, <pad> 1, </s> 2
    res = token_attributions(model, ids, None, 1, steps=48, keep_ids={0, 2})
    gap = res.logit_gap
    assert abs(gap).max() > 0.3
    assert (abs(res.delta) <= 1e-3 * abs(gap).clip(min=1)).all(), (res.delta, gap)
    with torch.no_grad():
        baseline_ids = torch.where((ids == 0) | (ids == 2), ids, 1)
        naive = model(input_ids=baseline_ids, attention_mask=(ids != 1).long()).logits
    assert not torch.allclose(naive, torch.from_numpy(res.baseline_logits), atol=1e-2)


def test_memory_budget_splits_batches_without_changing_results(monkeypatch):
    torch.manual_seed(0)
    model, ids = textcnn(), batch(False)[:3]
    whole = token_attributions(model, ids, None, PAD, steps=8)
    # 3 rows a pass: one example's 8 steps over three passes, one example per attribute call
    monkeypatch.setattr(attribution, "TEXT_BUDGET", 3 * ids.size(1) * model.cfg.embed_dim)
    rows = []
    hook = model.features.register_forward_hook(lambda m, i, o: rows.append(len(o)))
    split = token_attributions(model, ids, None, PAD, steps=8)
    hook.remove()
    assert max(rows) == 3 and sum(r == 3 for r in rows) >= 3 * 2  # > 2 passes per example
    torch.testing.assert_close(split.attributions, whole.attributions, atol=1e-5, rtol=1e-4)


def test_model_left_as_it_was():
    torch.manual_seed(0)
    model = lstm()
    model.train()
    token_attributions(model, batch(False), torch.zeros(len(LENGTHS), dtype=torch.long), PAD, 4)
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_embedding_layers():
    torch.manual_seed(0)
    m = lstm()
    assert embedding_layer(m) is m.encoder.embedding
    m = textcnn()
    assert embedding_layer(m) is m.embedding
    m = bert()
    assert embedding_layer(m) is m.bert.embeddings.word_embeddings


def test_unsupported_models_are_named():
    with pytest.raises(TypeError, match="LSTMClassifier, TextCNN, BertClassifier and HFClassifier"):
        embedding_layer(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="float32"):
        token_attributions(lstm().half(), batch(False), None, PAD, steps=2)


def with_biases(model: nn.Module) -> nn.Module:
    """Random biases everywhere: a bias-free ReLU net is homogeneous, where IG is exact."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(std=0.5)
    nn.init.normal_(model.head.classifier.weight, std=1.0)
    return model


IMAGE_MODELS = {
    "cnn": lambda: SmallCNN(CNNConfig(in_channels=1, height=8, width=8, num_classes=CLASSES,
                                      conv1_channels=4, conv2_channels=8, kernel_size=3,
                                      hidden_dim=16)),
    "alexnet": lambda: AlexNet(AlexNetConfig(in_channels=3, height=16, width=16,
                                             num_classes=CLASSES, width_mult=0.05)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_image_completeness(name):
    torch.manual_seed(0)
    model = with_biases(IMAGE_MODELS[name]())
    cfg = model.cfg
    pixels = torch.randint(0, 256, (4, cfg.in_channels, cfg.height, cfg.width), dtype=torch.uint8)
    mean, std = (
        torch.full((1, cfg.in_channels, 1, 1), 0.4),
        torch.full((1, cfg.in_channels, 1, 1), 0.3),
    )
    steps, tol = COMPLETE[name]
    res = image_attributions(model, standardize(pixels, mean, std), steps=steps)
    rows = range(len(pixels))
    gap = res.logits[rows, res.targets] - res.baseline_logits[rows, res.targets]
    assert abs(gap).max() > 0.3
    assert (abs(res.delta) <= tol * abs(gap).clip(min=1)).all(), (res.delta, gap)
    assert res.maps.shape == res.signed.shape == (4, cfg.height, cfg.width)
    assert (res.maps >= abs(res.signed) - 1e-6).all()
