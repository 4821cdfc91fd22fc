"""Fine-tuning local Hugging Face checkpoints through the shared runtime (`train_fn`), over
Parquet, no Spark: tiny BERT, DistilBERT and GPT-2 directories the tests write with
save_pretrained load, train one step, export, and reload in plain transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from sparkloom.models.hf import HFClassifier, load_tokenizer
from sparkloom.models.hparams import OptimizerConfig
from sparkloom.models.train import build_optimizer, load_exported, train_fn
from sparkloom.models.train.loop import freeze_layers

PAD = {"bert": 0, "distilbert": 0, "electra": 0, "roberta": 1}
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *["red", "green", "blue", "cat", "dog", "bird", "one", "two", "three"],
]


def wordpiece_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip


def tiny(kind: str, path) -> str:
    """A tiny encoder (no head) and its tokenizer, as save_pretrained writes them."""
    torch.manual_seed(0)
    v = len(WORDS)
    sizes = {"vocab_size": v, "hidden_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64}  # fmt: skip
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**sizes))
    elif kind == "roberta":  # padding id 1, positions counted after it (offset 2)
        model = transformers.RobertaModel(transformers.RobertaConfig(
            **{**sizes, "max_position_embeddings": 66}, pad_token_id=PAD["roberta"]))  # fmt: skip
    elif kind == "electra":  # embeddings narrower than the encoder, projected up
        model = transformers.ElectraModel(transformers.ElectraConfig(**sizes, embedding_size=8))
    else:
        model = transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=v, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
            max_position_embeddings=64))  # fmt: skip
    model.save_pretrained(path)
    wordpiece_tokenizer().save_pretrained(path)
    return str(path)


def rows(n: int, seed: int) -> pa.Table:
    """Colour words are class 0, animals 1; ids as the tokenizer makes them, unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=g))
        pool = [5, 6, 7] if label == 0 else [8, 9, 10]
        k = int(torch.randint(1, 5, (1,), generator=g))
        ids.append([2, *[pool[int(i)] for i in torch.randint(0, 3, (k,), generator=g)], 3])
        labels.append(label)
    return pa.table({"input_ids": ids, "label": labels})


def run_config(tmp_path, path: str, pad: int = 0, **training) -> dict:
    paths = {}
    for split, n, seed in (("train", 64, 0), ("validation", 32, 1), ("test", 32, 2)):
        pq.write_table(rows(n, seed), tmp_path / f"{split}.parquet")
        paths[split] = str(tmp_path / f"{split}.parquet")
    return {
        "model": {"name": "hf_classifier",
                  "config": {"num_classes": 2, "pad_token_id": pad, "labels": ["colour", "animal"]},
                  "init": {"kind": "hf_directory", "path": path}},
        "data": {**paths, "inputs": {"input_ids": "input_ids", "attention_mask": "input_ids_mask",
                                     "labels": "label"}, "pad_values": {"input_ids": pad}},
        "training": {"batch_size": 64, "epochs": 1, "seed": 0, "optimizer": {"lr": 1e-3},
                     "schedule": {"warmup_ratio": 0.0}, **training},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "electra"])
def test_a_checkpoint_fine_tunes_one_step_exports_and_reloads_in_transformers(tmp_path, kind):
    path = tiny(kind, tmp_path / "ckpt-in")
    before = load_file(os.path.join(path, "model.safetensors"))
    pad = PAD[kind]
    out = train_fn(run_config(tmp_path, path, pad))
    assert out["history"][0]["step"] == 1  # one optimizer step: 64 rows, batch 64
    export = out["export_dir"]
    assert sorted(os.listdir(export)) == ["config.json", "model.json", "model.safetensors"]
    saved = json.loads(Path(export, "model.json").read_text())
    assert saved["name"] == "hf_classifier"

    ours = load_exported(export, "bert")  # the name model.json records wins
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert hf.config.id2label == {0: "colour", 1: "animal"} and hf.config.model_type == kind
    ids = torch.tensor([[2, 5, 6, 3, pad, pad], [2, 8, 9, 10, 9, 3]])
    with torch.no_grad():
        a = ours(input_ids=ids).logits
        b = hf(input_ids=ids, attention_mask=(ids != pad).long()).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the encoder came from the checkpoint and moved by one step, not from a fresh start
    after = load_file(os.path.join(export, "model.safetensors"))
    key = next(k for k in after if k.endswith("word_embeddings.weight"))
    start = before[key.split(".", 1)[1]]
    assert not torch.equal(after[key], start)
    assert (after[key] - start).abs().max() < 0.01


def test_a_missing_encoder_weight_is_named(tmp_path):
    path = tiny("bert", tmp_path / "ckpt")
    weights = os.path.join(path, "model.safetensors")
    state = load_file(weights)
    del state["encoder.layer.1.attention.self.query.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"bert\.encoder\.layer\.1\.attention\.self\.query\.weight"
    ):
        HFClassifier.from_pretrained(path, 2)


def test_a_new_head_is_reported_and_a_pretraining_head_is_unused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32)  # fmt: skip
    transformers.BertForPreTraining(cfg).save_pretrained(tmp_path)
    model = HFClassifier.from_pretrained(str(tmp_path), 3)
    assert model.loading.new_head == ["classifier.bias", "classifier.weight"]
    assert model.loading.missing_encoder == []
    assert any(k.startswith("cls.") for k in model.loading.unexpected)
    assert "new head (classifier.bias, classifier.weight)" in model.loading.summary()


