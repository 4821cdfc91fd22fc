"""Compare the models an MLflow experiment has trained: tables, charts, JSON.

Reads the stage runs (tag `sparkloom.stage`) that `pipelines.runner` logs and compares only
runs whose metrics are on the same data and split (tag `sparkloom.data`): one table per
split, newest first. Classifiers go in the main table, ranked by accuracy; the language
models (bert_pretrain, gpt2) in a small table of their own, since their loss and perplexity
are not comparable with accuracy.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sparkloom.pipelines.errors import DataError
from sparkloom.pipelines.stages import CLASSIFIERS, LANGUAGE_MODELS, names

# stage runs that train no model (a score run's metrics are a registered model's on a split)
NOT_MODELS = (*names(kind="data"), "register")
CURVES = ("epoch_val_loss", "epoch_val_accuracy")
_PAGE_SIZE = 1000  # MLflow's maximum per search_runs call; a module constant so tests can page


@dataclass
class Column:
    key: str
    header: str  # "{split}" is replaced by the split's name
    digits: int | None  # None: an integer with thousands separators
    better: str | None = None  # "max", "min", or None when no value is "best" (e.g. size)


COLUMNS = (
    Column("accuracy", "{split} accuracy", 4, "max"),
    Column("f1", "weighted F1", 4, "max"),
    Column("macro_f1", "macro F1", 4, "max"),
    Column("loss", "{split} loss", 4, "min"),
    Column("val_accuracy", "val accuracy", 4, "max"),
    Column("num_parameters", "parameters", None),
    Column("train_seconds", "train s", 1),
    Column("train_rows_per_s", "train rows/s", None),
)
LM_COLUMNS = (
    Column("loss", "{split} loss", 4),
    Column("perplexity", "perplexity", 2),
    Column("token_accuracy", "token accuracy", 4),
    Column("num_parameters", "parameters", None),
    Column("train_seconds", "train s", 1),
)


def _metric_keys(split: str) -> dict[str, tuple[str, ...]]:
    """Our column -> the MLflow metric names that hold it, first found wins. Classification
    metrics carry the split's full name (validation_f1); losses and LM metrics say `val`."""
    p = "val" if split == "validation" else split
    return {
        "accuracy": (f"{split}_accuracy",),
        "f1": (f"{split}_f1",),
        "macro_f1": (f"{split}_macro_f1",),
        "loss": (f"{p}_loss",),
        "val_accuracy": ("validation_accuracy", "val_accuracy"),
        "perplexity": (f"{p}_perplexity",),
        "token_accuracy": (f"{p}_token_accuracy", f"{p}_mlm_accuracy"),
        "num_parameters": ("num_parameters",),
        "train_seconds": ("train_seconds",),
        "train_rows_per_s": ("train_rows_per_s",),
    }


@dataclass
class Row:
    """One stage run: a trained model and its metrics on the split."""

    stage: str
    run_id: str
    run_name: str
    parent_run_id: str | None
    start_time: int  # ms since the epoch, as MLflow stores it
    status: str
    data: str | None  # sparkloom.data: the ingested data and split the metrics are on
    skipped: bool
    metrics: dict[str, float | None]
    params: dict[str, str]
    differing_params: dict[str, str] = field(default_factory=dict)
    best: list[str] = field(default_factory=list)  # the columns where this run is best
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = "" if self.run_name in ("", self.stage) else f"{self.run_name} "
        return f"{name}{self.run_id[:8]}"

    @property
    def started(self) -> str:
        t = datetime.fromtimestamp(self.start_time / 1000, tz=timezone.utc)
        return t.strftime("%Y-%m-%d %H:%M")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["started"] = self.started
        d["metrics"] = {k: _finite(v) for k, v in self.metrics.items()}
        d["curves"] = {k: [[s, _finite(v)] for s, v in pts] for k, pts in self.curves.items()}
        return d


@dataclass
class Group:
    """The runs evaluated on one dataset and split: the only ones a table compares."""

    data: str | None
    rows: list[Row]  # classifiers, best accuracy first
    language_models: list[Row]
    differing: dict[str, list[str]]  # stage -> params whose values differ between its runs

    @property
    def latest(self) -> int:
        return max(r.start_time for r in [*self.rows, *self.language_models])

    @property
    def short_title(self) -> str:
        return "data unknown" if self.data is None else f"data {self.data[:12]}"

    @property
    def title(self) -> str:
        if self.data is None:
            return f"{self.short_title} (runs from before sparkloom.data: splits may differ)"
        return self.short_title


