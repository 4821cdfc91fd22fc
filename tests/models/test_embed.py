"""TextEncoder against an in-process transformers forward, on a tiny BERT the test writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparkloom.models.embed import EncoderSettings, TextEncoder
from tests.conftest import FILLER, TOPICS

TEXTS = [
    "coach goal striker cup and the fans",
    "software",
    "the chef made tomato soup with garlic in the oven for dinner tonight",
    "cloud server network",
]


def tiny_encoder(path: Path, seed: int = 0, max_length: int = 64) -> Path:
    """A tiny uncased BERT (hidden 16, 2 layers, 2 heads) with a WordPiece tokenizer trained
    on the test corpus's words, saved as save_pretrained writes a real one."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [w for ws in TOPICS.values() for w in ws] + FILLER
    tok.train_from_iterator([" ".join(words)] * 3, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=special))  # fmt: skip
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
    ).save_pretrained(path)  # fmt: skip
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=max_length,
        pad_token_id=0,
    )  # fmt: skip
    BertModel(config).eval().save_pretrained(path)
    return path


def reference(path: Path, texts: list[str], pooling: str) -> np.ndarray:
    """Plain transformers, one text at a time (no padding at all)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    rows = []
    with torch.no_grad():
        for t in texts:
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0]  # (T, H)
            rows.append(h[0] if pooling == "cls" else h.mean(0))
    return torch.stack(rows).numpy()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooling_equals_a_transformers_forward(model_dir, pooling):
    enc = TextEncoder(str(model_dir), EncoderSettings(pooling=pooling, batch_size=3))
    got = enc.encode(TEXTS)  # batches of 3 sorted by length: padding inside a batch
    assert got.shape == (4, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(model_dir, TEXTS, pooling), atol=1e-5)


def test_normalize_gives_unit_vectors_in_the_same_direction(model_dir):
    plain = TextEncoder(str(model_dir)).encode(TEXTS)
    unit = TextEncoder(str(model_dir), EncoderSettings(normalize=True)).encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit * np.linalg.norm(plain, axis=1, keepdims=True), plain,
                               atol=1e-5)  # fmt: skip


def test_max_length_truncates_at_the_lower_of_setting_and_model(model_dir):
    enc = TextEncoder(str(model_dir), EncoderSettings(max_length=1000))
    assert enc.max_length == 64  # the model's own position limit
    enc = TextEncoder(str(model_dir), EncoderSettings(max_length=8, pooling="cls"))
    long = " ".join(["striker"] * 50)
    assert len(enc.tokenize([long])[0]) == 8
    cut = "striker " * 6  # [CLS] + 6 + [SEP] = 8 tokens: what the long text is cut to
    np.testing.assert_allclose(enc.encode([long]), reference(model_dir, [cut], "cls"), atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU takes bfloat16")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu_is_refused_naming_the_setting(model_dir, dtype):
    with pytest.raises(ValueError, match=rf"embed\.dtype={dtype} runs on CUDA only.*float32"):
        TextEncoder(str(model_dir), EncoderSettings(dtype=dtype))


def test_a_directory_without_weights_fails_naming_what_it_needs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        TextEncoder(str(tmp_path))
