"""BertPretrainer and BertClassifier: config, sizes, parity with transformers, loss at init,
overfitting, pretraining -> classifier transfer, Hugging Face directories."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, replace

import pytest
import torch
import transformers

from sparkloom.models.bert import (
    BertClassifier,
    BertConfig,
    BertPretrainer,
    encoder_state_from_pretraining,
)
from sparkloom.models.hparams import BERT_PRESETS
from sparkloom.models.masking import MaskingConfig, mask_tokens
from sparkloom.models.outputs import ClassifierOutput, PretrainingOutput

PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_NORMAL = 5
TINY = dict(
    vocab_size=100, preset=None, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=64,
)  # fmt: skip


def tiny_cfg(**overrides) -> BertConfig:
    return BertConfig(**{**TINY, **overrides})


def pretrainer(seed: int = 0, **overrides) -> BertPretrainer:
    torch.manual_seed(seed)
    return BertPretrainer(tiny_cfg(**overrides))


def classifier(seed: int = 0, num_classes: int = 3, **overrides) -> BertClassifier:
    torch.manual_seed(seed)
    return BertClassifier(tiny_cfg(num_classes=num_classes, **overrides))


def sentences(n: int, t: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] a [SEP] b [SEP] [PAD]... with random lengths; returns ids and token types (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_NORMAL, vocab, (n, t), generator=g)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    rows = torch.arange(n)
    ids[:, 0] = CLS
    ids[rows, t // 4] = SEP
    ids[rows, lengths - 1] = SEP
    positions = torch.arange(t)[None, :]  # (1, T)
    ids[positions >= lengths[:, None]] = PAD
    types = ((positions > t // 4) & (positions < lengths[:, None])).long()  # (B, T)
    return ids, types


def masked_batch(n: int, t: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids, types = sentences(n, t, vocab, seed)
    special = torch.isin(ids, torch.tensor([PAD, CLS, SEP]))
    g = torch.Generator().manual_seed(seed + 1)
    masked, labels = mask_tokens(ids, special, MASK, vocab, MaskingConfig(), g, FIRST_NORMAL)
    return {
        "input_ids": masked,
        "token_type_ids": types,
        "attention_mask": (ids != PAD).long(),
        "mlm_labels": labels,
        "next_sentence_label": torch.randint(0, 2, (n,), generator=g),
    }


def expected_pretrainer_parameters(dims, vocab: int, positions: int = 512, types: int = 2) -> int:
    layers, h, _, inner = dims
    embeddings = (vocab + positions + types) * h + 2 * h  # word, position, type + LayerNorm
    attention = 4 * (h * h + h) + 2 * h  # q, k, v, output + LayerNorm
    ffn = (h * inner + inner) + (inner * h + h) + 2 * h  # up, down + LayerNorm
    pooler = h * h + h
    # MLM transform + LayerNorm, output bias (the decoder weight is the word embeddings), NSP.
    heads = (h * h + h) + 2 * h + vocab + (2 * h + 2)
    return embeddings + layers * (attention + ffn) + pooler + heads


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preset": "huge"}, r"unknown BertConfig.preset 'huge'; choose one of \['tiny', 'mini'"),
        ({"preset": None}, r"preset is None, so every size must be given; set \['num_hidden"),
        ({"preset": None, "hidden_size": 64}, r"set \['num_hidden_layers', 'num_attention_heads'"),
        ({"hidden_size": 250}, "hidden_size 250 must be divisible by num_attention_heads 4"),
        ({"preset": "base", "num_attention_heads": 5}, "768 must be divisible by .* 5"),
        ({"hidden_dropout": 1.0}, r"hidden_dropout must be in \[0, 1\)"),
        ({"attention_dropout": -0.1}, r"attention_dropout must be in \[0, 1\)"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1"),
        ({"vocab_size": 0}, "vocab_size must be >= 1"),
        ({"pad_token_id": 30522}, r"pad_token_id must be in \[0, vocab_size=30522\)"),
        ({"num_classes": 1}, "num_classes must be 0 .* or >= 2"),
        ({"attn_implementation": "flash"}, "attn_implementation must be one of"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        BertConfig(**overrides)


def test_overrides_replace_the_preset_values():
    assert BertConfig(preset="tiny").dims == (2, 128, 2, 512)
    assert BertConfig(preset="tiny", num_hidden_layers=3, intermediate_size=256).dims == (
        3, 128, 2, 256,
    )  # fmt: skip
    assert tiny_cfg().dims == (2, 32, 2, 64)


def test_config_round_trips_through_asdict():
    for cfg in (
        BertConfig(),
        tiny_cfg(num_classes=4),
        BertConfig(preset="base", num_hidden_layers=6),
    ):
        assert BertConfig(**asdict(cfg)) == cfg


def test_models_reject_the_other_models_num_classes():
    with pytest.raises(ValueError, match="BertPretrainer needs BertConfig.num_classes=0"):
        BertPretrainer(tiny_cfg(num_classes=2))
    with pytest.raises(ValueError, match="BertClassifier needs BertConfig.num_classes >= 2"):
        BertClassifier(tiny_cfg())


# --- sizes and parity with transformers --------------------------------------------------------


@pytest.mark.parametrize("vocab", [30522, 8000])
@pytest.mark.parametrize("preset", list(BERT_PRESETS))
def test_preset_sizes_match_transformers(preset, vocab):
    cfg = BertConfig(vocab_size=vocab, preset=preset)
    # Meta tensors: only shapes matter, so skip allocating up to 110M weights.
    with torch.device("meta"):
        ours = BertPretrainer(cfg)
        reference = transformers.BertForPreTraining(cfg.to_hf())
        clf = BertClassifier(replace(cfg, num_classes=5))
    layers, hidden, heads, inner = BERT_PRESETS[preset]
    hf = ours.bert.config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads) == (layers, hidden, heads)
    assert hf.intermediate_size == inner == 4 * hidden
    assert len(ours.bert.encoder.layer) == layers
    assert list(ours.state_dict()) == list(reference.state_dict())
    expected = expected_pretrainer_parameters(BERT_PRESETS[preset], vocab)
    assert ours.num_parameters() == reference.num_parameters() == expected
    # The classifier drops the MLM and NSP heads and adds a (hidden -> 5) linear layer.
    heads_size = (hidden * hidden + hidden) + 2 * hidden + vocab + (2 * hidden + 2)
    assert clf.num_parameters() == expected - heads_size + hidden * 5 + 5


def test_known_sizes():
    # BERT-Base with the uncased WordPiece vocabulary: the 110M of the paper.
    assert expected_pretrainer_parameters(BERT_PRESETS["base"], 30522) == 110_106_428
    assert expected_pretrainer_parameters(BERT_PRESETS["tiny"], 30522) == 4_433_468
    assert expected_pretrainer_parameters(BERT_PRESETS["mini"], 30522) == 11_267_900


def test_mlm_decoder_is_tied_to_the_word_embeddings():
    model = pretrainer()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_matches_transformers_bert_for_pretraining():
    model = pretrainer().eval()
    reference = transformers.BertForPreTraining(model.cfg.to_hf()).eval()
    reference.load_state_dict(model.state_dict())
    batch = masked_batch(4, 24, 100)
    with torch.no_grad():
        ours = model(**batch)
        theirs = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"], labels=batch["mlm_labels"],
            next_sentence_label=batch["next_sentence_label"],
        )  # fmt: skip
    torch.testing.assert_close(ours.prediction_logits, theirs.prediction_logits)
    torch.testing.assert_close(ours.logits, theirs.seq_relationship_logits)
    torch.testing.assert_close(ours.loss, theirs.loss)


def test_eager_and_sdpa_attention_agree():
    batch = masked_batch(4, 24, 100)
    sdpa = pretrainer(attn_implementation="sdpa").eval()
    eager = pretrainer(attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        a, b = sdpa(**batch), eager(**batch)
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, atol=1e-5, rtol=1e-4)


# --- forward ------------------------------------------------------------------------------------


def test_pretrainer_forward_shapes_and_keys():
    model = pretrainer().eval()
    batch = masked_batch(4, 24, 100)
    with torch.no_grad():
        out = model(**batch)
        bare = model(batch["input_ids"])
        mlm_only = model(batch["input_ids"], mlm_labels=batch["mlm_labels"])
    assert isinstance(out, PretrainingOutput)
    assert out.logits.shape == (4, 2)
    assert out.prediction_logits.shape == (4, 24, 100)
    for key in ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct"):
        assert getattr(out, key).ndim == 0, key
    assert out.mlm_count == (batch["mlm_labels"] != -100).sum()
    assert 0 <= out.mlm_correct <= out.mlm_count
    assert 0 <= out.nsp_correct <= 4
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
    assert bare.loss is None and bare.mlm_loss is None and bare.nsp_correct is None
    assert bare.logits.shape == (4, 2)
    torch.testing.assert_close(mlm_only.loss, mlm_only.mlm_loss)
    assert mlm_only.nsp_loss is None


def test_the_pretrain_task_scores_nsp_from_next_sentence_label():
    # NSP labels go by their own name (`labels` is no alias any more); the task knows it
    from sparkloom.models.train.tasks import Pretrain

    model = pretrainer().eval()
    batch = masked_batch(4, 24, 100)
    with torch.no_grad():
        out = model(**batch)
    task = Pretrain()
    sums = task.sums(torch.device("cpu"))
    task.add(sums, out, batch)
    report = task.report(sums)
    assert report["examples"] == 4 and report["accuracy"] == out.nsp_correct.item() / 4
    assert report["mlm_loss"] == pytest.approx(out.mlm_loss.item())
    with pytest.raises(TypeError, match="labels"):
        model(**batch, labels=batch["next_sentence_label"])


def test_a_batch_without_masked_positions_has_zero_mlm_loss():
    model = pretrainer().eval()
    batch = masked_batch(2, 16, 100)
    batch["mlm_labels"].fill_(-100)
    with torch.no_grad():
        out = model(**batch)
    assert out.mlm_loss == 0 and out.mlm_count == 0
    assert torch.isfinite(out.loss)


def test_classifier_forward_shapes():
    model = classifier(num_classes=3).eval()
    ids, types = sentences(4, 24, 100)
    with torch.no_grad():
        out = model(ids, token_type_ids=types)
        labelled = model(ids, token_type_ids=types, labels=torch.tensor([0, 1, 2, -100]))
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (4, 3) and out.loss is None
    assert labelled.loss.ndim == 0


@pytest.mark.parametrize("build", [pretrainer, classifier], ids=["pretrainer", "classifier"])
def test_padding_is_masked_even_without_attention_mask(build):
    # The Scorer calls model(input_ids=...) alone: pads (id 0) must still be masked out.
    model = build().eval()
    ids, _ = sentences(4, 24, 100)
    assert (ids == PAD).any()
    with torch.no_grad():
        implicit = model(ids).logits
        explicit = model(ids, attention_mask=(ids != PAD).long()).logits
        attends_to_pads = model(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(implicit, explicit)
    assert not torch.allclose(implicit, attends_to_pads)


# --- loss at init and overfitting ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [tiny_cfg(), BertConfig(vocab_size=30522, preset="tiny", max_position_embeddings=64)],
    ids=["tiny-overrides-vocab100", "tiny-preset-vocab30522"],
)
def test_pretraining_losses_at_init(cfg):
    torch.manual_seed(0)
    model = BertPretrainer(cfg).eval()
    batch = masked_batch(16, 32, cfg.vocab_size, seed=1)
    with torch.no_grad():
        out = model(**batch)
    assert abs(out.mlm_loss.item() - math.log(cfg.vocab_size)) < 0.3
    assert abs(out.nsp_loss.item() - math.log(2)) < 0.1


@pytest.mark.parametrize("num_classes", [2, 5])
def test_classifier_loss_at_init(num_classes):
    model = classifier(num_classes=num_classes).eval()
    ids, types = sentences(64, 24, 100, seed=2)
    labels = torch.randint(0, num_classes, (64,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = model(ids, token_type_ids=types, labels=labels).loss.item()
    assert abs(loss - math.log(num_classes)) < 0.2
    # transformers' small init of the last layer is what keeps the first predictions uniform.
    assert model.classifier.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_tiny_pretrainer_overfits_a_handful_of_examples():
    model = pretrainer(hidden_dropout=0.0, attention_dropout=0.0)
    batch = masked_batch(8, 16, 100, seed=4)  # masked once: the same targets every step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(150):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.mlm_count >= 8
    assert out.mlm_loss.item() < 0.5
    assert out.nsp_correct.item() == 8


# --- pretraining -> classifier -------------------------------------------------------------------


def trained_pretrainer_state() -> dict[str, torch.Tensor]:
    """A pretrainer state that no fresh init reproduces (every weight nudged)."""
    model = pretrainer(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.state_dict()


def test_from_pretraining_loads_every_encoder_weight():
    state = trained_pretrainer_state()
    fresh = classifier(seed=1).state_dict()
    torch.manual_seed(1)
    model = BertClassifier.from_pretraining(tiny_cfg(num_classes=3), state)
    loaded = model.state_dict()

    assert set(loaded) - set(state) == {"classifier.weight", "classifier.bias"}
    shared = [k for k in loaded if k.startswith("bert.")]
    assert shared and set(shared) == {k for k in state if k.startswith("bert.")}
    for key in shared:
        assert torch.equal(loaded[key], state[key]), key
        assert not torch.equal(fresh[key], state[key]) or key.endswith("LayerNorm.bias"), key
    assert not any(k.startswith("cls.") for k in encoder_state_from_pretraining(state))


def test_from_pretraining_names_a_missing_encoder_key():
    state = trained_pretrainer_state()
    del state["bert.encoder.layer.1.output.dense.weight"]
    with pytest.raises(
        ValueError, match=r"missing: bert\.encoder\.layer\.1\.output\.dense\.weight"
    ):
        BertClassifier.from_pretraining(tiny_cfg(num_classes=3), state)


def test_from_pretraining_names_unexpected_keys_and_shape_mismatches():
    state = trained_pretrainer_state()
    state["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected: bert\.encoder\.layer\.9"):
        BertClassifier.from_pretraining(tiny_cfg(num_classes=3), state)
    state = trained_pretrainer_state()
    with pytest.raises(
        ValueError, match=re.escape("word_embeddings.weight (100, 32) vs (120, 32)")
    ):
        BertClassifier.from_pretraining(tiny_cfg(num_classes=3, vocab_size=120), state)


# --- Hugging Face directories --------------------------------------------------------------------


def test_from_hf_directory_round_trip(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(tiny_cfg(num_classes=3).to_hf()).eval()
    hf.save_pretrained(tmp_path)
    model = BertClassifier.from_hf_directory(str(tmp_path), num_classes=3).eval()
    ids, types = sentences(4, 24, 100)
    mask = (ids != PAD).long()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model(ids, attention_mask=mask, token_type_ids=types).logits
    assert torch.equal(got, expected)

    # Its config is ours, and rebuilds the same model (what load_exported does).
    assert isinstance(model.cfg, BertConfig)
    assert model.cfg.preset is None and model.cfg.dims == (2, 32, 2, 64)
    rebuilt = BertClassifier(BertConfig(**asdict(model.cfg))).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, mask, types).logits, expected)


def test_from_hf_directory_puts_a_new_head_on_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(tiny_cfg().to_hf())
    hf.save_pretrained(tmp_path)
    model = BertClassifier.from_hf_directory(str(tmp_path), num_classes=4)
    assert model.classifier.out_features == 4
    theirs = hf.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("bert."):
            assert torch.equal(value, theirs[key]), key


def test_from_hf_directory_without_config_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertClassifier.from_hf_directory(str(tmp_path / "absent"), num_classes=2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertClassifier.from_hf_directory(str(tmp_path), num_classes=2)