@dataclass
class ComparisonReport:
    experiment: str
    experiment_id: str
    split: str
    out_dir: str
    rows: list[Row]  # every compared classifier run, in table order
    groups: list[Group]  # newest first
    notes: list[str]
    paths: dict[str, str] = field(default_factory=dict)  # markdown, html, json, charts

    @property
    def language_models(self) -> list[Row]:
        return [r for g in self.groups for r in g.language_models]

    def terminal_table(self) -> str:
        """Plain-text aligned tables, `*` marking the best value in a column."""
        out = [_heading(self), *self.notes, ""]
        for g in self.groups:
            out.append(f"== {g.title}")
            for title, table in _tables(g, self.split):
                if title:
                    out.append(f"-- {title}")
                out += [_text(table), ""]
        if any(r.best for r in self.rows):
            out.append("* best in its column")
        return "\n".join(out).rstrip() + "\n"


def compare_experiment(
    experiment: str,
    out_dir: str,
    tracking_uri: str | None = None,
    split: str = "test",
    include_skipped: bool = False,
) -> ComparisonReport:
    """Compare the finished model runs of `experiment`, write comparison.md/.html/.json and
    charts into `out_dir`; returns the report. Raises DataError when there is nothing to
    compare."""
    from mlflow.tracking import MlflowClient

    split = "validation" if split == "val" else split
    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    runs = _search_all(client, exp.experiment_id)
    rows, lms, notes = _select(runs, split, include_skipped)
    if not rows and not lms:
        raise DataError(_nothing_to_compare(experiment, runs, split, notes))
    groups = _group(rows, lms)
    for row in rows:
        _load_curves(client, row, runs[row.run_id].data.metrics)
    if len(groups) > 1:
        notes.append(
            f"These runs were evaluated on {len(groups)} different data splits (tag "
            "sparkloom.data); only runs on the same split are compared: one table per split, "
            "newest first."
        )
    report = ComparisonReport(
        experiment, exp.experiment_id, split, str(out_dir),
        [r for g in groups for r in g.rows], groups, notes,
    )  # fmt: skip
    _write(report)
    return report


def log_report(report: ComparisonReport) -> None:
    """The report's files as artifacts of the active MLflow run, under comparison/."""
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_report needs an active MLflow run (mlflow.start_run())")
    for path in report.paths.values():
        mlflow.log_artifact(path, artifact_path="comparison")


def _check_store(tracking_uri: str | None) -> None:
    # MLflow would create an empty database at a wrong path instead of failing
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :]
        if not os.path.isfile(path):
            raise DataError(
                f"no MLflow store at {path} ({tracking_uri}); pass the --tracking-uri (or the "
                "--conf) the pipeline ran with"
            )


def _experiment(client, name: str, tracking_uri: str | None):
    exp = client.get_experiment_by_name(name)
    if exp is None and name.isdigit():  # an experiment id
        from mlflow.exceptions import MlflowException

        try:
            exp = client.get_experiment(name)
        except MlflowException:
            exp = None
    if exp is not None and exp.lifecycle_stage == "active":
        return exp
    names = sorted(e.name for e in client.search_experiments(max_results=1000))
    where = tracking_uri or "the default MLflow store"
    known = f"experiments there: {', '.join(names)}" if names else "it has no experiments yet"
    state = "is deleted" if exp is not None else "not found"
    raise DataError(f"experiment '{name}' {state} in {where}; {known}")


def _search_all(client, experiment_id: str) -> dict:
    """Every active run of the experiment, page by page (one call returns at most 1000)."""
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], max_results=_PAGE_SIZE, page_token=token,
                                  order_by=["attributes.start_time DESC"])  # fmt: skip
        runs.update((r.info.run_id, r) for r in page)
        token = page.token
        if not token:
            return runs


