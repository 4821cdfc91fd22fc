"""Classification metrics, reports and plots from a confusion matrix.

Pure numpy/matplotlib, so Spark models and torch models are scored the same way.
Weighted scores weight each class by its number of true examples, as Spark's
MulticlassClassificationEvaluator and scikit-learn's `average="weighted"` do.
"""

from __future__ import annotations

import numpy as np


def confusion_from_counts(rows: list[tuple[int, int, int]], num_classes: int) -> np.ndarray:
    """(true, predicted, count) triples -> matrix[true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p, n in rows:
        cm[int(t), int(p)] += int(n)
    return cm


def classification_metrics(cm: np.ndarray, labels: list[str]) -> dict[str, float]:
    """accuracy, weighted precision/recall/F1, and per-class precision/recall/F1."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    w = support / total if total else support
    out = {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "weighted_precision": float((w * precision).sum()),
        "weighted_recall": float((w * recall).sum()),
        "f1": float((w * f1).sum()),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "majority_class_accuracy": float(support.max() / total) if total else 0.0,
        "num_examples": float(total),
    }
    for i, name in enumerate(labels):
        out[f"precision_{_safe(name)}"] = float(precision[i])
        out[f"recall_{_safe(name)}"] = float(recall[i])
        out[f"f1_{_safe(name)}"] = float(f1[i])
    return out


