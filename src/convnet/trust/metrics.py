"""Metrics: pure functions of predicted and true labels, computed with scikit-learn as
the tutorial does, so our numbers are scikit-learn's numbers. (scikit-learn takes most of
a second to import: it is imported when a metric is first computed, not at start-up.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the labels."""
    from sklearn import metrics as skm

    return float(skm.accuracy_score(_np(labels), _np(predictions)))


def present_classes(predictions: ArrayLike, labels: ArrayLike, num_classes: int) -> list[int]:
    """The classes the images hold or the model gave, as scikit-learn reports when not told the labels: a class
    with neither (a folder of a few classes scored by a run that knows more, a class with no test image) has
    no precision or recall to speak of."""
    found = set(np.unique(_np(labels)).tolist()) | set(np.unique(_np(predictions)).tolist())
    return [k for k in range(num_classes) if k in found]


def classification_report(predictions: ArrayLike, labels: ArrayLike, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, f1 and support, accuracy, macro and weighted averages,
    in scikit-learn's ``output_dict=True`` shape, keyed by class name. Every class has its
    row (0 where it is absent); the macro average is over the classes present
    (:func:`present_classes`), not pulled down by the zeros of absent ones."""
    from sklearn import metrics as skm

    y, p = _np(labels), _np(predictions)
    report = skm.classification_report(
        y, p, labels=list(range(len(class_names))), target_names=list(class_names), output_dict=True,
        zero_division=0,
    )
    present = present_classes(p, y, len(class_names))
    if present and len(present) < len(class_names):
        report["macro avg"] = skm.classification_report(y, p, labels=present, output_dict=True,
                                                        zero_division=0)["macro avg"]
    return report  # type: ignore[no-any-return]


def format_report(predictions: ArrayLike, labels: ArrayLike, class_names: Sequence[str], digits: int = 2) -> str:
    """The same report as scikit-learn's text table, of the classes present (:func:`present_classes`); a last line
    names those left out."""
    from sklearn import metrics as skm

    y, p = _np(labels), _np(predictions)
    present = present_classes(p, y, len(class_names)) or list(range(len(class_names)))
    text = skm.classification_report(y, p, labels=present, target_names=[class_names[k] for k in present],
                                     digits=digits, zero_division=0)
    absent = [name for k, name in enumerate(class_names) if k not in present]
    if absent:
        text += (f"\n{len(absent)} of the {len(class_names)} classes neither among these images nor predicted, "
                 f"left out: {', '.join(absent)}\n")
    return text  # type: ignore[no-any-return]


def confusion_matrix(predictions: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` counts: row = true class, column = predicted class."""
    from sklearn import metrics as skm

    return skm.confusion_matrix(_np(labels), _np(predictions), labels=list(range(num_classes)))