def _select(runs: dict, split: str, include_skipped: bool) -> tuple[list[Row], list[Row], list]:
    """Classifier rows, language-model rows, and notes on what was left out and why."""
    keys = _metric_keys(split)
    rows, lms, left_out = [], [], {}
    for run in runs.values():
        tags, stage = run.data.tags, run.data.tags.get("sparkloom.stage")
        if stage is None or stage in NOT_MODELS:
            continue
        metrics = {k: next((run.data.metrics[n] for n in names if n in run.data.metrics), None)
                   for k, names in keys.items()}  # fmt: skip
        lm = stage in LANGUAGE_MODELS
        if run.info.status != "FINISHED":
            reason = run.info.status
        elif tags.get("sparkloom.skipped") == "true" and not include_skipped:
            reason = "skipped"
        elif lm and metrics["loss"] is None and metrics["perplexity"] is None:
            reason = f"without {split} loss or perplexity"
        elif not lm and metrics["accuracy"] is None:
            reason = f"without {split}_accuracy"
        else:
            reason = None
        if reason is not None:
            left_out[reason] = left_out.get(reason, 0) + 1
            continue
        row = Row(
            tags.get("sparkloom.model", stage),  # a model's own name, e.g. bert-int8 (quantize)
            run.info.run_id, run.info.run_name or "", tags.get("mlflow.parentRunId"),
            run.info.start_time or 0, run.info.status, tags.get("sparkloom.data"),
            tags.get("sparkloom.skipped") == "true", metrics, dict(run.data.params),
        )  # fmt: skip
        (lms if lm else rows).append(row)
    notes = []
    if left_out:
        why = {"skipped": "up to date, the model of an earlier run; --include-skipped keeps them"}
        parts = [f"{n} {reason}" + (f" ({why[reason]})" if reason in why else "")
                 for reason, n in sorted(left_out.items())]  # fmt: skip
        notes.append(f"Stage runs left out: {'; '.join(parts)}. Only FINISHED runs are compared.")
    return rows, lms, notes


def _nothing_to_compare(experiment: str, runs: dict, split: str, notes: list[str]) -> str:
    stages = {}
    for r in runs.values():
        s = r.data.tags.get("sparkloom.stage")
        if s:
            stages[s] = stages.get(s, 0) + 1
    found = ", ".join(f"{s} x{n}" for s, n in sorted(stages.items())) or "none"
    return " ".join([
        f"experiment '{experiment}' has no finished model runs with {split} metrics to compare "
        f"(stage runs found: {found}).", *notes,
        f"Run a model stage first: one of {', '.join(CLASSIFIERS)} (or the language models "
        f"{', '.join(LANGUAGE_MODELS)}), after ingest and features, e.g. `sparkloom run "
        "--conf FILE` with them in pipeline.stages",
    ])  # fmt: skip


def _group(rows: list[Row], lms: list[Row]) -> list[Group]:
    by_data: dict[str | None, tuple[list[Row], list[Row]]] = {}
    for r in rows:
        by_data.setdefault(r.data, ([], []))[0].append(r)
    for r in lms:
        by_data.setdefault(r.data, ([], []))[1].append(r)
    groups = []
    for data, (cls, lm) in by_data.items():
        cls.sort(key=lambda r: (-_num(r.metrics["accuracy"]), -_num(r.metrics["f1"]),
                                -r.start_time))  # fmt: skip
        lm.sort(key=lambda r: (r.stage, _num(r.metrics["perplexity"], math.inf), -r.start_time))
        groups.append(Group(data, cls, lm, _differing(cls) | _differing(lm)))
        _mark_best(cls)
    return sorted(groups, key=lambda g: -g.latest)


def _differing(rows: list[Row]) -> dict[str, list[str]]:
    """Per stage with 2+ runs: the params whose values are not all equal (absent counts)."""
    out = {}
    for stage in dict.fromkeys(r.stage for r in rows):
        same = [r for r in rows if r.stage == stage]
        if len(same) < 2:
            continue
        keys = sorted({k for r in same for k in r.params})
        diff = [k for k in keys if len({r.params.get(k) for r in same}) > 1]
        if diff:
            out[stage] = diff
            for r in same:
                r.differing_params = {k: r.params.get(k, "") for k in diff}
    return out


def _mark_best(rows: list[Row]) -> None:
    if len(rows) < 2:
        return
    for c in COLUMNS:
        values = [r.metrics[c.key] for r in rows if _finite(r.metrics[c.key]) is not None]
        if c.better is None or not values:
            continue
        best = max(values) if c.better == "max" else min(values)
        for r in rows:
            if r.metrics[c.key] == best:
                r.best.append(c.key)


def _load_curves(client, row: Row, latest: dict[str, float]) -> None:
    for key in CURVES:
        if key in latest:  # only deep models log per-epoch series
            points = {}
            for m in sorted(client.get_metric_history(row.run_id, key), key=lambda m: m.timestamp):
                points[m.step] = m.value  # a resumed run logs an epoch again: the last wins
            row.curves[key] = sorted(points.items())


# ---- rendering: one table model, three renderers (markdown, HTML, text)


@dataclass
class Table:
    headers: list[str]
    cells: list[list[str]]
    numeric: list[bool]
    marked: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of best values
    titles: dict[tuple[int, int], str] = field(default_factory=dict)  # HTML hover: full run ids


