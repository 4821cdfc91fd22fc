"""The model card of a registered version: what it was trained on, how, how well, for whom it
works less well, why it predicts what it does, where it came from, and why it is (or is not)
the champion. One page, as Markdown and as self-contained HTML (images inline).

Everything comes from MLflow, so a card can be made wherever the tracking store is reachable
(`sparkloom card models:/NAME@ALIAS`), long after the catalog that trained the model is gone:
the version's run (params, metrics, tags, and the artifacts the classifier stages log:
data.json, calibration.json, slices.json, explain/, plots/) and the register decision, which
`register` stores in the card it logs to that run (model_card/model_card.json).
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

CARD_DIR = "model_card"
IMAGES = {  # artifact -> caption, in the order the card shows them
    "plots/confusion_test.png": "Confusion matrix, test split",
    "plots/reliability_test.png": "Reliability diagram, test split",
    "explain/top_terms.png": "Top terms per class",
    "explain/attributions.png": "Token attributions (Integrated Gradients)",
    "explain/saliency.png": "Saliency of misclassified test images",
}
LINEAGE_TAGS = {"sparkloom.quantized_from": "quantized (int8) from",
                "sparkloom.teacher": "distilled from teacher",
                "sparkloom.init_from": "fine-tuned from checkpoint",
                "sparkloom.warm_start": "warm start"}  # fmt: skip
HEADLINE = ("accuracy", "f1", "macro_f1", "weighted_precision", "weighted_recall", "loss")


@dataclass
class ModelCard:
    name: str
    version: str
    aliases: list[str]
    run_id: str
    stage: str
    model: str
    created: str
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # test and validation, overall
    per_class: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)
    explanations: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    images: dict[str, str] = field(default_factory=dict)  # artifact -> local file

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "images"}, indent=2)


def _artifact(client, run_id: str, path: str, into: str, listed: dict | None = None) -> str | None:
    """Local copy of one artifact of the run, or None when it has none; `listed` caches each
    folder's listing, so a card lists a folder once however many files it looks for there."""
    import mlflow

    folder = os.path.dirname(path)
    cache = listed if listed is not None else {}
    if folder not in cache:
        cache[folder] = {a.path for a in client.list_artifacts(run_id, folder or None)}
    if path not in cache[folder]:
        return None
    os.makedirs(into, exist_ok=True)  # the process's tracking URI: the client's too
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=into)


def _json(client, run_id: str, path: str, into: str, listed: dict | None = None) -> Any:
    local = _artifact(client, run_id, path, into, listed)
    if local is None:
        return None
    with open(local) as f:
        return json.load(f)


