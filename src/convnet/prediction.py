"""Predicting with a trained model: the rows ``convnet predict`` prints for files, and a
:class:`Predictor` for whatever a notebook holds.

The model is a run folder or an ``.onnx`` file, opened by
:func:`convnet.loadrun.open_model`; files become batches in :mod:`convnet.inputfiles`,
arrays and images in :mod:`convnet.arrays`; the forward pass is
:func:`convnet.inference.infer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet.arrays import as_images
from convnet.datatypes import InputSpec
from convnet.engine import Engine
from convnet.errors import InputError
from convnet.inference import infer
from convnet.inputfiles import input_batches
from convnet.loadrun import load_run, open_model


@dataclass(frozen=True)
class PredictionRow:
    """One input image's prediction, as ``convnet predict`` prints it."""

    input: str
    label: int
    cls: str
    probability: float

    def to_json(self) -> dict[str, object]:
        return {"input": self.input, "label": self.label, "class": self.cls, "probability": self.probability}


def predict_files(run_dir: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]], *, layout: str = "auto",
                  device: str | torch.device = "auto") -> Iterator[list[PredictionRow] | InputError]:
    """What ``convnet predict RUN INPUT...`` does: the rows of each batch of inputs, in
    order, converted to the run's input spec and predicted the way the run was evaluated
    (its engine, its test-time augmentation); an input that cannot be read yields its
    error in its place. Memory stays bounded whatever the inputs' size. An ``.onnx`` file
    from ``convnet export`` in place of the run folder is predicted in ONNX Runtime."""
    model = open_model(run_dir, device=device)
    spec: InputSpec = model.spec
    for item in input_batches(paths, spec, layout=layout):
        if isinstance(item, InputError):
            yield item
            continue
        probs = model.probabilities(item.images)  # (n, K)
        yield [PredictionRow(name, int(label), spec.classes[int(label)], round(float(p), 6))
               for name, label, p in zip(item.names, probs.argmax(1), probs.max(1), strict=True)]


@dataclass
class Predictor:
    """A trained model ready to predict whatever a notebook holds (:func:`load`).

    Attributes:
        model: the network, on ``engine.device``.
        input_spec: what the model takes; every input is converted to it.
        classes: the label of each output, in order (``classes[i]`` for class index i):
            the run's class names, or the labels a :class:`~convnet.ConvNetClassifier`
            was fitted on.
        engine: device and precision, as the run was evaluated.
        tta: predict with the mean of each image and its mirror, as the run was evaluated.
        layout: ``auto``, ``nchw`` or ``nhwc`` for 4-d arrays whose shape reads both ways.
    """

    model: nn.Module
    input_spec: InputSpec
    classes: np.ndarray
    engine: Engine
    tta: bool = False
    layout: str = "auto"

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(N, len(classes))`` float64, columns in :attr:`classes` order, rows summing to 1.

        Args:
            X: images as :func:`convnet.arrays.as_images` accepts (arrays in any layout,
                tensors, PIL images, file paths), converted to :attr:`input_spec`.
        """
        images = as_images(X, self.input_spec, layout=self.layout)
        if len(images) == 0:
            return np.zeros((0, len(self.classes)))
        return infer(self.model, images, engine=self.engine, tta=self.tta).double().softmax(dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The label (from :attr:`classes`) of each image of ``X``."""
        return self.classes[self.predict_proba(X).argmax(axis=1)]


def load(run_dir: str | os.PathLike[str], *, device: str | torch.device = "auto") -> Predictor:
    """A run folder's model as a :class:`Predictor`, predicting the way the run was
    evaluated (its engine, its test-time augmentation).

    Raises:
        RunError: not a run folder, or its weights are missing or damaged.
    """
    loaded = load_run(run_dir, device=device)
    return Predictor(loaded.model, loaded.spec, loaded.labels, loaded.engine, tta=loaded.tta)