def _tables(g: Group, split: str) -> list[tuple[str, Table]]:
    """The tables of one group, each with its sub-heading ("" for the main one)."""
    out = []
    if g.rows:
        out.append(("", _model_table(g.rows, COLUMNS, split, ranked=True)))
    for stage, keys in g.differing.items():
        same = [r for r in [*g.rows, *g.language_models] if r.stage == stage]
        t = Table(["run", *keys], [[r.label, *(r.differing_params[k] or "-" for k in keys)]
                                   for r in same], [False] * (len(keys) + 1))  # fmt: skip
        t.titles = {(i, 0): r.run_id for i, r in enumerate(same)}
        out.append((f"{stage}: params that differ between its runs", t))
    if g.language_models:
        t = _model_table(g.language_models, LM_COLUMNS, split, ranked=False)
        out.append(("language models (loss and perplexity are per token)", t))
    return out


def _model_table(rows: list[Row], columns, split: str, ranked: bool) -> Table:
    name = "val" if split == "validation" else split
    headers = ["#"] * ranked + ["model", "run", "pipeline run", "started (UTC)"]
    headers += [c.header.format(split=name) for c in columns]
    t = Table(headers, [], [True] * ranked + [False] * 4 + [True] * len(columns))
    for i, r in enumerate(rows):
        model = r.stage + (" (skipped)" if r.skipped else "")
        front = [str(i + 1)] * ranked + [model, r.label, (r.parent_run_id or "-")[:8], r.started]
        t.cells.append(front + [_fmt(r.metrics[c.key], c.digits) for c in columns])
        run_col = 1 + ranked  # after "#" and "model"
        t.titles |= {(i, run_col): r.run_id, (i, run_col + 1): r.parent_run_id or ""}
        t.marked |= {(i, len(front) + j) for j, c in enumerate(columns) if c.key in r.best}
    return t


def _markdown(t: Table) -> str:
    def cell(i, j, v):
        v = v.replace("|", "\\|")
        return f"**{v}**" if (i, j) in t.marked else v

    lines = ["| " + " | ".join(t.headers) + " |",
             "| " + " | ".join("---:" if n else "---" for n in t.numeric) + " |"]  # fmt: skip
    lines += ["| " + " | ".join(cell(i, j, v) for j, v in enumerate(row)) + " |"
              for i, row in enumerate(t.cells)]  # fmt: skip
    return "\n".join(lines)


def _html_table(t: Table) -> str:
    def td(i, j, v):
        cls = ' class="num"' if t.numeric[j] else ""
        if (i, j) in t.titles:
            cls += f' title="{html.escape(t.titles[i, j])}"'
        v = html.escape(v)
        return f"<td{cls}>{f'<strong>{v}</strong>' if (i, j) in t.marked else v}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(td(i, j, v) for j, v in enumerate(row)) + "</tr>"
                   for i, row in enumerate(t.cells))  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(t: Table) -> str:
    cells = [[v + ("*" if (i, j) in t.marked else "") for j, v in enumerate(row)]
             for i, row in enumerate(t.cells)]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(t.headers, *cells, strict=False)]

    def line(row):
        return "  ".join(v.rjust(w) if n else v.ljust(w)
                         for v, w, n in zip(row, widths, t.numeric, strict=True)).rstrip()  # fmt: skip

    return "\n".join([line(t.headers), line(["-" * w for w in widths]), *map(line, cells)])


def _heading(report: ComparisonReport) -> str:
    n, k = len(report.rows), len(report.language_models)
    return (f"Experiment '{report.experiment}': {_plural(n, 'classifier run')}"
            + (f" and {_plural(k, 'language-model run')}" if k else "")
            + f" compared on the {report.split} split")  # fmt: skip


