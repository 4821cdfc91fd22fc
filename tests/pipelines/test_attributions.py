"""Attribution report pieces: rows explained with the predicted class, the HTML page (escaped,
one block per example, signs coloured right) and the figures. No Spark."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from sparkloom.pipelines.attributions import (
    NEGATIVE,
    POSITIVE,
    attributions_figure,
    attributions_html,
    choose_examples,
    explain_token_rows,
    image_attributions_figure,
)
from tests.models.test_attribution import one_token_model

WORDS = ["<pad>", "a", "b", "c", "d", "e", "f", "<script>", "g", "h"]
LABELS = ["has-script", "plain"]


def tokens_of(ids: list[int]) -> list[str]:
    return [WORDS[i] for i in ids]


def test_explain_token_rows_attributes_the_prediction():
    rows = [
        {"id": "r1", "ids": [3, 7, 4, 0, 0], "label": 0},  # token 7 present: class 0 wins
        {"id": "r2", "ids": [3, 4, 5], "label": 0},  # absent: logits (0.5+0.5, -0.5) -> class 0
        {"id": "r3", "ids": [7], "label": 1},  # shorter, padded here; predicted 0: wrong
    ]
    out = explain_token_rows(one_token_model(), rows, tokens_of, LABELS, pad_id=0, steps=16)
    assert [e["id"] for e in out] == ["r1", "r2", "r3"]
    r1, r2, r3 = out
    assert r1["tokens"] == ["c", "<script>", "d"]  # pads dropped
    np.testing.assert_allclose(r1["attributions"], [0.0, 3.0, 0.0], atol=1e-5)
    assert (r1["pred"], r1["pred_name"], r1["label_name"], r1["correct"]) == (0, "has-script",
                                                                              "has-script", True)  # fmt: skip
    # logits 0.5 + 3.5 = 4.0 and -3.5: softmax
    assert r1["prob"] == pytest.approx(1 / (1 + np.exp(-7.5)), rel=1e-5)
    assert r1["logit_gap"] == pytest.approx(3.0, abs=1e-5) and abs(r1["delta"]) < 1e-5
    assert r2["attributions"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert r3["tokens"] == ["<script>"] and not r3["correct"]
    assert choose_examples(out, correct=1, wrong=1) == [r1, r3]


def test_tokens_of_must_keep_one_token_per_id():
    rows = [{"id": 1, "ids": [3, 4], "label": 0}]
    with pytest.raises(ValueError, match="one token"):
        explain_token_rows(one_token_model(), rows, lambda ids: ["cd"], LABELS, pad_id=0, steps=2)


def example(i: int, tokens: list[str], attributions: list[float], correct: bool = True) -> dict:
    return {"id": f"ex{i}", "tokens": tokens, "attributions": attributions, "label": 0,
            "pred": 0 if correct else 1, "label_name": "a<b", "pred_name": "a" if correct else "b",
            "prob": 0.9, "delta": 1e-4, "logit_gap": 2.0, "correct": correct}  # fmt: skip


def test_html_escapes_and_colours_by_sign():
    page = attributions_html(
        [example(0, ["<script>", "ok", "bad"], [2.0, 0.0, -1.0]), example(1, ["x"], [0.5], False)],
        "IG <test>",
    )
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<title>IG &lt;test&gt;</title>" in page and "a&lt;b" in page
    assert page.count('<div class="example">') == 2
    assert not re.search(r"<script|https?://|@import|@font-face", page)  # self-contained
    spans = dict(re.findall(r'<span class="tok (\w+)" style="[^"]*" title="([^"]+)">', page))
    assert spans == {"pos": "+0.5000", "zero": "+0.0000", "neg": "-1.0000"}  # last of each
    pos, neg = (",".join(map(str, c)) for c in (POSITIVE, NEGATIVE))
    # full opacity for the example's largest |attribution|, half for half of it
    assert f'style="background:rgba({pos},1.000)" title="+2.0000">&lt;script&gt;' in page
    assert f'style="background:rgba({neg},0.500)" title="-1.0000">bad' in page
    assert f'style="background:rgba({pos},1.000)" title="+0.5000">x' in page
    assert "logit" in page and "padding embedding" in page


def test_figures():
    examples = [example(0, list("abcdefgh"), [0.1, -0.5, 0.3, 0, 0, 0, 0, 2.0]),
                example(1, ["z"], [-1.0], False)]  # fmt: skip
    fig = attributions_figure(examples, "IG", top=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["c", "b", "h"]  # top 3 by |attribution|, largest on top
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    fig = image_attributions_figure(images, np.random.rand(3, 8, 8), ["1", "2", "3"],
                                    ["1", "7", "3"], [0.9, 0.6, 0.8], "cnn", columns=2)  # fmt: skip
    assert len(fig.axes) == 2 * 2 * 2
    fig = image_attributions_figure(np.random.randn(2, 3, 8, 8), np.zeros((2, 8, 8)), ["a", "b"],
                                    ["b", "b"], [0.5, 0.5], "alexnet")  # fmt: skip
    assert len(fig.axes) == 2 * 2


def test_rows_missing_completeness_are_redone_with_more_steps_then_marked():
    model = one_token_model()
    with torch.no_grad():  # the feature relu(3a - 1.4) has a kink part way along the path
        model.features.convs[0].bias.fill_(-1.4)
    rows = [{"id": "r1", "ids": [3, 7, 4], "label": 0}]
    coarse = explain_token_rows(model, rows, tokens_of, LABELS, pad_id=0, steps=3)[0]
    assert coarse["steps"] == 3 and abs(coarse["delta"]) > 1e-3  # 3 points miss the kink
    redone = explain_token_rows(model, rows, tokens_of, LABELS, pad_id=0, steps=3,
                                tolerance=1e-3, max_steps=96)[0]  # fmt: skip
    assert redone["steps"] > 3 and abs(redone["delta"]) < abs(coarse["delta"])
    assert redone["complete"] == (abs(redone["delta"]) <= 1e-3 * max(1, abs(redone["logit_gap"])))
    stuck = explain_token_rows(model, rows, tokens_of, LABELS, pad_id=0, steps=3,
                               tolerance=1e-12, max_steps=6)[0]  # fmt: skip
    assert stuck["steps"] == 6 and not stuck["complete"]
    assert "incomplete after 6 steps" in attributions_html([stuck], "t")
