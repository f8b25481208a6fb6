"""Predicting with a trained model: the rows ``convnet predict`` prints for files, and a
:class:`Predictor` for whatever a notebook holds.

The model is a run folder or an ``.onnx`` file, opened by
:func:`convnet.use.loadrun.open_model`; files become batches in :mod:`convnet.data.inputfiles`,
arrays and images in :mod:`convnet.data.arrays`; the forward pass is
:func:`convnet.models.inference.infer`.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet.core.durable import atomic_file, check_output_file
from convnet.core.errors import ConvnetError, InputError
from convnet.core.progress import Bar
from convnet.data.arrays import as_images
from convnet.data.dataset import InputSpec
from convnet.data.inputfiles import expand_inputs, input_batches
from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.use.explain import check_explain_output, write_explanations
from convnet.use.loadrun import LoadedRun, Model, OnnxPath, load_run, open_model
from convnet.use.onnxfile import OnnxModel

TOP_K = 3  # classes each row carries by default (--top-k)
UNSURE = "unsure"  # the class of an image whose most probable class is below --min-confidence


@dataclass(frozen=True)
class PredictionRow:
    """One input image's prediction, as ``convnet predict`` prints it.

    Attributes:
        input: the file (``FILE[i]`` for the i-th image of an array file).
        label, cls, probability: the most probable class: its index, name and probability;
            below ``--min-confidence``, label None and class ``"unsure"`` (the probability
            and :attr:`top` are kept).
        top: the most probable classes, most probable first, as ``(label, class, probability)``.
    """

    input: str
    label: int | None
    cls: str
    probability: float
    top: tuple[tuple[int, str, float], ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"input": self.input, "label": self.label, "class": self.cls, "probability": self.probability,
                "top": [{"label": j, "class": c, "probability": p} for j, c, p in self.top]}

    @property
    def unsure(self) -> bool:
        return self.label is None


def rows_of(names: Sequence[str], probs: np.ndarray, classes: Sequence[str], *, top_k: int = TOP_K,
            min_confidence: float | None = None) -> list[PredictionRow]:
    """The one builder of prediction rows, for the terminal, JSON, CSV and HTTP: each
    image's ``top_k`` most probable classes, most probable first; ``"unsure"`` (label
    None) where the most probable is below ``min_confidence``.

    Args:
        names: each image's name (its file, ``FILE[i]`` in an array file; empty for HTTP).
        probs: float ``(n, num_classes)``.
    """
    k = min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n, k), most probable first
    rows = []
    for name, best, p in zip(names, order.tolist(), probs, strict=True):
        top = tuple((j, classes[j], round(float(p[j]), 6)) for j in best)
        if is_unsure(float(p[best[0]]), min_confidence):
            rows.append(PredictionRow(name, None, UNSURE, top[0][2], top=top))
        else:
            rows.append(PredictionRow(name, *top[0], top=top))
    return rows


def predict_files(run_dir: str | os.PathLike[str] | Model, paths: Sequence[str | os.PathLike[str]], *,
                  layout: str = "auto", device: str | torch.device = "auto",
                  top_k: int = TOP_K, min_confidence: float | None = None
                  ) -> Iterator[list[PredictionRow] | InputError]:
    """The rows of each batch of inputs, in order, converted to the run's input spec and
    predicted the way the run was evaluated (its engine, its test-time augmentation); an
    input that cannot be read yields its error in its place (its ``path`` set). A folder
    stands for the image files in it (:func:`~convnet.data.inputfiles.expand_inputs`). Memory
    stays bounded whatever the inputs' size. An ``.onnx`` file from ``convnet export`` in
    place of the run folder is predicted in ONNX Runtime.

    Args:
        run_dir: a run folder or an ``.onnx`` file, or one already opened
            (:func:`~convnet.use.loadrun.open_model`).
        top_k: the classes each row carries (at most the run's classes).
        min_confidence: answer ``"unsure"`` (label None) where the most probable class has
            a lower probability (None: always the most probable class).

    Raises:
        ConvnetError: a run that cannot be opened, a ``top_k`` below 1, a
            ``min_confidence`` outside (0, 1], a folder that cannot be read or holds no
            images (before anything is predicted).
    """
    check_top_k(top_k)
    check_min_confidence(min_confidence)
    files = expand_inputs(paths).files
    model = run_dir if isinstance(run_dir, LoadedRun | OnnxModel) else open_model(run_dir, device=device)
    for item in input_batches(files, model.spec, layout=layout):
        if isinstance(item, InputError):
            yield item
            continue
        yield rows_of(item.names, model.probabilities(item.images), model.spec.classes, top_k=top_k,
                      min_confidence=min_confidence)


@dataclass
class PredictJob:
    """What ``convnet predict RUN INPUT...`` does, as one object (:func:`predict_inputs`):
    iterating it predicts each batch of inputs in order, yielding its rows (or an input's
    error in its place); with ``csv``, every row is also written to that table (whole or
    not at all: a temporary file renamed once the last batch is in); with ``explain``, the
    heat maps are written once the predictions are done. The counts are filled in as it goes.

    Attributes:
        passed_over: files in the input folders that are not images.
        predicted, unreadable, unsure: images predicted, inputs that could not be read,
            images answered "unsure".
        explained: heat maps written (None without ``explain``).
    """

    model: Model
    files: list[Path]
    passed_over: list[Path]
    from_folders: int
    top_k: int
    min_confidence: float | None
    layout: str
    csv: Path | None = None
    explain: Path | None = None
    progress: bool = False
    predicted: int = 0
    unreadable: int = 0
    unsure: int = 0
    explained: int | None = None

    def __iter__(self) -> Iterator[list[PredictionRow] | InputError]:
        answer = self.min_confidence is not None
        bar = Bar(self.from_folders or None, "predicting", enabled=self.progress and self.from_folders > 0)
        with atomic_file(self.csv, text=True) if self.csv is not None else contextlib.nullcontext() as f:
            table = csv.writer(f) if f is not None else None
            if table is not None:
                table.writerow(csv_header(self.top_k, answer))
            for item in predict_files(self.model, self.files, layout=self.layout, top_k=self.top_k,
                                      min_confidence=self.min_confidence):  # bounded memory for any input
                rows = [item] if isinstance(item, InputError) else item
                self.unreadable += isinstance(item, InputError)
                self.predicted += len(rows) - isinstance(item, InputError)
                self.unsure += sum(isinstance(r, PredictionRow) and r.unsure for r in rows)
                if table is not None:
                    table.writerows(csv_row(r, self.top_k, answer) for r in rows)
                bar.update(len(rows))
                yield item
        bar.close()
        if self.explain is not None:
            assert isinstance(self.model, LoadedRun)  # check_explain_output refused an .onnx file
            self.explained = write_explanations(self.model.model, self.model.spec, self.files, self.explain,
                                                layout=self.layout)


def predict_inputs(run: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *, top_k: int = TOP_K,
                   min_confidence: float | None = None, layout: str = "auto", device: str | torch.device = "auto",
                   csv: str | os.PathLike[str] | None = None, explain: str | os.PathLike[str] | None = None,
                   progress: bool = False) -> PredictJob:
    """``convnet predict RUN INPUT...``, every flag checked and the model opened before
    anything is predicted or written: iterate the job to predict (:class:`PredictJob`).

    Args:
        run: a run folder, or an ``.onnx`` file from ``convnet export``.
        inputs: image files, folders of them (sorted, recursive), ``.npy`` arrays, IDX files.
        top_k: the classes each row carries (at most the run's).
        min_confidence: answer ``"unsure"`` below it (None: always the most probable class).
        layout: how to read 4-d arrays whose shape fits both layouts.
        csv: also write a row per image to this table.
        explain: also write each image with the heat map of its predicted class into this folder.

    Raises:
        ConvnetError: a bad flag, an output that cannot be written, a run that cannot be opened.
    """
    check_top_k(top_k)
    check_min_confidence(min_confidence)
    if csv is not None:
        check_output_file(Path(csv), "--csv")
    expanded = expand_inputs(inputs)  # a folder: its image files
    model = open_model(run, device=device)
    if explain is not None:
        check_explain_output(model, Path(explain))
    return PredictJob(model, expanded.files, expanded.passed_over, expanded.from_folders,
                      min(top_k, model.spec.num_classes), min_confidence, layout,
                      Path(csv) if csv is not None else None, Path(explain) if explain is not None else None, progress)


def check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ConvnetError(f"--top-k must be at least 1, got {top_k}")


def check_min_confidence(min_confidence: float | None) -> None:
    if min_confidence is not None and not 0 < min_confidence <= 1:  # NaN fails too
        raise ConvnetError(f"--min-confidence must be a probability in (0, 1], got {min_confidence:g}; e.g. 0.9 "
                           "answers only the images whose most probable class has 90 % or more")


def is_unsure(top_probability: float, min_confidence: float | None) -> bool:
    """Whether an image whose most probable class has ``top_probability`` is answered "unsure"."""
    return min_confidence is not None and top_probability < min_confidence


def csv_header(top_k: int, answer: bool = False) -> list[str]:
    """``path,class,probability,class_2,probability_2,...,error`` for ``top_k`` classes;
    with ``answer`` (``--min-confidence``) an ``answer`` column after the path: the class,
    or ``unsure``."""
    ranks = [("class", "probability"), *((f"class_{i}", f"probability_{i}") for i in range(2, top_k + 1))]
    return ["path", *(["answer"] if answer else []), *(name for pair in ranks for name in pair), "error"]


def csv_row(item: PredictionRow | InputError, top_k: int, answer: bool = False) -> list[str]:
    """One CSV row: an image's classes and probabilities, or a file's error in the last column."""
    if isinstance(item, InputError):
        return [item.path or "", *([""] if answer else []), *[""] * (2 * top_k), str(item)]
    cells = [cell for _, cls, p in item.top for cell in (cls, f"{p:.6f}")]
    return [item.input, *([item.cls] if answer else []), *cells, *[""] * (2 * top_k - len(cells)), ""]


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
        onnx: on the CPU, the export it predicts with (:class:`~convnet.use.loadrun.OnnxPath`).
    """

    model: nn.Module
    input_spec: InputSpec
    classes: np.ndarray
    engine: Engine
    tta: bool = False
    layout: str = "auto"
    onnx: OnnxPath | None = None

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(N, len(classes))`` float64, columns in :attr:`classes` order, rows summing to 1.

        Args:
            X: images as :func:`convnet.data.arrays.as_images` accepts (arrays in any layout,
                tensors, PIL images, file paths), converted to :attr:`input_spec`.
        """
        images = as_images(X, self.input_spec, layout=self.layout)
        if len(images) == 0:
            return np.zeros((0, len(self.classes)))
        fast = self.onnx.probabilities(images) if self.onnx is not None else None
        if fast is not None:
            probs = fast.astype(np.float64)
            return probs / probs.sum(axis=1, keepdims=True)
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
    return Predictor(loaded.model, loaded.spec, loaded.labels, loaded.engine, tta=loaded.tta, onnx=loaded.onnx)
