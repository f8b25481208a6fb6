"""Opening a trained model for use, one way for every command and the estimator.

:func:`load_run` opens a run folder: its record (:class:`~convnet.core.runfolder.Run`), its
training settings, the engine it predicts with (its own arithmetic: a faithful run in
fp32) and its model with the trained weights, and finds its data again when asked
(:meth:`LoadedRun.dataset`: the same images, split as recorded, or the held-out images a
saved estimator keeps). :func:`open_model` makes the one choice several commands share:
a run folder, or an ``.onnx`` file from ``convnet export`` (:mod:`convnet.use.onnxfile`).
Both answer the same questions (``spec``, ``tta``, ``probabilities(images)``,
``dataset()``), so a command that predicts or scores does not care which it was given.

On the CPU a model predicts in ONNX Runtime, on its export (:class:`OnnxPath`), where it
has one: 1.3-1.6 times as fast as PyTorch's fp32 there. A run folder keeps its export as
``RUN/model.onnx`` (written by ``convnet export RUN`` and ``convnet serve RUN``, or the
first time the run is asked for :data:`EXPORT_FROM` images at once, where exporting pays;
written whole, used only while it matches the weights' digest, the calibration and the
test-time flips); a model in memory (the estimator's) exports in memory at that size. Both
paths give the same labels and probabilities within 1e-4 (the parity bound of ``convnet
export``, checked again each time an export is made).
GPUs, faithful runs (the tutorial's own arithmetic), heat maps and the inspection folds
stay on PyTorch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.durable import atomic_write
from convnet.core.errors import ConvnetError, RunError
from convnet.data.dataset import Dataset, Images, InputSpec
from convnet.data.load import run_data
from convnet.models.engine import Engine, make_engine
from convnet.models.inference import infer
from convnet.models.networks import Calibrated, create_model, load_weights
from convnet.training.config import TrainConfig
from convnet.use.onnxfile import OnnxModel, is_onnx, new_session, open_onnx, session_probabilities
from convnet.use.onnxgraph import WEIGHTS_KEY, export_model, run_metadata, set_metadata, weights_digest

PathLike = str | os.PathLike[str]
# Images in one call from which a model without an export is exported to predict. Exporting costs about 4.5 s in a
# fresh process (the exporter's imports, then 1 s) and ONNX Runtime saves about 33 us an image (the seed model: 14,236
# against 9,757 images/s, convnet bench, 2 AVX512-BF16 cores): it pays from about 150,000 images. Below that a run
# predicts in PyTorch until it has an export (`convnet export RUN`, `convnet serve RUN`, or a call this large).
EXPORT_FROM = 150_000
PARITY_PROBE = 256  # images of the call a new export is checked on against PyTorch
PARITY_BOUND = 1e-4  # the largest probability difference allowed (convnet export's bound)


class OnnxPath:
    """How a model predicts on the CPU: in ONNX Runtime on its export when it has one (or
    is asked for :data:`EXPORT_FROM` images or more at once, which makes one), else in
    PyTorch. A run's export is kept in its folder (``RUN/model.onnx``); a model without a
    folder is exported in memory.

    Args:
        model: the network with its trained weights (calibrated where the run is).
        spec: its input spec; tta: predicted with test-time flips.
        run: the run folder that keeps the export (None: in memory only).
        temperature: the run's calibration temperature (part of the graph and its metadata).
    """

    def __init__(self, model: nn.Module, spec: InputSpec, tta: bool, run: runfolder.Run | None = None,
                 temperature: float | None = None) -> None:
        self.model, self.spec, self.tta, self.run, self.temperature = model, spec, tta, run, temperature
        self._session: Any = None
        self._looked = run is None  # whether the run folder's kept export was looked for
        self._failed = False  # an export that could not be made or failed the parity check: PyTorch it is

    def session(self, images: Images) -> Any | None:
        """The ONNX Runtime session to predict ``images`` with; None: predict them in PyTorch."""
        if self._session is None and not self._looked:
            self._looked = True
            self._session = self._kept()
        if self._session is None and not self._failed and len(images) >= EXPORT_FROM:
            self._session = self._export(images)
            self._failed = self._session is None
        return self._session

    def probabilities(self, images: Images) -> np.ndarray | None:
        """Class probabilities, float32 ``(N, num_classes)``, in ONNX Runtime; None where
        ``images`` are to be predicted in PyTorch (see :meth:`session`)."""
        session = self.session(images)
        if session is None:
            return None
        where = self.run.path / runfolder.ONNX if self.run is not None else Path("the model exported in memory")
        return session_probabilities(session, images, self.spec.num_classes, where)

    def _kept(self) -> Any | None:
        found = self.kept()
        return found.session if found is not None else None

    def kept(self) -> OnnxModel | None:
        """The run folder's export (``RUN/model.onnx``) opened, if it was made from these
        weights, calibration and flips; None without one, or with a stale or damaged one."""
        path = self.run.path / runfolder.ONNX if self.run is not None else None
        if path is None or not path.is_file():
            return None
        try:
            found = open_onnx(path)
        except RunError:  # damaged, or not convnet's: made again when it pays
            return None
        meta = found.metadata
        fresh = (meta.get(WEIGHTS_KEY) == weights_digest(path.parent) and found.tta == self.tta
                 and meta.get("convnet.temperature") == json.dumps(self.temperature)
                 and found.spec.to_json() == self.spec.to_json())
        return found if fresh else None

    def _export(self, images: Images) -> Any | None:
        """A new export, checked on the first :data:`PARITY_PROBE` of ``images`` against
        PyTorch and kept in the run folder where it can be written."""
        try:
            proto = export_model(self.model, self.spec, tta=self.tta)
        except ConvnetError:  # the exporter failed on this model: PyTorch predicts
            return None
        session = new_session(proto.SerializeToString())
        probe = images[:PARITY_PROBE]
        ours = session_probabilities(session, probe, self.spec.num_classes, Path(runfolder.ONNX))
        theirs = torch_probabilities(self.model, probe, self.tta)
        if not np.array_equal(ours.argmax(1), theirs.argmax(1)) or np.abs(ours - theirs).max() > PARITY_BOUND:
            return None
        if self.run is not None:
            set_metadata(proto, run_metadata(self.run, self.temperature, None))
            keep_export(self.run, proto.SerializeToString())
        return session


def keep_export(run: runfolder.Run, blob: bytes) -> bool:
    """Keep ``blob``, the ONNX file of the run's model made from its weights, as the run's
    export (``RUN/model.onnx``), written whole; False where the folder cannot be written in
    (the export then lives in memory only)."""

    def write(f: IO[bytes]) -> None:
        f.write(blob)

    try:
        atomic_write(run.path / runfolder.ONNX, write)
        (run.path / runfolder.ONNX_PARITY).unlink(missing_ok=True)  # it described another file
    except (RunError, OSError):
        return False
    return True


def torch_probabilities(model: nn.Module, images: Images, tta: bool, engine: Engine | None = None) -> np.ndarray:
    """Class probabilities, float32 ``(N, num_classes)``, in PyTorch (fp32)."""
    return infer(model, images, engine=engine or Engine.fast(torch.device("cpu")), tta=tta).softmax(dim=1).numpy()


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
    onnx: OnnxPath | None = field(default=None, compare=False)  # on the CPU: the export it predicts with

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
        test-time flips; on the CPU in ONNX Runtime, see :class:`OnnxPath`)."""
        fast = self.onnx.probabilities(images) if self.onnx is not None else None
        return fast if fast is not None else self.torch_probabilities(images)

    def torch_probabilities(self, images: Images) -> np.ndarray:
        """The same in PyTorch (what an export is checked against)."""
        return torch_probabilities(self.model, images, self.tta, self.engine)

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
    model = Calibrated(model, temperature).eval() if temperature is not None else model
    fast = engine.device.type == "cpu" and not run.faithful
    return LoadedRun(run, engine, model, OnnxPath(model, spec, run.tta, run, temperature) if fast else None)


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
