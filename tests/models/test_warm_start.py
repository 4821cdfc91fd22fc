"""Warm start by name: new labels extend the head, a refitted vocabulary keeps known words."""

import pytest
import torch

from sparkloom.models.lstm import LSTMClassifier, LSTMConfig
from sparkloom.models.registry import build_model
from sparkloom.models.warm_start import warm_start

CFG = {"vocab_size": 12, "embed_dim": 8, "hidden_dim": 8, "num_classes": 2}


def trained(seed: int = 0, **cfg) -> LSTMClassifier:
    torch.manual_seed(seed)
    model = LSTMClassifier(LSTMConfig(**{**CFG, **cfg}))
    with torch.no_grad():  # a "trained" head: rows far from the small initialisation
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def test_a_new_label_extends_the_head_and_old_logits_are_unchanged_at_step_0():
    old = trained()
    torch.manual_seed(1)
    new = LSTMClassifier(LSTMConfig(**{**CFG, "num_classes": 3})).eval()
    report = warm_start(new, old.state_dict(), (["a", "b"], ["a", "b", "c"]))
    assert report.labels_new == ["c"] and report.labels_kept == 2
    ids = torch.tensor([[2, 3, 4, 5, 0], [6, 7, 0, 0, 0]])
    with torch.no_grad():
        before, after = old(input_ids=ids).logits, new(input_ids=ids).logits
    assert after.shape == (2, 3)
    assert torch.equal(after[:, :2], before)
    head = new.head.classifier
    assert head.bias[2] == 0 and head.weight[2].abs().max() < 0.1  # initialised small


def test_labels_are_matched_by_name_not_position():
    old = trained()
    new = LSTMClassifier(LSTMConfig(**CFG)).eval()
    warm_start(new, old.state_dict(), (["a", "b"], ["b", "a"]))
    ids = torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(new(input_ids=ids).logits.flip(-1), old(input_ids=ids).logits)


def test_a_refitted_vocabulary_keeps_each_known_words_embedding():
    old_vocab = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(10)]
    new_vocab = ["[PAD]", "[UNK]", "w3", "w0", "fresh"] + [f"n{i}" for i in range(7)]
    old = trained()
    new = LSTMClassifier(LSTMConfig(**CFG))
    report = warm_start(new, old.state_dict(), (["a", "b"], ["a", "b"]), (old_vocab, new_vocab))
    assert (report.words_kept, report.words_new) == (4, 8)
    e_old, e_new = old.encoder.embedding.weight, new.encoder.embedding.weight
    assert torch.equal(e_new[2], e_old[old_vocab.index("w3")])
    assert torch.equal(e_new[3], e_old[old_vocab.index("w0")])
    assert not torch.equal(e_new[4], e_old[4])


def test_a_changed_architecture_is_an_error_naming_the_tensor():
    old = trained()
    new = LSTMClassifier(LSTMConfig(**{**CFG, "hidden_dim": 16}))
    with pytest.raises(ValueError, match="model's settings changed; train from scratch"):
        warm_start(new, old.state_dict(), (["a", "b"], ["a", "b"]))


def test_build_model_warm_starts_from_an_export(tmp_path):
    from sparkloom.models.train.checkpoint import export

    old = trained()
    export(old, str(tmp_path), "lstm")
    files = tmp_path / "export"
    (files / "labels.json").write_text('["a", "b"]')
    init = {"kind": "warm_start", "path": str(files), "labels": ["a", "b", "c"], "vocab": None}
    model = build_model("lstm", {**CFG, "num_classes": 3}, init)
    assert model.loading.labels_new == ["c"]
