"""Metrics and plots people look at: validation metrics from predictions,
training curves across both phases, the confusion matrix, and the top-k bar
chart beside an image."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], top_k: int) -> dict:
    """Accuracy, top-k accuracy, per-class precision/recall/F1, confusion matrix
    (rows: true class, columns: predicted)."""
    n = len(classes)
    y_true = np.asarray(y_true, dtype=int)
    pred = probs.argmax(axis=1)
    k = min(top_k, n)
    topk = np.argsort(-probs, axis=1)[:, :k]
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (y_true, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    total = len(y_true)
    return {
        "examples": total,
        "accuracy": float((pred == y_true).mean()) if total else 0.0,
        "top_k": k,
        "top_k_accuracy": float((topk == y_true[:, None]).any(axis=1).mean()) if total else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if n else 0.0,
        "per_class": per_class,
        "classes": list(classes),
        "confusion_matrix": confusion.tolist(),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: list[dict], path: str) -> None:
    """Accuracy and loss, train and validation, over both phases; the phase
    boundary is marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(1, len(history) + 1)
    for ax, metric, title in ((axes[0], "accuracy", "accuracy"), (axes[1], "loss", "loss")):
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            ys = [h.get(key, np.nan) for h in history]
            if not all(np.isnan(ys)):
                ax.plot(x, ys, style, label=label, markersize=4)
        _mark_phases(ax, [h["phase"] for h in history])
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, pad=14)
        ax.set_xlabel("epoch (both phases)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mark_phases(ax, phases: list[str]) -> None:
    """Label each phase's span; a dashed line marks each boundary."""
    spans, start = [], 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            spans.append((phases[start], start + 1, i))
            start = i
    where = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for n, (name, first, last) in enumerate(spans):
        if n:
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=1)
        ax.text((first + last) / 2, 1.01, name, transform=where, ha="center", va="bottom", fontsize=8, color="dimgrey")


def plot_confusion(metrics: dict, path: str) -> None:
    plt = _pyplot()
    classes = metrics["classes"]
    cm = np.asarray(metrics["confusion_matrix"])
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation confusion (accuracy {metrics['accuracy']:.3f})")
    if len(classes) <= 30:
        top = cm.max() or 1
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > top / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predictions(items: list[tuple[np.ndarray, str, list[str], list[float]]], path: str,
                     title: Optional[str] = None) -> None:
    """One row per image: the image, and a bar chart of its top-k probabilities."""
    plt = _pyplot()
    rows = len(items)
    fig, axes = plt.subplots(rows, 2, figsize=(9, 3 * rows), squeeze=False)
    for (image, name, labels, scores), (ax_img, ax_bar) in zip(items, axes):
        ax_img.imshow(image)
        ax_img.set_title(name, fontsize=9)
        ax_img.axis("off")
        y = np.arange(len(labels))
        ax_bar.barh(y, scores, color="tab:blue")
        ax_bar.set_yticks(y, labels)
        ax_bar.invert_yaxis()
        ax_bar.set_xlim(0, 1)
        ax_bar.set_xlabel("probability")
        for yi, s in zip(y, scores):
            ax_bar.text(min(s + 0.02, 0.9), yi, f"{s:.3f}", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
