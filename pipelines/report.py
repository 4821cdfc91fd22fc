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
