"""Prediction: logits for a batch of images, a trained run loaded for predicting, and the
rows ``convnet predict`` prints.

:func:`infer` is the one forward pass that evaluation, the CLI and the API all use.
Turning files and arrays into images is :mod:`convnet.inputs`' job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet import runs
from convnet.datasets import DiskImages, InputSpec
from convnet.engine import Engine, make_engine
from convnet.errors import InputError
from convnet.inputs import as_images, input_batches
from convnet.models import create_model, fold_batchnorm


def infer(model: nn.Module, images: torch.Tensor | DiskImages, *, engine: Engine | None = None,
          batch_size: int | None = None, tta: bool = False) -> torch.Tensor:
    """Logits ``(N, num_classes)`` (float32, on the CPU) for ``images``.

    Args:
        model: any registered model, already on ``engine.device``.
        images: uint8 ``(N, C, H, W)`` in [0, 255] (in memory or on disk) or float in [0, 1].
        engine: device and precision; defaults to the CPU fast path.
        batch_size: images per forward pass; defaults to ``engine.infer_batch_size``.
        tta: test-time augmentation: the mean of the logits of each image and its mirror.
    """
    engine = engine or Engine.fast()
    batch_size = batch_size or engine.infer_batch_size
    model.eval()
    if engine.fold_batchnorm:
        model = fold_batchnorm(model)  # a copy; the caller's model is left as it is
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if chunk.dtype == torch.uint8:
                x = engine.batch(chunk)
            else:
                x = chunk.to(engine.device, torch.float32).contiguous(memory_format=engine.memory_format)
            with engine.precision():
                logits = model(x).float()
                if tta:
                    logits = (logits + model(x.flip(3)).float()) / 2
            out.append(logits)  # kept on the device: one copy to the host at the end, not one per batch
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out).cpu()


@dataclass(frozen=True)
class Prediction:
    labels: torch.Tensor  # (N,) int64 class indices
    probabilities: torch.Tensor  # (N, num_classes), rows sum to 1


def predict(model: nn.Module, images: torch.Tensor | DiskImages | Any, *, engine: Engine | None = None,
            tta: bool = False) -> Prediction:
    """Class indices and softmax probabilities for ``images`` (see :func:`infer`): a
    ``(N, C, H, W)`` tensor, or any array, tensor or list :func:`convnet.inputs.as_images`
    accepts (numpy ``(N, 28, 28)``, channels last, PIL images, file paths)."""
    if not isinstance(images, DiskImages) and not (isinstance(images, torch.Tensor) and images.ndim == 4):
        images = as_images(images, name="images")
    try:
        probs = infer(model, images, engine=engine, tta=tta).softmax(dim=1)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:  # images of another size or channel count than the model's
        raise InputError(f"images of shape {tuple(images.shape[1:])} (C, H, W) do not fit this model: "
                         f"{str(e).splitlines()[0]}") from None
    return Prediction(probs.argmax(dim=1), probs)


def load_model(run_dir: str | os.PathLike[str], engine: Engine | None = None) -> tuple[nn.Module, runs.Run]:
    """The trained model of a run folder, on ``engine.device``, and the run itself."""
    run = runs.open_run(run_dir)
    engine = engine or make_engine("cpu", faithful=run.faithful)
    spec = run.spec
    model = create_model(run.model_name, spec.num_classes, spec.channels, (spec.height, spec.width))
    runs.load_weights(model, run.path / runs.WEIGHTS)
    return engine.prepare_model(model), run


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
    if str(run_dir).lower().endswith(".onnx"):
        from convnet.onnxfile import predict_onnx_files

        yield from predict_onnx_files(run_dir, paths, layout=layout)
        return
    run = runs.open_run(run_dir)
    engine = make_engine(device, faithful=run.faithful)
    model, run = load_model(run.path, engine)
    spec: InputSpec = run.spec
    for item in input_batches(paths, spec, layout=layout):
        if isinstance(item, InputError):
            yield item
            continue
        pred = predict(model, item.images, engine=engine, tta=run.tta)
        top = pred.probabilities.max(dim=1).values.tolist()  # the probability of each predicted label
        yield [PredictionRow(name, label, spec.classes[label], round(p, 6))
               for name, label, p in zip(item.names, pred.labels.tolist(), top, strict=True)]


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
            X: images as :func:`convnet.inputs.as_images` accepts (arrays in any layout,
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
    run = runs.open_run(run_dir)
    engine = make_engine(device, faithful=run.faithful)
    model, run = load_model(run.path, engine)
    return Predictor(model, run.spec, run_labels(run), engine, tta=run.tta)


def run_labels(run: runs.Run) -> np.ndarray:
    """The labels of a run's classes: those a :class:`~convnet.ConvNetClassifier` was
    fitted on (numbers stay numbers) when it saved the run, else the class names."""
    saved = run.config.get("estimator", {}).get("classes") if isinstance(run.config.get("estimator"), dict) else None
    if isinstance(saved, list) and len(saved) == len(run.spec.classes):
        return np.asarray(saved)
    return np.asarray(run.spec.classes)
