"""Token and pixel attributions for the report: which words (pixels) moved the prediction.

Driver side, no Spark: a handful of test rows go through models.attribution (Integrated
Gradients of the predicted class's logit) and come out as an HTML page of shaded tokens, a
bar chart per example, or a grid of images under their heat maps.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from sparkloom.models.attribution import token_attributions

POSITIVE, NEGATIVE = (0, 150, 60), (215, 40, 40)  # RGB: raises / lowers the predicted logit
ABOUT = (
    "Integrated Gradients (Sundararajan et al., 2017) splits the predicted class's logit "
    "(not its probability) among the tokens: an example's attributions add up to "
    "logit(text) - logit(baseline), where the baseline puts the padding embedding at every "
    "token (special tokens and the attention mask kept); delta is how far the sum misses that."
)


def explain_token_rows(
    model: nn.Module,
    rows: list[dict[str, Any]],
    tokens_of: Callable[[list[int]], list[str]],
    labels: list[str],
    pad_id: int,
    keep_ids: set[int] | None = None,
    steps: int = 50,
    tolerance: float = 0.05,
    max_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Rows {id, ids (right-padded, as tested), label} -> one dict per row: id, tokens,
    attributions (of the predicted class, pads dropped), label, pred, label_name, pred_name,
    prob, delta, logit_gap, steps, complete, correct.

    Completeness: a row whose |delta| exceeds `tolerance` x max(1, |logit gap|) is attributed
    again with twice the steps, up to `max_steps`, keeping its smallest delta; `complete`
    says whether it ended within the tolerance. A recurrent model's logit can jump along the
    path (a gate saturating flips the state), and then no number of steps closes the gap:
    the row is shown anyway, marked incomplete, rather than hidden."""
    if not rows:
        return []
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        ids[i, : len(r["ids"])] = torch.as_tensor(r["ids"], dtype=torch.long)
    res = token_attributions(model, ids, None, pad_id, steps=steps, keep_ids=keep_ids)
    used = np.full(len(rows), steps)
    relative = lambda d, g: np.abs(d) / np.maximum(1.0, np.abs(g))  # noqa: E731
    n = steps
    while (bad := np.flatnonzero(relative(res.delta, res.logit_gap) > tolerance)).size and (
        max_steps and n * 2 <= max_steps
    ):
        n *= 2
        again = token_attributions(model, ids[bad], torch.as_tensor(res.targets[bad]), pad_id,
                                   steps=n, keep_ids=keep_ids)  # fmt: skip
        better = relative(again.delta, again.logit_gap) < relative(
            res.delta[bad], res.logit_gap[bad]
        )
        for j, i in enumerate(bad):
            if better[j]:
                res.attributions[i], res.delta[i], used[i] = (
                    again.attributions[j],
                    again.delta[j],
                    n,
                )
    probs = torch.from_numpy(res.logits).softmax(-1).numpy()  # (B, C)
    out = []
    for i, r in enumerate(rows):
        real = ids[i] != pad_id
        kept = ids[i][real].tolist()
        tokens = list(tokens_of(kept))
        if len(tokens) != len(kept):
            raise ValueError(
                f"tokens_of gave {len(tokens)} tokens for the {len(kept)} ids of row {r['id']!r}; "
                "it must map each id to one token (no merging of subwords)"
            )
        pred, label = int(res.targets[i]), int(r["label"])
        out.append({
            "id": r["id"], "tokens": tokens,
            "attributions": res.attributions[i][real.numpy()].astype(float).tolist(),
            "label": label, "pred": pred, "label_name": labels[label], "pred_name": labels[pred],
            "prob": float(probs[i, pred]), "delta": float(res.delta[i]),
            "logit_gap": float(res.logit_gap[i]), "steps": int(used[i]),
            "complete": bool(relative(res.delta[i], res.logit_gap[i]) <= tolerance),
            "correct": pred == label,
        })  # fmt: skip
    return out


def choose_examples(
    explained: list[dict[str, Any]], correct: int = 2, wrong: int = 1
) -> list[dict[str, Any]]:
    """The most confident `correct` right predictions and `wrong` wrong ones, in that order."""
    by_prob = sorted(explained, key=lambda e: -e["prob"])
    return ([e for e in by_prob if e["correct"]][:correct]
            + [e for e in by_prob if not e["correct"]][:wrong])  # fmt: skip


