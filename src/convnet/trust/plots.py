"""Plots of runs: loss curves, confusion matrix, per-class scores, image grids, and the
comparison of several runs.

Each ``plot_*`` function returns a :class:`matplotlib.figure.Figure` built without
pyplot, so nothing here touches a display or matplotlib's global state (``save`` writes
it through the Agg renderer). The numbers behind each picture come from a pure function
next to it (``history_curves``, ``class_scores``, ``top_mistakes``, ``f1_table``), tested
on its own.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

SCORES = ("precision", "recall", "f1-score")
RIGHT, WRONG = "#1a7f37", "#cf222e"  # green, red: readable on white, distinct for most colour-blind readers too


# --- the numbers behind the plots: pure functions


def history_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-epoch series from a run's ``history.json`` records, NaN where a value is absent.

    Returns:
        ``epoch``, ``loss`` (training), ``val_loss``, ``val_accuracy`` and ``accuracy``
        (training accuracy, from an ``accuracy`` or ``train_accuracy`` key), each ``(E,)``.
    """

    def series(*keys: str) -> np.ndarray:
        values = [next((r[k] for k in keys if r.get(k) is not None), None) for r in history]
        return np.array([np.nan if v is None else float(v) for v in values], dtype=float)

    epochs = np.array([int(r.get("epoch", i + 1)) for i, r in enumerate(history)], dtype=int)
    return {"epoch": epochs, "loss": series("loss"), "val_loss": series("val_loss"),
            "val_accuracy": series("val_accuracy"), "accuracy": series("accuracy", "train_accuracy")}


def class_scores(report: Mapping[str, Any], classes: Sequence[str]) -> np.ndarray:
    """``(3, C)``: precision, recall and f1 of each class, from scikit-learn's report dict."""
    return np.array([[float(report[c][s]) for c in classes] for s in SCORES])