def build(client, name: str, version: str, into: str, decision: dict | None = None) -> ModelCard:
    """The card of registered version `version` of `name`, its artifacts downloaded into
    `into`. `decision`: register's (RegisterResult as a dict); else the one stored with the
    card register logged, if any."""
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    listed: dict = {}  # folder -> its artifacts, listed once
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    stage = tags.get("sparkloom.stage", "?")
    registered = client.get_registered_model(name)
    aliases = sorted(a for a, v in (registered.aliases or {}).items() if str(v) == str(version))
    if decision is None:
        stored = _json(client, mv.run_id, f"{CARD_DIR}/model_card.json", into, listed)
        decision = (stored or {}).get("decision")
    card = ModelCard(
        name=name, version=str(version), aliases=aliases, run_id=mv.run_id, stage=stage,
        model=tags.get("sparkloom.model", stage),
        created=_when(mv.creation_timestamp),
        decision=decision,
    )  # fmt: skip
    card.data = _json(client, mv.run_id, "data.json", into, listed) or {}
    card.data["fingerprint"] = tags.get("sparkloom.data", card.data.get("fingerprint", ""))
    card.training = {
        "parameters": int(metrics["num_parameters"]) if "num_parameters" in metrics else None,
        "train_seconds": metrics.get("train_seconds"),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "world_size": metrics.get("world_size"),
        "model_fingerprint": tags.get("sparkloom.output_fingerprint", ""),
        "settings": {k: v for k, v in sorted(params.items())},
    }
    labels = card.data.get("labels") or []
    for split in ("test", "val", "validation"):
        for key in HEADLINE:
            if f"{split}_{key}" in metrics:
                card.metrics[f"{split}_{key}"] = metrics[f"{split}_{key}"]
    safe = {lab: "".join(c if c.isalnum() else "_" for c in lab) for lab in labels}
    for lab in labels:
        row = {"label": lab}
        for m in ("precision", "recall", "f1"):
            value = metrics.get(f"test_{m}_{safe[lab]}")
            if value is not None:
                row[m] = value
        if len(row) > 1:
            card.per_class.append(row)
    card.calibration = _json(client, mv.run_id, "calibration.json", into, listed) or {}
    card.calibration.pop("reliability", None)  # the picture shows it
    card.slices = (_json(client, mv.run_id, "slices.json", into, listed) or {}).get("slices", [])
    for kind in ("top_terms", "attributions"):
        found = _json(client, mv.run_id, f"explain/{kind}.json", into, listed)
        if found is not None:
            card.explanations[kind] = found
    card.lineage = {label: tags[t] for t, label in LINEAGE_TAGS.items() if tags.get(t)}
    for path in IMAGES:
        local = _artifact(client, mv.run_id, path, into, listed)
        if local:
            card.images[path] = local
    return card


def _when(ms: int | None) -> str:
    from datetime import datetime, timezone

    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _sections(card: ModelCard) -> list[tuple[str, list[str]]]:
    """(heading, Markdown lines) of every part of the card."""
    d, t = card.data, card.training
    out: list[tuple[str, list[str]]] = []
    splits = d.get("splits", {})
    out.append(("Data", [
        f"- source: `{d.get('input', '?')}` (data fingerprint `{d.get('fingerprint', '')}`)",
        f"- rows: {d.get('rows_in', '?')} read, {d.get('rows_out', '?')} kept, "
        f"{d.get('rows_quarantined', 0)} quarantined {d.get('reasons') or ''}".rstrip(),
        "- split: " + ", ".join(f"{k} {v}" for k, v in splits.items())
        + (f" ({d['split_by']})" if d.get("split_by") else ""),
        f"- labels ({len(d.get('labels', []))}): {', '.join(d.get('labels', []))}",
        *([f"- incremental batches: {d['batches']}"] if d.get("batches") else []),
    ]))  # fmt: skip
    settings = t.get("settings", {})
    shown = ", ".join(f"{k}={v}" for k, v in list(settings.items())[:40])
    out.append(("Training", [
        f"- stage `{card.stage}`, model `{card.model}`, MLflow run `{card.run_id}`",
        *([f"- parameters: {t['parameters']:,}"] if t.get("parameters") else []),
        *([f"- training time: {t['train_seconds']:.1f} s"] if t.get("train_seconds") else []),
        *([f"- epochs: {t['epochs_run']:.0f} (best {t['best_epoch']:.0f}), "
           f"{t.get('world_size') or 1:.0f} processes"] if t.get("epochs_run") else []),
        f"- model fingerprint (data + config digest): `{t.get('model_fingerprint', '')}`",
        f"- settings: {shown or 'none logged'}",
    ]))  # fmt: skip
    lines = ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in card.metrics.items()]
    if card.per_class:
        lines += ["", "| class (test) | precision | recall | F1 |", "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {_fmt(r.get('precision', ''))} | {_fmt(r.get('recall', ''))} "
                  f"| {_fmt(r.get('f1', ''))} |" for r in card.per_class]  # fmt: skip
    out.append(("Metrics", lines))
    c = card.calibration
    if c:
        applied = "applied by batch scoring" if c.get("applied") else "reported, not applied"
        out.append(("Calibration", [
            f"- expected calibration error (test, {c.get('bins')} bins): {_fmt(c.get('test_ece'))} "
            f"at T=1, {_fmt(c.get('test_ece_calibrated'))} at T={_fmt(c.get('temperature'))}",
            f"- temperature fitted on {c.get('fitted_on') or 'nothing (no validation rows)'} "
            f"({c.get('validation_rows', 0)} rows), {applied}",
            f"- NLL test {_fmt(c.get('test_nll'))} -> {_fmt(c.get('test_nll_calibrated'))}; "
            f"validation {_fmt(c.get('val_nll'))} -> {_fmt(c.get('val_nll_calibrated'))}",
        ]))  # fmt: skip
    if card.slices:
        lines = []
        for s in card.slices:
            lines += [f"**{s['name']}** (overall accuracy {s['overall_accuracy']:.4f}; flagged "
                      f"when more than {s['max_gap']:.2f} below)", "",
                      "| slice | test rows | accuracy | F1 | gap |", "|---|---:|---:|---:|---:|"]  # fmt: skip
            lines += [f"| {r['value']}{' **(flagged)**' if r['flagged'] else ''} | {r['count']} "
                      f"| {r['accuracy']:.4f} | {r['f1']:.4f} | {r['gap']:+.4f} |"
                      for r in s["rows"]]  # fmt: skip
            lines.append("")
        out.append(("Slices", lines))
    ex = card.explanations
    if "top_terms" in ex:
        out.append(("Top terms per class", [ex["top_terms"].get("markdown", "")]))
    if "attributions" in ex:
        lines = ["Integrated Gradients on the embedding layer: each token's share of the "
                 "predicted class's logit against an all-padding input.", ""]  # fmt: skip
        for e in ex["attributions"].get("examples", []):
            top = sorted(zip(e["tokens"], e["attributions"], strict=False),
                         key=lambda p: -abs(p[1]))[:8]  # fmt: skip
            verdict = "right" if e["correct"] else "WRONG"
            if not e.get("complete", True):
                verdict += f"; incomplete: delta {e['delta']:+.2f} of gap {e['logit_gap']:.2f}"
            lines.append(f"- `{e['id']}` true **{e['label_name']}**, predicted **{e['pred_name']}** "
                         f"(p={e['prob']:.2f}, {verdict}): "
                         + ", ".join(f"{tok} {a:+.2f}" for tok, a in top))  # fmt: skip
        out.append(("Why it predicts what it does", lines))
    if card.lineage:
        out.append(("Lineage", [f"- {k}: {v}" for k, v in card.lineage.items()]))
    dec = card.decision
    if dec:
        lines = [f"- {dec.get('reason', '')}",
                 f"- promoted: {'yes' if dec.get('promoted') else 'no'}; aliases now: "
                 f"{', '.join(card.aliases) or 'none'}"]  # fmt: skip
        cands = dec.get("candidates") or []
        if cands:
            metric = dec.get("metric", "value")
            lines += ["", f"| candidate | run | {metric} |" + (" frozen set |" if any(
                "frozen" in c for c in cands) else ""), "|---|---|---:|" + ("---:|" if any(
                "frozen" in c for c in cands) else "")]  # fmt: skip
            lines += [f"| {c['stage']} | `{c['run_id'][:8]}` | {c['value']:.4f} |"
                      + (f" {c['frozen']:.4f} |" if "frozen" in c else "") for c in cands]  # fmt: skip
        out.append(("Champion decision", lines))
    return out


def markdown(card: ModelCard, image_dir: str | None = None) -> str:
    """The card as Markdown; images linked from `image_dir` (relative) when given."""
    title = f"# Model card: {card.name} v{card.version} ({card.model})"
    head = [
        title,
        "",
        f"Registered {card.created}; aliases: {', '.join(card.aliases) or 'none'}.",
        "",
    ]
    body = []
    for heading, lines in _sections(card):
        body += [f"## {heading}", "", *lines, ""]
    if image_dir is not None:
        for path in card.images:
            body += [f"![{IMAGES[path]}]({image_dir}/{os.path.basename(path)})", ""]
    return "\n".join(head + body)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em;border-bottom:2px solid #ddd}
h2{font-size:1.2em;margin-top:1.6em;color:#1f4e79}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:.92em}th{background:#f3f6fa}td.n{text-align:right}
.flag{color:#b00020;font-weight:bold}.figs{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;max-width:480px}figure.wide{max-width:100%}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}code{background:#f5f5f5;padding:0 3px}"""


def _md_inline(text: str) -> str:
    """Escape, then the little Markdown the sections use: `code` and **bold**."""
    import re

    s = html.escape(text)
    s = re.sub(r"`([^`]*)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", s)


def _html_lines(lines: list[str]) -> str:
    """Markdown lines (bullets, pipe tables, paragraphs) as HTML."""
    out, table, items = [], [], []

    def flush():
        if items:
            out.append("<ul>" + "".join(f"<li>{_md_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{_md_inline(c)}</th>" for c in cells[0])
            body = "".join(
                "<tr>" + "".join(
                    f"<td class=\"{'n' if _numeric(c) else ''}\">"
                    f"{_md_inline(c).replace('<b>(flagged)</b>', '<span class=flag>(flagged)</span>')}</td>"
                    for c in row) + "</tr>" for row in cells[1:])  # fmt: skip
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()

    for line in lines:
        for sub in line.split("\n"):
            if sub.startswith("|"):
                if items:
                    flush()
                table.append(sub)
            elif sub.startswith("- "):
                if table:
                    flush()
                items.append(sub[2:])
            else:
                flush()
                if sub.strip():
                    out.append(f"<p>{_md_inline(sub)}</p>")
    flush()
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    try:
        float(cell.replace(",", "").replace("+", ""))
        return True
    except ValueError:
        return False


def to_html(card: ModelCard) -> str:
    """The card as one HTML file: inline CSS, images as data URIs, nothing fetched."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(card.name)} "
             f"v{card.version}</title><style>{_CSS}</style></head><body>",
             f"<h1>Model card: {html.escape(card.name)} v{card.version} "
             f"<small>({html.escape(card.model)})</small></h1>",
             f"<p>Registered {card.created}; aliases: "
             f"<b>{html.escape(', '.join(card.aliases) or 'none')}</b>.</p>"]  # fmt: skip
    for heading, lines in _sections(card):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_html_lines(lines))
    if card.images:
        parts.append("<h2>Figures</h2><div class=figs>")
        for path, local in card.images.items():
            with open(local, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            wide = " class=wide" if path.startswith("explain/") else ""
            parts.append(f"<figure{wide}><img alt='{html.escape(IMAGES[path])}' "
                         f"src='data:image/png;base64,{data}'><figcaption>{html.escape(IMAGES[path])}"
                         "</figcaption></figure>")  # fmt: skip
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(card: ModelCard, out_dir: str) -> dict[str, str]:
    """model_card.md (images beside it, in images/), model_card.html and model_card.json."""
    import shutil

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for local in card.images.values():
        shutil.copy(local, os.path.join(out_dir, "images", os.path.basename(local)))
    paths = {"markdown": os.path.join(out_dir, "model_card.md"),
             "html": os.path.join(out_dir, "model_card.html"),
             "json": os.path.join(out_dir, "model_card.json")}  # fmt: skip
    texts = {"markdown": markdown(card, "images"), "html": to_html(card), "json": card.to_json()}
    for kind, path in paths.items():
        with open(path, "w") as f:
            f.write(texts[kind])
    return paths


def log_card(client, name: str, version: str, decision: dict | None) -> ModelCard:
    """Build the card of `name` v`version` and log it (model_card/) to the version's run and
    to the active run (register's)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        card = build(client, name, version, os.path.join(tmp, "artifacts"), decision)
        out = os.path.join(tmp, CARD_DIR)
        write(card, out)
        client.log_artifacts(card.run_id, out, CARD_DIR)
        if mlflow.active_run() is not None:
            mlflow.log_artifacts(out, CARD_DIR)
    return card