def classification_report(cm: np.ndarray, labels: list[str], title: str) -> str:
    """A markdown table: one row per class, then the weighted average."""
    m = classification_metrics(cm, labels)
    support = cm.sum(axis=1)
    lines = [
        f"## {title}",
        "",
        "| class | precision | recall | f1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for i, name in enumerate(labels):
        s = _safe(name)
        lines.append(
            f"| {name} | {m['precision_' + s]:.4f} | {m['recall_' + s]:.4f} | {m['f1_' + s]:.4f} | {support[i]} |"
        )
    lines.append(
        f"| **weighted** | {m['weighted_precision']:.4f} | {m['weighted_recall']:.4f} | "
        f"{m['f1']:.4f} | {int(support.sum())} |"
    )
    lines += [
        "",
        f"accuracy: {m['accuracy']:.4f} (majority class: {m['majority_class_accuracy']:.4f})",
        "",
    ]
    return "\n".join(lines)


def confusion_figure(cm: np.ndarray, labels: list[str], title: str):
    """A labelled confusion-matrix heatmap (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.7 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=120)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")  # fmt: skip
    fig.tight_layout()
    return fig


def _safe(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def learning_curves_figure(history: list[dict[str, float]], title: str):
    """Loss (train, validation) and validation accuracy per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    if all("val_loss" in h for h in history):
        left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy loss")
    left.legend()
    if all("val_accuracy" in h for h in history):
        right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green")
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def misclassified_figure(
    images: np.ndarray, true: list[str], predicted: list[str], probs: list[float], title: str,
    columns: int = 8,
):  # fmt: skip
    """A grid of images (N, H, W, C) uint8, each titled `true -> predicted (p)`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(columns, max(1, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p, pr in zip(axes.flat, images, true, predicted, probs, strict=False):
        gray = img.shape[-1] == 1
        ax.imshow(img[:, :, 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255)
        ax.set_title(f"{t} \u2192 {p} ({pr:.2f})", fontsize=8, color="firebrick")
    fig.suptitle(f"{title}: {n} misclassified (true \u2192 predicted, p)", fontsize=10)
    fig.tight_layout()
    return fig


def drift_figure(d: dict):
    """The drift stage's report (pipelines.drift.DriftResult as a dict) as four panels:
    labels, lengths (text) or pixel means (images), words out of vocabulary, the champion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    ref_c, new_c = "#4c72b0", "#dd8452"
    ref_name = f"earlier training rows ({d['rows_reference']})"
    new_name = f"batch {d['batch']} ({d['rows_new']})"

    def bars(ax, names, ref, new, title, fmt="{:.2f}"):
        x = np.arange(len(names))
        ax.bar(x - 0.2, ref, 0.4, label=ref_name, color=ref_c)
        ax.bar(x + 0.2, new, 0.4, label=new_name, color=new_c)
        ax.set_xticks(x, labels=names, rotation=30 if len(names) > 4 else 0, ha="right"
                      if len(names) > 4 else "center")  # fmt: skip
        for xi, v in zip(x, new, strict=True):
            ax.text(xi + 0.2, v, fmt.format(v), ha="center", va="bottom", fontsize=7)
        ax.set_title(title, fontsize=10)

    labels = sorted(set(d["labels_reference"]) | set(d["labels_new"]))
    bars(axes[0, 0], labels, [d["labels_reference"].get(x, 0) for x in labels],
         [d["labels_new"].get(x, 0) for x in labels],
         f"label shares (PSI {d['label_psi']:.3f})")  # fmt: skip
    axes[0, 0].legend(fontsize=7)
    ax = axes[0, 1]
    if d.get("pixel_mean_new") is not None:
        names = [f"channel {i}" for i in range(len(d["pixel_mean_new"]))]
        bars(
            ax,
            names,
            d["pixel_mean_reference"],
            d["pixel_mean_new"],
            "pixel mean (x/255)",
            "{:.3f}",
        )
    elif d.get("length_bins") is not None and d.get("length_psi") is not None:
        edges = [0, *d["length_bins"]]
        names = [f"<{e:.0f}" for e in d["length_bins"]] + [f">={edges[-1]:.0f}"]
        bars(ax, names, d["length_reference"], d["length_new"],
             f"words per document, reference deciles (PSI {d['length_psi']:.3f}; mean "
             f"{d['mean_length_reference']:.0f} -> {d['mean_length_new']:.0f})")  # fmt: skip
    ax = axes[1, 0]
    if d.get("oov_rate_new") is not None:
        bars(ax, ["out-of-vocabulary rate"], [d["oov_rate_reference"]], [d["oov_rate_new"]],
             "words the fitted features do not know", "{:.3f}")  # fmt: skip
    elif d.get("pixel_std_new") is not None:
        names = [f"channel {i}" for i in range(len(d["pixel_std_new"]))]
        bars(ax, names, d["pixel_std_reference"], d["pixel_std_new"], "pixel std (x/255)", "{:.3f}")
    else:
        ax.set_axis_off()
    ax = axes[1, 1]
    c = d.get("champion")
    if c:
        vals = [c["accuracy_frozen"] or 0.0, c["accuracy_new"]]
        ax.bar([0, 1], vals, 0.5, color=[ref_c, new_c])
        ax.set_xticks([0, 1], labels=["frozen evaluation set", new_name])
        for xi, v in enumerate(vals):
            ax.text(xi, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"champion v{c['version']} ({c['stage']}) accuracy", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no champion registered yet", ha="center", va="center")
        ax.set_axis_off()
    warn = d.get("warnings") or []
    head = f"drift: batch {d['batch']} against the earlier training rows"
    head += f" - {len(warn)} warning(s)" if warn else " - no threshold crossed"
    fig.suptitle(head, fontsize=12, color="#b22222" if warn else "black")
    if warn:
        fig.text(0.5, 0.005, "\n".join(warn), ha="center", va="bottom", fontsize=8,
                 color="#b22222")  # fmt: skip
    fig.tight_layout(rect=(0, 0.01 + 0.022 * len(warn), 1, 0.96))
    return fig


def reliability_figure(cal: dict, title: str):
    """Reliability diagram of the test split (pipelines.audit.calibrate's dict): accuracy
    against mean confidence per bin (markers sized by rows), before and after the
    temperature, with the diagonal a calibrated model lies on and the rows per bin beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = cal["reliability"]
    edges = np.asarray(rel["edges"])
    mids, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), dpi=120, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    t = cal["temperature"]
    ax.text(0.98, 0.03, "marker area: test rows in the bin", ha="right", fontsize=7, color="grey")
    keys = (("before", "tab:blue", f"T=1: ECE {cal['test_ece']:.3f}", -0.22),
            ("after", "tab:orange", f"T={t:.2f}: ECE {cal['test_ece_calibrated']:.3f}", 0.22))  # fmt: skip
    for key, color, name, offset in keys:
        b = rel[key]
        counts = np.asarray(b["counts"])
        shown = counts > 0
        # area by rows: a bin of 2 test rows is not evidence the way one of 150 is
        ax.scatter(np.asarray(b["confidence"])[shown], np.asarray(b["accuracy"])[shown],
                   s=12 + 180 * counts[shown] / max(1, counts.max()), color=color, alpha=0.7,
                   label=name)  # fmt: skip
        hist.bar(mids + offset * width, counts, width=width * 0.42, color=color, alpha=0.8,
                 label=name.split(":")[0])  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("confidence (top probability)")
    hist.set_ylabel("test rows")
    hist.legend(fontsize=7)
    fig.tight_layout()
    return fig


def slices_markdown(reports: list[dict]) -> str:
    """One table per slice: value, rows, accuracy, weighted F1, gap to overall, flagged."""
    out = []
    for r in reports:
        out.append(f"### {r['name']} (overall accuracy {r['overall_accuracy']:.4f}, "
                   f"flagged when more than {r['max_gap']:.2f} below)\n")  # fmt: skip
        out.append(
            "| value | test rows | accuracy | weighted F1 | gap | |\n|---|---:|---:|---:|---:|---|"
        )
        for row in r["rows"]:
            out.append(f"| {row['value']} | {row['count']} | {row['accuracy']:.4f} | "
                       f"{row['f1']:.4f} | {row['gap']:+.4f} | {'**flagged**' if row['flagged'] else ''} |")  # fmt: skip
        out.append("")
    return "\n".join(out)
