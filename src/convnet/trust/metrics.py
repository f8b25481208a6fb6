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


def classification_report(predictions: ArrayLike, labels: ArrayLike, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, f1 and support, accuracy, macro and weighted averages,
    in scikit-learn's ``output_dict=True`` shape, keyed by class name."""
    from sklearn import metrics as skm

    return skm.classification_report(  # type: ignore[no-any-return]
        _np(labels), _np(predictions), labels=list(range(len(class_names))),
        target_names=list(class_names), output_dict=True, zero_division=0,
    )


def format_report(predictions: ArrayLike, labels: ArrayLike, class_names: Sequence[str], digits: int = 2) -> str:
    """The same report as scikit-learn's text table."""
    from sklearn import metrics as skm

    return skm.classification_report(  # type: ignore[no-any-return]
        _np(labels), _np(predictions), labels=list(range(len(class_names))),
        target_names=list(class_names), digits=digits, zero_division=0,
    )


def confusion_matrix(predictions: ArrayLike, labels: ArrayLike, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` counts: row = true class, column = predicted class."""
    from sklearn import metrics as skm

    return skm.confusion_matrix(_np(labels), _np(predictions), labels=list(range(num_classes)))
