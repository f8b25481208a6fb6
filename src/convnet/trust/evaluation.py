"""Evaluation: a model's predictions on both splits of a data set (via
:func:`~convnet.models.inference.infer`), scored by the pure functions in :mod:`convnet.trust.metrics`.

:func:`score_splits` is the one scorer: it takes whatever turns images into
probabilities (a PyTorch model through :func:`evaluate`, an ONNX Runtime session), so
every kind of model is scored the same way. Scoring a saved run and writing its
``metrics.json`` is :mod:`convnet.trust.scoring`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet.core.errors import InputError
from convnet.data.arrays import as_split
from convnet.data.dataset import Dataset, Images, Split
from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.trust import metrics


@dataclass
class SplitScores:
    accuracy: float | None  # None: not measured (a run that keeps no training images)
    predictions: torch.Tensor  # (N,) class indices
    probabilities: torch.Tensor  # (N, num_classes)

    @classmethod
    def accuracy_only(cls, accuracy: float | None) -> SplitScores:
        """An accuracy known without predictions to go with it (None: not measured)."""
        return cls(accuracy, torch.empty(0, dtype=torch.int64), torch.empty(0, 0))


INFERENCE = "fp32"  # how every prediction is computed (metrics.json says so; older runs' files do not)


@dataclass
class Evaluation:
    classes: tuple[str, ...]
    train: SplitScores
    test: SplitScores
    test_labels: torch.Tensor
    report: dict[str, Any]  # scikit-learn's output_dict shape, test split
    report_text: str  # scikit-learn's table, test split
    confusion_matrix: np.ndarray  # test split, row = true class
    note: str | None = None  # one line on how these scores compare with those recorded before, if they differ

    def to_json(self) -> dict[str, Any]:
        return {
            "inference": INFERENCE,
            "classes": list(self.classes),
            "train": {"accuracy": self.train.accuracy},
            "test": {
                "accuracy": self.test.accuracy,
                "report": self.report,
                "confusion_matrix": self.confusion_matrix.tolist(),
            },
        }


def scores(logits: torch.Tensor, labels: torch.Tensor) -> SplitScores:
    """Accuracy, predicted classes and probabilities from a split's logits."""
    return probability_scores(logits.softmax(dim=1), labels)


def probability_scores(probs: torch.Tensor, labels: torch.Tensor) -> SplitScores:
    """Accuracy and predicted classes from a split's probabilities ``(N, num_classes)``."""
    preds = probs.argmax(dim=1)
    return SplitScores(metrics.accuracy(preds, labels), preds, probs)


Probabilities = Callable[[Images], torch.Tensor]  # uint8 images (N, C, H, W) -> probabilities (N, K) on the CPU


def score_splits(probabilities: Probabilities, dataset: Dataset, *, test_probabilities: torch.Tensor | None = None,
                 score_train: bool = True) -> Evaluation:
    """Accuracy on both splits; classification report and confusion matrix on the test split.

    Args:
        probabilities: the model, as a function of a split's images.
        dataset: the splits, uint8 images in the model's input spec, class indices.
        test_probabilities: the test split's, when already known (not computed again).
        score_train: score the training split too; False (or a training split with no
            images) leaves its accuracy None, not measured.
    """
    train = probability_scores(probabilities(dataset.train.images), dataset.train.labels.cpu()) \
        if score_train and len(dataset.train) else SplitScores.accuracy_only(None)
    test_probs = test_probabilities if test_probabilities is not None else probabilities(dataset.test.images)
    return evaluation(dataset, train, probability_scores(test_probs, dataset.test.labels.cpu()))


def evaluate(model: nn.Module, dataset: Dataset, *, engine: Engine | None = None, tta: bool = False,
             test_logits: torch.Tensor | None = None, score_train: bool = True) -> Evaluation:
    """Accuracy on both splits; classification report and confusion matrix on the test split.

    Args:
        tta: predict each image as the mean of it and its mirror (see :func:`infer`).
        test_logits: the test split's logits when they are already known (the last
            measurement of a ``--target-accuracy`` run), so they are not computed again.
        score_train: score the training split too; False (or a training split with no
            images) leaves its accuracy None, not measured.

    The splits' images may be any array or tensor :func:`convnet.data.arrays.as_images`
    accepts (numpy ``(N, 28, 28)``, channels last …), their labels class indices.

    Raises:
        InputError: ``dataset`` is not a Dataset, or its images or labels cannot be used.
    """
    if not isinstance(dataset, Dataset):
        raise InputError(f"dataset: a {type(dataset).__name__} was given; expected a convnet.Dataset (its splits' "
                         "images may be numpy arrays in any layout); for arrays alone use convnet.predict")
    dataset = replace(dataset, train=as_split(dataset.train, dataset.spec, "train"),
                      test=as_split(dataset.test, dataset.spec, "test"))
    engine = engine or Engine.fast()

    def probabilities(images: Images) -> torch.Tensor:
        return infer(model, images, engine=engine, tta=tta).softmax(dim=1)

    return score_splits(probabilities, dataset, score_train=score_train,
                        test_probabilities=test_logits.softmax(dim=1) if test_logits is not None else None)


def evaluation(dataset: Dataset, train: SplitScores, test: SplitScores) -> Evaluation:
    """The scores of both splits, with the test split's report and confusion matrix."""
    y = dataset.test.labels
    return Evaluation(
        classes=dataset.classes,
        train=train,
        test=test,
        test_labels=y,
        report=metrics.classification_report(test.predictions, y, dataset.classes),
        report_text=metrics.format_report(test.predictions, y, dataset.classes),
        confusion_matrix=metrics.confusion_matrix(test.predictions, y, dataset.num_classes),
    )


def score_split(model: nn.Module, split: Split, engine: Engine, tta: bool = False) -> SplitScores:
    """One split's scores (a validation split, say) without the report."""
    return scores(infer(model, split.images, engine=engine, tta=tta), split.labels)
