"""GPT2LM and generate(): sizes, shifted targets, causality, overfitting, sampling, HF round trip."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
import transformers

from sparkloom.models.generate import generate
from sparkloom.models.gpt2 import GPT2LM, GPT2Config
from sparkloom.models.hparams import GPT2_PRESETS
from sparkloom.models.outputs import CausalLMOutput

V = 64  # vocabulary of the tiny test models
CTX = 32  # their n_positions


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: with 2 threads on a busy 2-core box, each op waits on the other
    # thread (~10 ms per op) and the file takes minutes instead of seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> GPT2LM:
    torch.manual_seed(0)
    return GPT2LM(GPT2Config(vocab_size=V, n_positions=CTX, dropout=0.0, **overrides))


@pytest.fixture(scope="module")
def model() -> GPT2LM:
    return tiny().eval()


@pytest.fixture(scope="module")
def sharp() -> GPT2LM:
    """Random weights with a large spread: at init GPT-2's scores are nearly flat and greedy
    decoding just repeats the last token, which would hide a wrong position or cache."""
    m = tiny()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m.eval()


def next_logits(model: GPT2LM, seq: list[int]) -> torch.Tensor:
    """(V,) scores for the token after `seq`, with no cache and no padding."""
    # forward() wants a block of T+1 tokens; the last one is only a target and cannot change
    # the logits before it.
    with torch.no_grad():
        return model(torch.tensor([seq + [0]])).logits[0, -1]


# -- config and sizes ------------------------------------------------------------------------


def test_small_preset_is_gpt2_124m():
    with torch.device("meta"):  # sizes only: no memory, no init
        m = GPT2LM(GPT2Config(vocab_size=50257, preset="small"))
    # wte 50257*768 = 38,597,376 + wpe 1024*768 = 786,432
    # + 12 blocks * 7,087,872 = 85,054,464, where a block is
    #     ln_1 2*768 + c_attn 768*2304+2304 + attn c_proj 768*768+768 + ln_2 2*768
    #     + c_fc 768*3072+3072 + mlp c_proj 3072*768+768
    #   = 1,536 + 1,771,776 + 590,592 + 1,536 + 2,362,368 + 2,360,064
    # + ln_f 2*768 = 1,536; the LM head is wte itself, counted once
    # = 124,439,808
    assert m.cfg.n_positions == 1024
    assert m.lm_head.weight is m.transformer.wte.weight
    assert m.num_parameters() == 124_439_808


@pytest.mark.parametrize("preset", list(GPT2_PRESETS))
def test_presets_resolve_into_fields_and_round_trip(preset):
    cfg = GPT2Config(vocab_size=V, preset=preset)
    dims = GPT2_PRESETS[preset]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions) == tuple(dims)
    assert GPT2Config(**asdict(cfg)) == cfg
    hf = cfg.to_hf()
    assert (hf.n_layer, hf.n_head, hf.n_embd, hf.n_positions) == tuple(dims)
    assert hf.tie_word_embeddings and hf.eos_token_id == hf.bos_token_id == 0


def test_overrides_beat_the_preset():
    cfg = GPT2Config(vocab_size=V, preset="mini", n_layer=1, n_positions=64)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions) == (1, 4, 256, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "huge"}, "unknown GPT2Config.preset 'huge'"),
        ({"n_embd": 129}, "n_embd 129 must be divisible by n_head 2"),
        ({"preset": "custom", "n_layer": 2}, r"every size must be given"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"eos_token_id": V}, "eos_token_id must be in"),
        ({"attn_implementation": "flash"}, "attn_implementation must be one of"),
    ],
)
def test_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(vocab_size=V, **kwargs)


def test_head_is_tied_and_keys_are_hugging_faces(model):
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    hf = transformers.GPT2LMHeadModel(model.cfg.to_hf())
    assert list(model.state_dict()) == list(hf.state_dict())
    assert "lm_head.weight" in model.state_dict()
    assert model.task == "lm" and model.num_labels == 0


# -- forward: shifted targets, causality -----------------------------------------------------


def test_loss_is_cross_entropy_against_the_next_token(model):
    tokens = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens)
    logits = out.logits
    assert logits.shape == (3, 8, V)
    by_hand = torch.stack(
        [F.cross_entropy(logits[:, t], tokens[:, t + 1], reduction="none") for t in range(8)]
    ).mean()
    torch.testing.assert_close(out.loss, by_hand)
    assert isinstance(out, CausalLMOutput)
    assert out.count.item() == 3 * 8 and out.count.dim() == 0
    expected_correct = sum(
        int((logits[:, t].argmax(-1) == tokens[:, t + 1]).sum()) for t in range(8)
    )
    assert out.correct.item() == expected_correct


def test_position_t_sees_no_later_token(model):
    tokens = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    t = 5
    changed = tokens.clone()
    changed[:, t + 2 :] = (changed[:, t + 2 :] + 1) % V  # inputs after position t differ
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change does reach later ones


def test_block_up_to_n_positions_and_no_longer(model):
    assert model(torch.zeros(1, CTX + 1, dtype=torch.long)).logits.shape == (1, CTX, V)
    with pytest.raises(ValueError, match=rf"block_size {CTX + 1}.*n_positions {CTX}"):
        model(torch.zeros(1, CTX + 2, dtype=torch.long))


def test_loss_starts_at_ln_vocab_and_overfits_one_batch():
    m = tiny().train()
    tokens = torch.randint(0, V, (4, CTX + 1), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = m(tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.3
    assert losses[-1] < 0.2
    assert m.lm_head.weight is m.transformer.wte.weight  # still one Parameter after training


# -- generation ------------------------------------------------------------------------------

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]


def test_sampling_is_deterministic_per_seed(model):
    first = generate(model, PROMPTS, 10, seed=7)
    assert first == generate(model, PROMPTS, 10, seed=7)
    assert first != generate(model, PROMPTS, 10, seed=8)
    assert [len(row) for row in first] == [10, 10, 10]
    assert all(0 <= tok < V for row in first for tok in row)


def test_a_row_is_the_same_alone_in_a_batch_and_in_any_order(sharp):
    batch = generate(sharp, PROMPTS, 8, seed=3, keys=["a", "b", "c"])
    alone = [
        generate(sharp, [p], 8, seed=3, keys=[k])[0] for p, k in zip(PROMPTS, "abc", strict=True)
    ]
    reordered = generate(sharp, PROMPTS[::-1], 8, seed=3, keys=["c", "b", "a"])
    assert batch == alone == reordered[::-1]
    # the default key is the row index
    assert generate(sharp, PROMPTS, 8, seed=3) == generate(
        sharp, PROMPTS, 8, seed=3, keys=[0, 1, 2]
    )


def test_greedy_with_cache_equals_a_loop_without_it(sharp):
    got = generate(sharp, PROMPTS, 10, temperature=0)
    for prompt, row in zip(PROMPTS, got, strict=True):
        seq = list(prompt)
        for _ in range(10):
            seq.append(int(next_logits(sharp, seq).argmax()))
        assert row == seq[len(prompt) :]
    assert len({tuple(row) for row in got}) == 3  # the rows are not all one repeated token


def test_top_k_1_is_greedy(sharp):
    assert generate(sharp, PROMPTS, 8, top_k=1, seed=5) == generate(
        sharp, PROMPTS, 8, temperature=0
    )


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_draws_only_among_the_k_best(sharp, k):
    got = generate(sharp, PROMPTS, 12, top_k=k, seed=11)
    for prompt, row in zip(PROMPTS, got, strict=True):
        seq = list(prompt)
        for tok in row:
            assert tok in next_logits(sharp, seq).topk(k).indices.tolist()
            seq.append(tok)
    # and it does sample: with k=1 every row would be the greedy one
    assert got != generate(sharp, PROMPTS, 12, temperature=0)


def test_top_p_keeps_only_the_nucleus(sharp):
    got = generate(sharp, PROMPTS, 12, top_p=0.5, temperature=0.8, seed=2)
    for prompt, row in zip(PROMPTS, got, strict=True):
        seq = list(prompt)
        for tok in row:
            probs = (next_logits(sharp, seq) / 0.8).softmax(-1)
            # tok is in the nucleus: the mass of strictly likelier tokens is below top_p
            assert probs[probs > probs[tok]].sum() < 0.5
            seq.append(tok)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_row_stops_after_its_eos(model, temperature):
    free = generate(model, PROMPTS, 10, temperature=temperature, seed=4)
    eos = free[0][3]  # a token row 0 emits at step 3 (or sooner)
    stopped = generate(model, PROMPTS, 10, temperature=temperature, seed=4, eos_token_id=eos)
    for full, row in zip(free, stopped, strict=True):
        cut = full[: full.index(eos) + 1] if eos in full else full
        assert row == cut
    assert stopped[0][-1] == eos and len(stopped[0]) <= 4


def test_long_prompts_keep_their_last_tokens(sharp):
    prompt = list(torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(6)).tolist())
    got = generate(sharp, [prompt], 8, seed=1)
    assert got == generate(sharp, [prompt[-(CTX - 8) :]], 8, seed=1)
    assert len(got[0]) == 8


def test_generate_restores_the_training_mode():
    m = tiny().train()
    generate(m, [[1, 2]], 3)
    assert m.training
    m.eval()
    generate(m, [[1, 2]], 3)
    assert not m.training


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens must be in"),
        ([[1]], {"max_new_tokens": CTX}, "max_new_tokens must be in"),
        ([[1]], {"temperature": -0.5}, "temperature must be >= 0"),
        ([[1]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[1]], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([[1]], {"top_k": -1}, "top_k must be >= 0"),
        ([[1], []], {}, "prompt 1 is empty"),
        ([], {}, "prompts is empty"),
        ([[1, V]], {}, "outside"),
        ([[1], [2]], {"keys": ["a"]}, "got 1 keys for 2 prompts"),
    ],
)
def test_generate_rejects_bad_arguments(model, prompts, kwargs, message):
    kwargs = {"max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **kwargs)


# -- Hugging Face directories ----------------------------------------------------------------


def test_to_hf_shares_the_weights(sharp):
    hf = sharp.to_hf()
    assert hf.transformer.wte.weight is sharp.transformer.wte.weight
    assert hf.lm_head.weight is sharp.transformer.wte.weight
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens[:, :-1]).logits, sharp(tokens).logits)


def test_hf_directory_round_trip(sharp, tmp_path):
    sharp.to_hf().save_pretrained(tmp_path)
    loaded = GPT2LM.from_hf_directory(tmp_path).eval()
    assert loaded.cfg == GPT2Config(**asdict(loaded.cfg))
    assert (loaded.cfg.n_layer, loaded.cfg.n_embd, loaded.cfg.n_positions) == (2, 128, CTX)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, sharp(tokens).logits)


def test_missing_hf_directory_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        GPT2LM.from_hf_directory(missing)
    tmp_path.joinpath("config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        GPT2LM.from_hf_directory(tmp_path)
