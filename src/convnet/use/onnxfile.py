"""An exported ``.onnx`` file read back: its input spec and metadata, predictions in ONNX
Runtime (CPU), and the data of the run it came from.

``convnet predict FILE.onnx``, ``convnet evaluate FILE.onnx`` and ``convnet serve`` use
it (through :func:`convnet.use.loadrun.open_model`), so a deployed model is checked with the
same commands as a run folder. The file
must come from ``convnet export`` (see :mod:`convnet.use.export` for the graph and the
metadata); any other ONNX model is refused with a message saying so.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.core import runfolder
from convnet.core.errors import RunError
from convnet.data.dataset import Dataset, Images, InputSpec
from convnet.data.load import run_data

PREDICT_BATCH = 128  # images per ONNX Runtime call (seed model, 2 cores: 17,112 images/s at 128, 14,801 at 256)
JSON_KEYS = ("convnet.input", "convnet.tta", "convnet.test_accuracy", "convnet.parity", "convnet.data",
             "convnet.split", "convnet.temperature")  # the metadata held as JSON (see convnet.use.export)


def is_onnx(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an .onnx file (rather than a run folder)."""
    return Path(path).suffix.lower() == ".onnx"


def new_session(model: bytes | str | os.PathLike[str], threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a model's bytes or file; ``threads`` for its
    operators (None: ONNX Runtime's default, one per core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its warnings are about graph rewrites, its errors are raised too
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def session_probabilities(session: Any, images: Images | np.ndarray, num_classes: int, path: Path,
                          batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Class probabilities, float32 ``(N, num_classes)``, of uint8 images ``(N, C, H, W)``
    (a tensor, an array or images on disk) from a convnet graph's ONNX Runtime ``session``,
    ``batch_size`` at a time.

    Raises:
        RunError: ONNX Runtime failed on the model (``path``: a file changed after its export).
    """
    out = []
    for s in range(0, len(images), batch_size):
        chunk = _numpy(images[s:s + batch_size])
        try:
            out.append(session.run(None, {"images": chunk})[0])
        except Exception as e:  # onnxruntime's own Fail/RuntimeException types: the graph's fault
            raise RunError(f"{path}: ONNX Runtime failed on this model ({_first_line(e)}); "
                           "export the run again") from None
    return np.concatenate(out) if out else np.empty((0, num_classes), np.float32)


@dataclass(frozen=True)
class OnnxModel:
    """A convnet .onnx file loaded in ONNX Runtime.

    Attributes:
        path: the file.
        spec: the input spec it was exported for (channels, size, classes, preprocessing).
        metadata: its ``metadata_props`` (strings; see :mod:`convnet.use.export`).
        session: the ONNX Runtime session.
    """

    path: Path
    spec: InputSpec
    metadata: dict[str, str]
    session: Any

    @property
    def test_accuracy(self) -> float | None:
        value = self._json("convnet.test_accuracy")
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        return float(value) if ok else None

    @property
    def tta(self) -> bool:
        return bool(self._json("convnet.tta"))

    def _json(self, key: str) -> Any:
        return metadata_json(self.path, self.metadata, key)

    def probabilities(self, images: Images | np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Class probabilities, float32 ``(N, num_classes)``, of uint8 images ``(N, C, H, W)``
        in :attr:`spec` (a tensor, an array or images on disk), ``batch_size`` at a time.

        Raises:
            RunError: ONNX Runtime failed on the model (a file changed after its export).
        """
        return session_probabilities(self.session, images, self.spec.num_classes, self.path, batch_size)

    def dataset(self, data_dir: str | os.PathLike[str] | None = None, *, progress: bool = True) -> Dataset:
        """The data of the run the file was exported from, found through its metadata
        (``convnet.data``, ``convnet.split``) or in ``data_dir``.

        Raises:
            RunError: the metadata does not say which data (a file from an older export).
        """
        data = self._json("convnet.data")
        if not isinstance(data, dict):
            raise RunError(f"{self.path}: no convnet.data in its metadata, so its data set is unknown; "
                           "export the run again with `convnet export RUN`")
        split = self._json("convnet.split")
        if data.get("kind") == "folder" and not isinstance(split, dict):
            raise RunError(f"{self.path}: exported from a folder of images without its split (convnet.split); "
                           "export the run again with `convnet export RUN`")
        config = {"train": {"model": self.metadata.get("convnet.model", "?")}, "data": data,
                  "input": self.spec.to_json()}
        return run_data(runfolder.Run(self.path, config, []), data_dir, progress=progress, split=split)

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` answers: the input spec, classes, scores and versions."""
        return {"file": self.path.name, "model": self.metadata.get("convnet.model"),
                "input": self.spec.to_json(), "classes": list(self.spec.classes), "tta": self.tta,
                "test_accuracy": self.test_accuracy, "temperature": self._json("convnet.temperature"),
                "convnet_version": self.metadata.get("convnet.version"),
                "parity": self._json("convnet.parity")}


def metadata_json(path: Path, metadata: dict[str, str], key: str) -> Any:
    """The value of a JSON entry of a model's metadata (None where absent), refused
    unless it is JSON that can be answered as JSON again: no NaN or infinity, no text
    that is not Unicode."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key], parse_constant=_refuse, parse_float=_finite)
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")  # e.g. "\ud800" parses, never encodes
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as e:  # JSONDecodeError, a number of thousands of digits, NaN, a lone surrogate
        problem = str(e).split(";")[0][:100]
    else:
        return value
    raise RunError(f"{path}: metadata {key} is not valid JSON ({problem}); export the run again")


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not np.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _first_line(e: BaseException) -> str:
    """What ONNX Runtime says went wrong, without its source file names and line numbers."""
    lines = str(e).strip().splitlines()
    text = _ORT_PREFIX.sub("", lines[0] if lines else type(e).__name__).split("Status Message: ")[-1]
    return _ORT_SOURCE.sub("", text)[:200]


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"\S+\.(?:h|cc|cpp):\d+ .*? was false\. ")


def _numpy(chunk: torch.Tensor | np.ndarray) -> np.ndarray:
    a = chunk.numpy() if isinstance(chunk, torch.Tensor) else chunk
    return np.ascontiguousarray(a, dtype=np.uint8)


def open_onnx(path: str | os.PathLike[str], *, threads: int | None = None, content: bytes | None = None) -> OnnxModel:
    """Load an .onnx file written by ``convnet export``.

    Args:
        threads: ONNX Runtime's threads per call (None: one per core).
        content: the model's bytes, already in memory (a run exported for serving, handed to
            each worker of ``convnet serve``); ``path`` then only names it.

    Raises:
        RunError: no such file, not an ONNX model, or not one of convnet's (no input
            spec in its metadata, or inputs and outputs that do not match it).
    """
    p = Path(path)
    if content is None and not p.is_file():
        raise RunError(f"{p}: no such file" + ("; it is a folder" if p.is_dir() else ""))
    try:
        session = new_session(p if content is None else content, threads)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/InvalidGraph types
        raise RunError(f"{p}: not a valid ONNX model ({_first_line(e)})") from None
    try:
        metadata = dict(session.get_modelmeta().custom_metadata_map)
    except UnicodeDecodeError:  # ONNX Runtime hands over the file's bytes as they are
        raise RunError(f"{p}: its metadata is not UTF-8 text; export the run again") from None
    if "convnet.input" not in metadata:
        raise RunError(f"{p}: not written by `convnet export` (no convnet.input in its metadata); "
                       "export the run with `convnet export RUN`")
    for key in JSON_KEYS:  # all of them now: a damaged file is refused before it is used
        metadata_json(p, metadata, key)
    spec = InputSpec.from_json(metadata_json(p, metadata, "convnet.input"), f"{p} metadata")
    _check_signature(p, session, spec)
    return OnnxModel(p, spec, metadata, session)


def _check_signature(path: Path, session: Any, spec: InputSpec) -> None:
    """One uint8 input ``images`` (N, C, H, W) with N free, one float output (N, classes)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if (len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)"
            or len(inputs[0].shape) != 4 or isinstance(inputs[0].shape[0], int)
            or list(inputs[0].shape[1:]) != list(spec.shape)):
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise RunError(f"{path}: its input ({found}) does not match its input spec (images: uint8 (N, "
                       f"{spec.channels}, {spec.height}, {spec.width}), any N); export the run again")
    if len(outputs) != 1 or outputs[0].type != "tensor(float)" or len(outputs[0].shape) != 2 \
            or outputs[0].shape[-1:] != [spec.num_classes]:
        found = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outputs)
        raise RunError(f"{path}: its output ({found}) is not the probabilities of its {spec.num_classes} classes "
                       f"(float (N, {spec.num_classes})); export the run again")