def _write(report: ComparisonReport) -> None:
    out = Path(report.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = {}
    if report.rows:
        charts["metric_bars"] = _save(_bars_figure(report), out / "metric_bars.png")
    if any(r.curves for r in report.rows):
        charts["learning_curves"] = _save(_curves_figure(report), out / "learning_curves.png")
    paths = {"markdown": str(out / "comparison.md"), "html": str(out / "comparison.html"),
             "json": str(out / "comparison.json")}  # fmt: skip
    Path(paths["markdown"]).write_text(_render_markdown(report, charts))
    Path(paths["html"]).write_text(_render_html(report, charts))
    Path(paths["json"]).write_text(json.dumps(_to_json(report), indent=2) + "\n")
    report.paths = {**paths, **charts}


def _render_markdown(report: ComparisonReport, charts: dict[str, str]) -> str:
    md = [f"# {_heading(report)}", ""]
    md += [*(f"{n}\n" for n in report.notes)]
    for g in report.groups:
        md += [f"## {g.title}", ""]
        for title, table in _tables(g, report.split):
            md += [f"### {title}", ""] * bool(title) + [_markdown(table), ""]
    if any(r.best for r in report.rows):
        md += ["Bold: the best value in its column (within the table).", ""]
    md += [f"![{name}]({os.path.basename(path)})\n" for name, path in charts.items()]
    return "\n".join(md)


def _render_html(report: ComparisonReport, charts: dict[str, str]) -> str:
    title = html.escape(_heading(report))
    parts = [f"<h1>{title}</h1>", *(f"<p>{html.escape(n)}</p>" for n in report.notes)]
    for g in report.groups:
        parts.append(f"<h2>{html.escape(g.title)}</h2>")
        for sub, table in _tables(g, report.split):
            parts += [f"<h3>{html.escape(sub)}</h3>"] * bool(sub) + [_html_table(table)]
    if any(r.best for r in report.rows):
        parts.append("<p><strong>Bold</strong>: the best value in its column.</p>")
    for name, path in charts.items():  # embedded: the page is one self-contained file
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(f'<img alt="{name}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0 "
             "1.5em}th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f3f3f3}"
             "td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}")  # fmt: skip
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")  # fmt: skip


def _to_json(report: ComparisonReport) -> dict:
    return {
        "experiment": report.experiment,
        "experiment_id": report.experiment_id,
        "split": report.split,
        "notes": report.notes,
        "groups": [
            {
                "data": g.data,
                "run_ids": [r.run_id for r in g.rows],
                "language_model_run_ids": [r.run_id for r in g.language_models],
                "differing_params": g.differing,
            }
            for g in report.groups
        ],
        "rows": [r.to_dict() for r in report.rows],
        "language_models": [r.to_dict() for r in report.language_models],
    }


# ---- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    plt = _pyplot()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _bars_figure(report: ComparisonReport):
    """Accuracy and weighted F1 per run, one panel per data split."""
    plt = _pyplot()
    groups = [g for g in report.groups if g.rows]
    width = max(6.0, 0.8 * max(len(g.rows) for g in groups) + 2)
    fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3.4 * len(groups)), dpi=110,
                             squeeze=False)  # fmt: skip
    for ax, g in zip(axes[:, 0], groups, strict=True):
        x = range(len(g.rows))
        for offset, key, name in ((-0.2, "accuracy", f"{report.split} accuracy"),
                                  (0.2, "f1", "weighted F1")):  # fmt: skip
            values = [_num(r.metrics[key], 0.0) for r in g.rows]
            bars = ax.bar([i + offset for i in x], values, width=0.4, label=name)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
        ax.set_xticks(list(x), [f"{r.stage}\n{r.run_id[:8]}" for r in g.rows], fontsize=8)
        ax.set_ylim(0, 1.22)  # headroom for the legend above the bars
        ax.set_title(g.short_title, fontsize=9)
        ax.legend(fontsize=8, loc="upper right", ncol=2)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _curves_figure(report: ComparisonReport):
    """Validation loss and accuracy per epoch of every deep-model run, one row per split."""
    plt = _pyplot()
    groups = [g for g in report.groups if any(r.curves for r in g.rows)]
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.6 * len(groups)), dpi=110,
                             squeeze=False)  # fmt: skip
    for (loss_ax, acc_ax), g in zip(axes, groups, strict=True):
        for r in g.rows:
            for ax, key in ((loss_ax, "epoch_val_loss"), (acc_ax, "epoch_val_accuracy")):
                if r.curves.get(key):
                    steps, values = zip(*r.curves[key], strict=True)
                    ax.plot(steps, values, marker="o", markersize=3, label=r.stage + " " + r.label)
        for ax, name in ((loss_ax, "validation loss"), (acc_ax, "validation accuracy")):
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            ax.set_title(g.short_title, fontsize=9)
        acc_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- small helpers


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _num(v: float | None, missing: float = -math.inf) -> float:
    return v if v is not None and math.isfinite(v) else missing


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(v: float | None, digits: int | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{int(v):,}" if digits is None else f"{v:.{digits}f}"


def safe_name(name: str) -> str:
    """An experiment name as one folder name (names may hold slashes: /Users/x/exp)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "experiment"