def _shade(value: float, scale: float) -> tuple[str, str]:
    """(css class, background) for one token: green raises the logit, red lowers it, opacity
    |value| / the example's largest |value|."""
    alpha = abs(value) / scale if scale > 0 else 0.0
    kind = "pos" if value > 0 else "neg" if value < 0 else "zero"
    r, g, b = NEGATIVE if value < 0 else POSITIVE
    return kind, f"rgba({r},{g},{b},{alpha:.3f})"


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 62em; color: #222; line-height: 1.5; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.meta { font-size: 0.9em; color: #555; margin-bottom: 0.4em; }
.meta .wrong { color: #b22; font-weight: bold; }
.tok { display: inline-block; padding: 0 3px; margin: 1px; border-radius: 3px; }
.legend { font-size: 0.9em; color: #444; }
"""


def _incomplete(e: dict[str, Any]) -> str:
    if e.get("complete", True):
        return ""
    return (f' <span class="wrong">(incomplete after {e.get("steps", "?")} steps: the '
            "attributions do not add up to the logit gap; read them with care)</span>")  # fmt: skip


def attributions_html(examples: list[dict[str, Any]], title: str) -> str:
    """A self-contained page (inline CSS, no script, no web fonts): one block per example,
    its tokens shaded by attribution, the value in each token's tooltip."""
    blocks = []
    for e in examples:
        values = [float(a) for a in e["attributions"]]
        scale = max((abs(a) for a in values), default=0.0)
        spans = []
        for tok, a in zip(e["tokens"], values, strict=True):
            kind, bg = _shade(a, scale)
            spans.append(f'<span class="tok {kind}" style="background:{bg}" '
                         f'title="{a:+.4f}">{html.escape(tok)}</span>')  # fmt: skip
        verdict = "right" if e["correct"] else '<span class="wrong">wrong</span>'
        blocks.append(
            f'<div class="example">\n<div class="meta">{html.escape(str(e["id"]))} &middot; '
            f"true <b>{html.escape(e['label_name'])}</b> &middot; predicted "
            f"<b>{html.escape(e['pred_name'])}</b> (p={e['prob']:.3f}, {verdict}) &middot; "
            f"logit - baseline {e['logit_gap']:+.3f} &middot; completeness delta "
            f"{e['delta']:+.2e}{_incomplete(e)}</div>\n<div>{' '.join(spans)}</div>\n</div>"
        )
    pos, neg = (f"rgba({r},{g},{b},0.8)" for r, g, b in (POSITIVE, NEGATIVE))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(ABOUT)}</p>",
        f'<p class="legend"><span class="tok pos" style="background:{pos}">green</span> raises '
        f'the predicted class\'s logit, <span class="tok neg" style="background:{neg}">red</span> '
        "lowers it; the stronger the colour, the larger |attribution| against the example's "
        "largest. Hover a token for its value.</p>",
        *blocks, "</body>", "</html>", "",
    ])  # fmt: skip


def _colours(values: Sequence[float]) -> list[tuple[float, float, float]]:
    return [tuple(c / 255 for c in (POSITIVE if v > 0 else NEGATIVE)) for v in values]


def attributions_figure(examples: list[dict[str, Any]], title: str, top: int = 15) -> Figure:
    """One horizontal bar panel per example: its `top` tokens by |attribution|, largest on top."""
    n = max(1, len(examples))
    fig = Figure(figsize=(7.0, 0.5 + n * (0.28 * top + 0.8)), dpi=120)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, e in zip(axes, examples, strict=False):
        values = np.asarray(e["attributions"], dtype=float)
        order = np.argsort(-np.abs(values), kind="stable")[:top][::-1]
        ax.barh(range(len(order)), values[order], color=_colours(values[order]))
        ax.set_yticks(range(len(order)), labels=[e["tokens"][i] for i in order], fontsize=8)
        ax.axvline(0, color="#888", linewidth=0.8)
        ax.set_title(f"{e['id']}: true {e['label_name']}, predicted {e['pred_name']} "
                     f"({e['prob']:.2f})", fontsize=9,
                     color="black" if e["correct"] else "firebrick")  # fmt: skip
    if examples:
        axes[len(examples) - 1].set_xlabel("attribution to the predicted class's logit")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _displayable(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W, C) in [0, 1]: uint8 scaled, floats (standardized) min-max."""
    img = np.moveaxis(np.asarray(img), 0, -1)
    if img.dtype == np.uint8:
        return img / 255.0
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img, dtype=float)


def image_attributions_figure(
    images: np.ndarray | torch.Tensor, maps: np.ndarray, true: list[str], predicted: list[str],
    probs: list[float], title: str, columns: int = 6,
) -> Figure:  # fmt: skip
    """Each image (B, C, H, W, uint8 or float) above itself under its IG map (B, H, W),
    titled `true -> predicted (p)`; each map scaled to its own maximum."""
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n = len(images)
    cols = min(columns, max(1, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.7 * cols, 3.4 * rows + 0.4), dpi=120)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        img = _displayable(images[i])
        gray = img.shape[-1] == 1
        shown = img[:, :, 0] if gray else img
        for ax in (top, bottom):
            ax.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=1)
        m = np.asarray(maps[i], dtype=float)
        bottom.imshow(m / m.max() if m.max() > 0 else m, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        top.set_title(f"{true[i]} \u2192 {predicted[i]} ({probs[i]:.2f})", fontsize=8,
                      color="black" if true[i] == predicted[i] else "firebrick")  # fmt: skip
    fig.suptitle(f"{title}: Integrated Gradients, |attribution| summed over channels",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig
