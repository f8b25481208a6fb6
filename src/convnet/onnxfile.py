"""An exported ``.onnx`` file read back: its input spec and metadata, and predictions in
ONNX Runtime (CPU).

``convnet predict FILE.onnx``, ``convnet evaluate FILE.onnx`` and ``convnet serve`` use
it, so a deployed model is checked with the same commands as a run folder. The file
must come from ``convnet export`` (see :mod:`convnet.export` for the graph and the
metadata); any other ONNX model is refused with a message saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.datasets import Images, InputSpec
from convnet.errors import InputError, RunError

PREDICT_BATCH = 256  # images per ONNX Runtime call when predicting files or a data set


def is_onnx(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an .onnx file (rather than a run folder)."""
    return Path(path).suffix.lower() == ".onnx"


def new_session(model: bytes | str | os.PathLike[str], threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a model's bytes or file; ``threads`` for its
    operators (None: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not the user's input
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class OnnxModel:
    """A convnet .onnx file loaded in ONNX Runtime.

    Attributes:
        path: the file.
        spec: the input spec it was exported for (channels, size, classes, preprocessing).
        metadata: its ``metadata_props`` (strings; see :mod:`convnet.export`).
        session: the ONNX Runtime session.
    """

    path: Path
    spec: InputSpec
    metadata: dict[str, str]
    session: Any

    @property
    def test_accuracy(self) -> float | None:
        value = self._json("convnet.test_accuracy")
        return float(value) if isinstance(value, int | float) else None

    @property
    def tta(self) -> bool:
        return bool(self._json("convnet.tta"))

    def _json(self, key: str) -> Any:
        try:
            return json.loads(self.metadata[key]) if key in self.metadata else None
        except json.JSONDecodeError:
            raise RunError(f"{self.path}: metadata {key} is not valid JSON; export the run again") from None

    def probabilities(self, images: Images | np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Class probabilities, float32 ``(N, num_classes)``, of uint8 images ``(N, C, H, W)``
        in :attr:`spec` (a tensor, an array or images on disk), ``batch_size`` at a time."""
        out = [self.session.run(None, {"images": _numpy(images[s:s + batch_size])})[0]
               for s in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.empty((0, self.spec.num_classes), np.float32)

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` answers: the input spec, classes, scores and versions."""
        return {"file": self.path.name, "model": self.metadata.get("convnet.model"),
                "input": self.spec.to_json(), "classes": list(self.spec.classes), "tta": self.tta,
                "test_accuracy": self.test_accuracy, "convnet_version": self.metadata.get("convnet.version"),
                "parity": self._json("convnet.parity")}


def _numpy(chunk: torch.Tensor | np.ndarray) -> np.ndarray:
    a = chunk.numpy() if isinstance(chunk, torch.Tensor) else chunk
    return np.ascontiguousarray(a, dtype=np.uint8)


def open_onnx(path: str | os.PathLike[str], *, threads: int | None = None) -> OnnxModel:
    """Load an .onnx file written by ``convnet export``.

    Raises:
        RunError: no such file, not an ONNX model, or not one of convnet's (no input
            spec in its metadata, or inputs and outputs that do not match it).
    """
    p = Path(path)
    if not p.is_file():
        raise RunError(f"{p}: no such file" + ("; it is a folder" if p.is_dir() else ""))
    try:
        session = new_session(p, threads)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/InvalidGraph types
        raise RunError(f"{p}: not a valid ONNX model ({str(e).splitlines()[0][:200]})") from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if "convnet.input" not in metadata:
        raise RunError(f"{p}: not written by `convnet export` (no convnet.input in its metadata); "
                       "export the run with `convnet export RUN`")
    try:
        spec = InputSpec.from_json(json.loads(metadata["convnet.input"]), f"{p} metadata")
    except json.JSONDecodeError:
        raise RunError(f"{p}: metadata convnet.input is not valid JSON; export the run again") from None
    _check_signature(p, session, spec)
    return OnnxModel(p, spec, metadata, session)


def _check_signature(path: Path, session: Any, spec: InputSpec) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or list(inputs[0].shape[1:]) != list(spec.shape)
            or len(outputs) != 1 or outputs[0].shape[-1:] != [spec.num_classes]):
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise RunError(f"{path}: its input ({found}) does not match its input spec (uint8 (N, {spec.channels}, "
                       f"{spec.height}, {spec.width})); export the run again")


def predict_onnx_files(path: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]], *,
                       layout: str = "auto") -> Iterator[Any]:
    """:func:`convnet.predict.predict_files` for an .onnx file: the rows of each batch of
    inputs, in order, and each unreadable input's :class:`InputError` in its place."""
    from convnet.inputs import input_batches
    from convnet.predict import PredictionRow

    model = open_onnx(path)
    spec = model.spec
    for item in input_batches(paths, spec, layout=layout):
        if isinstance(item, InputError):
            yield item
            continue
        probs = model.probabilities(item.images)
        yield [PredictionRow(name, int(label), spec.classes[int(label)], round(float(p), 6))
               for name, label, p in zip(item.names, probs.argmax(1), probs.max(1), strict=True)]


def evaluate_onnx(path: str | os.PathLike[str], *, data_dir: str | os.PathLike[str] | None = None,
                  progress: bool = True) -> Any:
    """``convnet evaluate FILE.onnx``: the :class:`~convnet.evaluate.Evaluation` of the
    file's model, in ONNX Runtime, on the data of the run it was exported from, found
    through its metadata (``convnet.data``, ``convnet.split``) or in ``data_dir``."""
    from convnet import runs
    from convnet.data import run_data
    from convnet.evaluate import evaluation, probability_scores

    model = open_onnx(path)
    data = model._json("convnet.data")
    if not isinstance(data, dict):
        raise RunError(f"{model.path}: no convnet.data in its metadata, so its data set is unknown; "
                       "export the run again with `convnet export RUN`")
    split = model._json("convnet.split")
    if data.get("kind") == "folder" and not isinstance(split, dict):
        raise RunError(f"{model.path}: exported from a folder of images without its split (convnet.split); "
                       "export the run again with `convnet export RUN`")
    config = {"train": {"model": model.metadata.get("convnet.model", "?")}, "data": data,
              "input": model.spec.to_json()}
    run = runs.Run(model.path, config, [])
    dataset = run_data(run, data_dir, progress=progress, split=split)

    def score(split: Any) -> Any:
        return probability_scores(torch.from_numpy(model.probabilities(split.images)), split.labels.cpu())

    return evaluation(dataset, score(dataset.train), score(dataset.test))
