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
from convnet.data import Dataset, Split
from convnet.engine import Engine
from convnet.predict import infer, load_model


@dataclass
class SplitScores:
    accuracy: float
    predictions: torch.Tensor  # (N,) class indices
    probabilities: torch.Tensor  # (N, num_classes)


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


def score_split(model: nn.Module, split: Split, engine: Engine, tta: bool = False) -> SplitScores:
    probs = infer(model, split.images, engine=engine, tta=tta).softmax(dim=1)
    preds = probs.argmax(dim=1)
    return SplitScores(metrics.accuracy(preds, split.labels), preds, probs)


def evaluate(model: nn.Module, dataset: Dataset, *, engine: Engine | None = None, tta: bool = False) -> Evaluation:
    """Accuracy on both splits; classification report and confusion matrix on the test split.

    ``tta`` predicts each image as the mean of it and its mirror (see :func:`infer`)."""
    engine = engine or Engine.fast()
    train = score_split(model, dataset.train, engine, tta)
    test = score_split(model, dataset.test, engine, tta)
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


def evaluate_run(run_dir: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None,
                 engine: Engine | None = None, dataset: Dataset | None = None) -> Evaluation:
    """Evaluate a run folder's model on the data set it was trained on (same subset), and
    write the scores to its ``metrics.json``."""
    engine = engine or Engine.fast()
    model, run = load_model(run_dir, engine)
    dataset = dataset or runs.run_dataset(run, data_dir)
    result = evaluate(model, dataset, engine=engine, tta=bool(run.config["train"].get("tta", False)))
    runs.write_json(run.path / runs.METRICS, result.to_json())
    return result
