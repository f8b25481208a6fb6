"""Evaluation: predictions on both splits (via :func:`~convnet.predict.infer`), scored
by the pure functions in :mod:`convnet.metrics`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet import metrics, runs
from convnet.datasets import Dataset, Split
from convnet.engine import Engine, make_engine
from convnet.predict import infer, load_model


@dataclass
class SplitScores:
    accuracy: float | None  # None: not measured (a run that keeps no training images)
    predictions: torch.Tensor  # (N,) class indices
    probabilities: torch.Tensor  # (N, num_classes)

    @classmethod
    def accuracy_only(cls, accuracy: float | None) -> SplitScores:
        """An accuracy known without predictions to go with it (None: not measured)."""
        return cls(accuracy, torch.empty(0, dtype=torch.int64), torch.empty(0, 0))


@dataclass
class Evaluation:
    classes: tuple[str, ...]
    train: SplitScores
    test: SplitScores
    test_labels: torch.Tensor
    report: dict[str, Any]  # scikit-learn's output_dict shape, test split
    report_text: str  # scikit-learn's table, test split
    confusion_matrix: np.ndarray  # test split, row = true class

    def to_json(self) -> dict[str, Any]:
        return {
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


def evaluate(model: nn.Module, dataset: Dataset, *, engine: Engine | None = None, tta: bool = False,
             test_logits: torch.Tensor | None = None, score_train: bool = True) -> Evaluation:
    """Accuracy on both splits; classification report and confusion matrix on the test split.

    Args:
        tta: predict each image as the mean of it and its mirror (see :func:`infer`).
        test_logits: the test split's logits when they are already known (the last
            measurement of a ``--target-accuracy`` run), so they are not computed again.
        score_train: score the training split too; False (or a training split with no
            images) leaves its accuracy None, not measured.

    The splits' images may be any array or tensor :func:`convnet.inputs.as_images`
    accepts (numpy ``(N, 28, 28)``, channels last …), their labels class indices.

    Raises:
        InputError: ``dataset`` is not a Dataset, or its images or labels cannot be used.
    """
    from dataclasses import replace

    from convnet.errors import InputError
    from convnet.inputs import as_split

    if not isinstance(dataset, Dataset):
        raise InputError(f"dataset: a {type(dataset).__name__} was given; expected a convnet.Dataset (its splits' "
                         "images may be numpy arrays in any layout); for arrays alone use convnet.predict")
    dataset = replace(dataset, train=as_split(dataset.train, dataset.spec, "train"),
                      test=as_split(dataset.test, dataset.spec, "test"))
    engine = engine or Engine.fast()
    train = scores(infer(model, dataset.train.images, engine=engine, tta=tta), dataset.train.labels) \
        if score_train and len(dataset.train) else SplitScores.accuracy_only(None)
    test = scores(test_logits if test_logits is not None else infer(model, dataset.test.images, engine=engine,
                                                                     tta=tta), dataset.test.labels)
    return evaluation(dataset, train, test)


def evaluation(dataset: Dataset, train: SplitScores, test: SplitScores) -> Evaluation:
    """The scores of both splits, with the test split's report and confusion matrix
    (also for predictions made elsewhere, e.g. in ONNX Runtime)."""
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
    return scores(infer(model, split.images, engine=engine, tta=tta), split.labels)


def evaluate_run(run_dir: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None,
                 engine: Engine | None = None, dataset: Dataset | None = None, device: str = "auto",
                 test_logits: torch.Tensor | None = None, progress: bool = True,
                 score_train: bool = True) -> Evaluation:
    """Evaluate a run folder's model on the data it was trained on (same subset, same
    split), with the run's own engine (faithful runs in fp32) and test-time augmentation,
    and write the scores to its ``metrics.json``."""
    return evaluate_run_data(run_dir, data_dir=data_dir, engine=engine, dataset=dataset, device=device,
                             test_logits=test_logits, progress=progress, score_train=score_train)[0]


def evaluate_run_data(run_dir: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None,
                      engine: Engine | None = None, dataset: Dataset | None = None, device: str = "auto",
                      test_logits: torch.Tensor | None = None, progress: bool = True,
                      score_train: bool = True) -> tuple[Evaluation, Dataset]:
    """:func:`evaluate_run`, also returning the data it was scored on. The model is
    loaded (and checked) before the data is read."""
    from convnet.data import run_data

    run = runs.open_run(run_dir)
    engine = engine or make_engine(device, faithful=run.faithful)
    model, run = load_model(run.path, engine)
    dataset = dataset or run_data(run, data_dir, progress=progress)
    result = evaluate(model, dataset, engine=engine, tta=run.tta, test_logits=test_logits, score_train=score_train)
    runs.write_json(run.path / runs.METRICS, result.to_json())
    return result, dataset