def test_a_directory_without_a_tokenizer_names_the_files_it_looked_for(tmp_path):
    transformers.BertModel(transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(str(tmp_path))
    for name in ("tokenizer.json", "vocab.txt", "vocab.json + merges.txt", "spiece.model"):
        assert name in str(e.value)


def test_the_tokenizer_comes_back_unpadded_with_its_own_specials(tmp_path):
    path = tiny("distilbert", tmp_path)
    tokenizer_json, info = load_tokenizer(path)
    tok = Tokenizer.from_str(tokenizer_json)
    assert tok.encode("Red cat").ids == [2, 5, 8, 3]  # [CLS] red cat [SEP], no padding
    assert info.pad_token_id == 0 and info.max_length == 64
    assert info.special_tokens["cls_token"] == "[CLS]"


def test_layer_wise_decay_and_freezing(tmp_path):
    model = HFClassifier.from_pretrained(tiny("bert", tmp_path), 2)
    opt = build_optimizer(model, OptimizerConfig(lr=1.0), layer_lr_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["hf.classifier.weight"])] == 1.0  # the head: depth 3 of 2 layers
    assert lr_of[id(named["hf.bert.encoder.layer.1.output.dense.weight"])] == 0.5
    assert lr_of[id(named["hf.bert.encoder.layer.0.output.dense.weight"])] == 0.25
    assert lr_of[id(named["hf.bert.embeddings.word_embeddings.weight"])] == 0.125

    frozen = freeze_layers(model, 1)
    assert not named["hf.bert.embeddings.word_embeddings.weight"].requires_grad
    assert not named["hf.bert.encoder.layer.0.output.dense.weight"].requires_grad
    assert named["hf.bert.encoder.layer.1.output.dense.weight"].requires_grad
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="has 2 layers"):
        freeze_layers(model, 3)


def test_frozen_layers_do_not_move_in_training(tmp_path):
    path = tiny("bert", tmp_path / "ckpt-in")
    out = train_fn(run_config(tmp_path, path, freeze_layers=1, layer_lr_decay=0.8))
    before = load_file(os.path.join(path, "model.safetensors"))
    after = load_file(os.path.join(out["export_dir"], "model.safetensors"))
    assert torch.equal(after["bert.encoder.layer.0.output.dense.weight"],
                       before["encoder.layer.0.output.dense.weight"])  # fmt: skip
    assert not torch.equal(after["bert.encoder.layer.1.output.dense.weight"],
                           before["encoder.layer.1.output.dense.weight"])  # fmt: skip


def test_layer_options_need_a_layered_model():
    with pytest.raises(ValueError, match="layer_lr_decay=0.9 needs a model with numbered layers"):
        build_optimizer(torch.nn.Linear(2, 2), OptimizerConfig(), layer_lr_decay=0.9)


def test_a_gpt2_checkpoint_continues_one_step_and_reloads_in_transformers(tmp_path):
    torch.manual_seed(0)
    vocab = 40
    hf_cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2,
                                     n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "in")
    g = torch.Generator().manual_seed(0)
    paths = {}
    for split, n in (("train", 16), ("validation", 8), ("test", 8)):
        starts = torch.randint(0, vocab, (n,), generator=g).tolist()
        table = pa.table({"tokens": [[(s + i) % vocab for i in range(9)] for s in starts]})
        pq.write_table(table, tmp_path / f"{split}.parquet")
        paths[split] = str(tmp_path / f"{split}.parquet")
    out = train_fn({
        "model": {"name": "gpt2", "config": {"vocab_size": vocab},
                  "init": {"kind": "hf_directory", "path": str(tmp_path / "in")}},
        "data": {**paths, "inputs": {"tokens": "tokens"}},
        "training": {"batch_size": 16, "epochs": 1, "seed": 0, "optimizer": {"lr": 1e-3},
                     "early_stopping": {"metric": "val_loss"}},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
    })  # fmt: skip
    assert out["history"][0]["step"] == 1
    export = out["export_dir"]
    assert {"config.json", "model.json", "model.safetensors"} <= set(os.listdir(export))
    assert "state_dict.pt" not in os.listdir(export)
    ours = load_exported(export, "gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        # ours reads a block of T + 1 and predicts its last T tokens from the first T
        torch.testing.assert_close(ours(tokens=ids).logits, hf(input_ids=ids[:, :-1]).logits,
                                   atol=1e-5, rtol=0)  # fmt: skip
    moved = load_file(os.path.join(export, "model.safetensors"))["transformer.wte.weight"]
    start = load_file(tmp_path / "in" / "model.safetensors")["transformer.wte.weight"]
    assert not torch.equal(moved, start) and (moved - start).abs().max() < 0.01


def test_a_vocab_txt_alone_becomes_the_same_kind_of_tokenizer(tmp_path):
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=48)).save_pretrained(tmp_path)  # fmt: skip
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer_json, info = load_tokenizer(str(tmp_path))
    assert info.files == ["vocab.txt"] and info.pad_token_id == 0
    assert info.max_length == 48  # no model_max_length saved: the model's positions decide
    assert Tokenizer.from_str(tokenizer_json).encode("Blue DOG").ids == [2, 7, 9, 3]


def test_roberta_positions_leave_room_for_the_padding_offset():
    from sparkloom.models.hf import max_positions

    assert max_positions({"model_type": "roberta", "max_position_embeddings": 514,
                          "pad_token_id": 1}) == 512  # fmt: skip
    assert max_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512
    assert max_positions({"model_type": "gpt2", "n_positions": 1024}) == 1024