def top_mistakes(probabilities: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` most confidently wrong predictions, most confident first.

    A prediction is the arg-max class of ``probabilities`` ``(N, C)``; it is wrong when it
    differs from ``labels`` ``(N,)``; its confidence is its probability. Ties keep index order.
    """
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:k]


def f1_table(reports: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> np.ndarray:
    """``(R, C)``: the f1 of each class in each run's report; row 0 is the baseline that
    ``f1[1:] - f1[0]`` (the differences plotted) is measured against."""
    return np.array([[float(r[c]["f1-score"]) for c in classes] for r in reports])


# --- figures of one run


def save(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def plot_history(history: Sequence[Mapping[str, Any]], title: str) -> Figure:
    """Training (and, where recorded, validation) loss and accuracy per epoch."""
    return plot_histories([history], [title], title=f"Loss and accuracy per epoch: {title}", single=True)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """The confusion matrix as a heat map of counts: rows true class, columns predicted."""
    cm = np.asarray(cm)
    n = len(classes)
    fig = Figure(figsize=(8.6, 7.4), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="test images", shrink=0.85)
    threshold = cm.max() / 2 if cm.size and cm.max() > 0 else 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    ax.set_xticks(range(n), classes, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix (test set): {title}")
    return fig


def plot_class_scores(report: Mapping[str, Any], classes: Sequence[str], title: str) -> Figure:
    """Precision, recall and f1 per class as grouped horizontal bars."""
    scores = class_scores(report, classes)
    fig = Figure(figsize=(8, 6.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(classes))
    height = 0.27
    for k, (name, colour) in enumerate(zip(("precision", "recall", "f1"), ("#4c72b0", "#dd8452", "#55a868"),
                                           strict=True)):
        ax.barh(y + (k - 1) * height, scores[k], height, label=name, color=colour)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()  # class 0 on top, as in the report
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (test set)")
    ax.set_ylabel("class")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=3)
    ax.set_title(f"Precision, recall and f1 per class: {title}")
    return fig


def plot_image_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                    classes: Sequence[str], title: str, cols: int = 6,
                    captions: tuple[str, str] = ("true", "pred")) -> Figure:
    """Images ``(N, C, H, W)`` (grey or colour) in a grid, each captioned with its true and
    predicted class and the predicted probability; green when right, red when wrong.
    ``captions`` names the two classes (a likely label error: ``("given", "seen")``); with
    other captions than the default, red and green need no legend."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(cols * 1.75, rows * 2.05 + 0.7), layout="constrained")
    fig.suptitle(title, fontsize=12)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        image = np.asarray(images[i])  # (C, H, W) uint8
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image.transpose(1, 2, 0))  # (H, W, 3): colour
        right = labels[i] == predicted[i]
        ax.set_title(f"{captions[0]}: {classes[labels[i]]}\n{captions[1]}: {classes[predicted[i]]} "
                     f"{confidence[i]:.0%}", fontsize=8, color=RIGHT if right else WRONG)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=12)
    kinds = [(RIGHT, "right"), (WRONG, "wrong")]
    present = [(c, k) for c, k in kinds if any((labels[:n] == predicted[:n]) == (k == "right"))
               and captions == ("true", "pred")]
    if present:
        fig.legend([Patch(color=c) for c, _ in present], [f"{k} prediction" for _, k in present],
                   loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    return fig


# --- figures comparing runs


def plot_histories(histories: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str], *,
                   title: str = "Loss and accuracy per epoch", single: bool = False) -> Figure:
    """Loss (left) and accuracy (right) per epoch of several runs, overlaid: one colour per
    run, solid for training, dashed for validation."""
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(histories))]
    any_accuracy = False
    for history, name, colour in zip(histories, names, colours, strict=True):
        c = history_curves(history)
        prefix = "" if single else f"{name} "
        loss_ax.plot(c["epoch"], c["loss"], "o-", color=colour, label=f"{prefix}training")
        scored = np.isfinite(c["val_loss"])  # every epoch, or every --val-every: the points joined
        if scored.any():
            loss_ax.plot(c["epoch"][scored], c["val_loss"][scored], "s--", color=colour, label=f"{prefix}validation")
        for key, style, kind in (("accuracy", "o-", "training"), ("val_accuracy", "s--", "validation")):
            shown = np.isfinite(c[key])
            if shown.any():
                acc_ax.plot(c["epoch"][shown], c[key][shown], style, color=colour, label=f"{prefix}{kind}")
                any_accuracy = True
    for ax, label in ((loss_ax, "cross-entropy loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    loss_ax.set_title("Loss")
    loss_ax.legend(fontsize=8)
    acc_ax.set_title("Accuracy")
    if any_accuracy:
        acc_ax.legend(fontsize=8)
    else:
        acc_ax.set_xlim(loss_ax.get_xlim())
        acc_ax.text(0.5, 0.5, "no per-epoch accuracy recorded\n(history.json has no val_accuracy)",
                    ha="center", va="center", transform=acc_ax.transAxes, color="0.4")
    fig.suptitle(title, fontsize=12)
    return fig


def plot_accuracies(names: Sequence[str], train: Sequence[float], test: Sequence[float]) -> Figure:
    """Training and test accuracy of each run as side-by-side bars, values written on them."""
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) + 3), 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    for offset, values, label, colour in ((-0.2, train, "train", "#4c72b0"), (0.2, test, "test", "#dd8452")):
        bars = ax.bar(x + offset, values, 0.4, label=label, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("run")
    ax.set_ylabel("accuracy")
    fig.legend(loc="outside right upper")
    ax.set_title("Accuracy of each run")
    return fig


def plot_f1_differences(reports: Sequence[Mapping[str, Any]], names: Sequence[str], classes: Sequence[str]) -> Figure:
    """Per-class f1 of each later run minus the first run's: right of zero, better."""
    delta = f1_table(reports, classes)
    delta = delta[1:] - delta[0]
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(classes))
    height = 0.8 / max(1, len(delta))
    for k, row in enumerate(delta):
        ax.barh(y + (k - (len(delta) - 1) / 2) * height, row, height, color=f"C{k + 1}",
                label=f"{names[k + 1]} − {names[0]}")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    limit = max(0.05, float(np.abs(delta).max()) * 1.15) if delta.size else 0.05
    ax.set_xlim(-limit, limit)
    ax.set_xlabel(f"f1 difference (test set; positive: better than {names[0]})")
    ax.set_ylabel("class")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", framealpha=0.9)
    ax.set_title("Per-class f1 difference")
    return fig


def plot_reliability(bins: Sequence[Mapping[str, float]], ece: float, low: float, high: float, title: str) -> Figure:
    """A reliability diagram: each confidence bin's accuracy against its mean confidence
    (the diagonal: perfect calibration), the images per bin below."""
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    ax, counts = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    lows = np.array([b["low"] for b in bins])
    width = np.array([b["high"] - b["low"] for b in bins])
    n = np.array([b["images"] for b in bins])
    accuracy = np.array([b["accuracy"] if b["images"] else 0.0 for b in bins])
    confidence = np.array([b["confidence"] if b["images"] else 0.0 for b in bins])
    ax.bar(lows, accuracy, width=width, align="edge", color="#0969da", edgecolor="white", label="accuracy")
    gap_low, gap = np.minimum(accuracy, confidence), np.abs(confidence - accuracy)
    ax.bar(lows, np.where(n > 0, gap, 0), bottom=gap_low, width=width, align="edge", fill=False, hatch="///",
           edgecolor=WRONG, lw=0.8, label="gap to the bin's mean confidence")
    ax.plot([0, 1], [0, 1], color="black", lw=1, ls="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    ax.set_title(f"Reliability (test set): ECE {ece:.2%} (95 % interval {low:.2%}–{high:.2%})\n{title}")
    counts.bar(lows, n, width=width, align="edge", color="#6e7781", edgecolor="white")
    counts.set_yscale("log" if n.max(initial=0) > 0 else "linear")
    counts.set_xlabel("confidence (top probability)")
    counts.set_ylabel("images")
    return fig
