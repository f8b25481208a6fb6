from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as skm

from convnet.trust.metrics import accuracy, classification_report, confusion_matrix, format_report

CLASSES = tuple(f"c{i}" for i in range(10))


def _preds() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (500,), generator=g)
    p = torch.where(torch.rand(500, generator=g) < 0.7, y, torch.randint(0, 10, (500,), generator=g))
    return p, y


def test_accuracy_matches_by_hand() -> None:
    p, y = _preds()
    assert accuracy(p, y) == int((p == y).sum()) / 500
    assert accuracy([1, 2, 3], [1, 2, 0]) == 2 / 3


def test_report_equals_scikit_learn() -> None:
    p, y = _preds()
    ours = classification_report(p, y, CLASSES)
    theirs = skm.classification_report(y.numpy(), p.numpy(), target_names=list(CLASSES), output_dict=True)
    assert ours == theirs
    assert format_report(p, y, CLASSES) == skm.classification_report(y.numpy(), p.numpy(), target_names=list(CLASSES))


def test_report_keeps_absent_classes() -> None:
    ours = classification_report([0, 0, 1], [0, 1, 1], CLASSES)
    assert set(CLASSES) <= set(ours) and ours["c5"]["support"] == 0


def test_confusion_matrix() -> None:
    p, y = _preds()
    cm = confusion_matrix(p, y, 10)
    assert cm.shape == (10, 10) and cm.sum() == 500
    np.testing.assert_array_equal(np.diag(cm), [int(((p == y) & (y == k)).sum()) for k in range(10)])
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(y.numpy(), minlength=10))


def test_classes_absent_from_images_and_predictions_stay_out_of_the_macro_average() -> None:
    """Scoring a folder of 2 of a run's 4 classes, perfectly: macro average 1.0, not 0.5 pulled down by two rows
    of zeros; the text table shows the 2 and names the others; every class keeps its row in the dict."""
    names = ("cat", "dog", "fox", "owl")
    y = np.array([0, 0, 1, 1, 1])
    ours = classification_report(y, y, names)
    assert ours["macro avg"]["f1-score"] == 1.0 and ours["fox"]["support"] == 0
    assert ours["macro avg"] == skm.classification_report(y, y, output_dict=True)["macro avg"]  # sklearn's own rule
    text = format_report(y, y, names)
    assert "fox" not in text.split("\n\n")[1] and text.rstrip().endswith("left out: fox, owl")
    wrong = np.array([0, 0, 1, 1, 3])  # a class predicted but absent from the images is present: precision 0
    assert classification_report(wrong, y, names)["macro avg"] == skm.classification_report(
        y, wrong, labels=[0, 1, 3], output_dict=True, zero_division=0)["macro avg"]
