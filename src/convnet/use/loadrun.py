"""Opening a trained model for use, one way for every command and the estimator.

:func:`load_run` opens a run folder: its record (:class:`~convnet.core.runfolder.Run`), its
training settings, the engine it predicts with (its own arithmetic: a faithful run in
fp32) and its model with the trained weights, and finds its data again when asked
(:meth:`LoadedRun.dataset`: the same images, split as recorded, or the held-out images a
saved estimator keeps). :func:`open_model` makes the one choice several commands share:
a run folder, or an ``.onnx`` file from ``convnet export`` (:mod:`convnet.use.onnxfile`).
Both answer the same questions (``spec``, ``tta``, ``probabilities(images)``,
``dataset()``), so a command that predicts or scores does not care which it was given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.errors import RunError
from convnet.data.dataset import Dataset, Images, InputSpec
from convnet.data.load import run_data
from convnet.models.engine import Engine, make_engine
from convnet.models.inference import infer
from convnet.models.networks import Calibrated, create_model, load_weights
from convnet.training.config import TrainConfig
from convnet.use.onnxfile import OnnxModel, is_onnx, open_onnx

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class LoadedRun:
    """A run folder opened for use.

    Attributes:
        run: the folder's record: config, history, input spec.
        engine: device and arithmetic, as the run is evaluated (faithful runs in fp32).
        model: the network with the trained weights, on ``engine.device``, in eval mode.
    """

    run: runfolder.Run
    engine: Engine
    model: nn.Module

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def spec(self) -> InputSpec:
        return self.run.spec

    @property
    def tta(self) -> bool:
        """Evaluated with test-time flips: predicted with them too."""
        return self.run.tta

    @property
    def train_config(self) -> TrainConfig:
        """The run's resolved training settings (read when asked: predicting needs none).

        Raises:
            RunError: a recorded value of the wrong type.
        """
        return TrainConfig.from_dict(self.run.config["train"])

    @property
    def labels(self) -> np.ndarray:
        """The label of each class, in output order: those a
        :class:`~convnet.ConvNetClassifier` was fitted on (numbers stay numbers) when it
        saved the run, else the class names."""
        return run_labels(self.run)

    def probabilities(self, images: Images) -> np.ndarray:
        """Class probabilities, float32 ``(N, num_classes)``, of uint8 images
        ``(N, C, H, W)`` in :attr:`spec`, as the run predicts them (its engine, its
        test-time flips)."""
        return infer(self.model, images, engine=self.engine, tta=self.tta).softmax(dim=1).numpy()

    def dataset(self, data_dir: PathLike | None = None, *, progress: bool = True) -> Dataset:
        """The data the run was trained on, split as it was (:func:`convnet.data.load.run_data`):
        its training, validation and test images."""
        return run_data(self.run, data_dir, progress=progress)


def load_run(source: PathLike | runfolder.Run, *, device: str | torch.device = "auto",
             engine: Engine | None = None) -> LoadedRun:
    """Open a run folder (or a run already read with :func:`convnet.core.runfolder.open_run`) with its
    model and trained weights.

    Args:
        device: where to compute (``auto``, ``cpu``, ``cuda``), with the run's own
            arithmetic; ignored when ``engine`` is given.
        engine: the engine to predict with instead.

    Raises:
        RunError: not a run folder, or its weights are missing, damaged or do not fit.
    """
    run = source if isinstance(source, runfolder.Run) else runfolder.open_run(source)
    engine = engine or make_engine(device, faithful=run.faithful)
    spec = run.spec
    model = create_model(run.model_name, spec.num_classes, spec.channels, (spec.height, spec.width),
                         mean=spec.mean, std=spec.std)
    load_weights(model, run.path / runfolder.WEIGHTS)
    model = engine.prepare_model(model).eval()
    temperature = run_temperature(run)
    return LoadedRun(run, engine, Calibrated(model, temperature).eval() if temperature is not None else model)


def run_temperature(run: runfolder.Run) -> float | None:
    """The temperature a run was calibrated with (``calibration.json``, from ``convnet train
    --calibrate``); None for a run without one.

    Raises:
        RunError: the file is damaged, or its temperature is not a positive number.
    """
    path = run.path / runfolder.CALIBRATION
    if not path.is_file():
        return None
    found = runfolder.read_json(path)
    t = found.get("temperature") if isinstance(found, dict) else None
    if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t < float("inf"):
        raise RunError(f"{path}: no positive temperature in it; the run folder is damaged (delete the file to "
                       "predict uncalibrated)")
    return float(t)


def load_model(run_dir: PathLike, engine: Engine | None = None) -> tuple[nn.Module, runfolder.Run]:
    """The trained model of a run folder, on ``engine.device`` (default: the CPU, with the
    run's own arithmetic), and the run itself."""
    loaded = load_run(run_dir, device="cpu", engine=engine)
    return loaded.model, loaded.run


def run_labels(run: runfolder.Run) -> np.ndarray:
    """The labels of a run's classes: those a :class:`~convnet.ConvNetClassifier` was
    fitted on (numbers stay numbers) when it saved the run, else the class names."""
    saved = run.config.get("estimator", {}).get("classes") if isinstance(run.config.get("estimator"), dict) else None
    if isinstance(saved, list) and len(saved) == len(run.spec.classes):
        return np.asarray(saved)
    return np.asarray(run.spec.classes)


Model = LoadedRun | OnnxModel  # what a command that predicts or scores is given


def open_model(path: PathLike, *, device: str | torch.device = "auto", engine: Engine | None = None,
               threads: int | None = None) -> Model:
    """A run folder or an ``.onnx`` file from ``convnet export``, by its name: the one
    place that choice is made.

    Args:
        device, engine: for a run folder (see :func:`load_run`).
        threads: for an ``.onnx`` file, ONNX Runtime's threads per call (None: one per core).

    Raises:
        RunError: neither a run folder nor a convnet ``.onnx`` file, or a damaged one.
    """
    if is_onnx(path):
        return open_onnx(path, threads=threads)
    return load_run(path, device=device, engine=engine)
