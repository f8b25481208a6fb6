"""A model as an ONNX graph, made by PyTorch's exporter, and the metadata that ties it to its run.

The graph is the whole of what convnet does to a batch of images in the run's input spec::

    images         uint8 (N, C, H, W), N dynamic
    x = images * spec.scale                        float32 in [0, 1]
    logits = model(x)                              (N, num_classes), divided by the calibration temperature if any
    logits = (logits + model(x.flip(3))) / 2       only for a run predicted with test-time flips
    probabilities = softmax(logits)                float32 (N, num_classes), rows sum to 1

so a program that loads it needs ONNX Runtime and nothing of convnet. It is made by
PyTorch's ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``) at opset
:data:`OPSET`, always in fp32 (a run trained in bfloat16 is exported in fp32 too).

The metadata (``metadata_props``, strings) holds what :mod:`convnet.use.onnxfile` needs to
use it like a run folder: ``convnet.input`` (the input spec, class names included),
``convnet.version``, ``convnet.model``, ``convnet.tta``, ``convnet.temperature``,
``convnet.test_accuracy`` (the run's, from its ``metrics.json``), ``convnet.parity`` (from
``convnet export``), ``convnet.data`` (the run's data section) with, for a folder of images,
``convnet.split`` (the files of each split), so that ``convnet evaluate FILE.onnx`` finds
the data again, and ``convnet.weights_sha256``, the digest of the weights it was made from:
a run's kept export (``RUN/model.onnx``, see :mod:`convnet.use.loadrun`) is used only while
it matches them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.errors import ConvnetError, RunError
from convnet.core.version import __version__
from convnet.data.dataset import InputSpec

OPSET = 18  # the exporter's own default in torch 2.9-2.13; ONNX Runtime >= 1.14 runs it
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
WEIGHTS_KEY = "convnet.weights_sha256"  # the digest of the weights file the graph was made from


class Deployed(nn.Module):
    """A model as it is exported: uint8 images in, probabilities out (see the module's docstring)."""

    def __init__(self, model: nn.Module, scale: float, tta: bool) -> None:
        super().__init__()
        self.model, self.scale, self.tta = model, scale, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.scale  # (N, C, H, W) uint8 -> float32 in [0, 1]
        logits = self.model(x)  # (N, K)
        if self.tta:
            logits = (logits + self.model(x.flip(3))) / 2  # the mean with the left-right mirror
        return logits.softmax(dim=1)  # (N, K)


def export_model(model: nn.Module, spec: InputSpec, *, tta: bool) -> Any:
    """The ONNX ``ModelProto`` of ``model`` taking uint8 images in ``spec``, no metadata yet.

    The exporter's progress lines and warnings (about torchvision's operators, which no
    convnet model uses) are kept off the terminal; a failure is reported as one error.
    """
    import onnx

    plain = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format)  # the caller's is kept
    deployed = Deployed(plain.eval(), spec.scale, tta).eval()
    example = torch.zeros((2, *spec.shape), dtype=torch.uint8)  # 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet():
            program = torch.onnx.export(deployed, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"images": {0: batch}}, optimize=True, verbose=False)
    except Exception as e:  # the exporter raises many types; none is the user's fault
        raise ConvnetError(f"the ONNX exporter failed on this model ({type(e).__name__}: {str(e)[:300]}); "
                           "please report it with the run's config.json") from None
    if program is None:  # only the legacy exporter writes straight to a file and returns None
        raise ConvnetError("the ONNX exporter returned no model; please report it with the run's config.json")
    proto = program.model_proto
    onnx.checker.check_model(proto)
    return proto


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: its prints, its Python warnings and its logging."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_metadata(run: runfolder.Run, temperature: float | None, parity: dict[str, Any] | None) -> dict[str, str]:
    """The metadata written into a run's .onnx file (all values strings, JSON where
    structured): ``temperature`` its calibration (in the graph already), ``parity`` the
    figures of ``convnet export``'s check (None: not checked on the test images)."""
    recorded = recorded_accuracy(run)
    if recorded is None and parity is not None:  # no metrics.json: the fp32 score measured at export
        recorded = parity.get("torch_accuracy")
    meta = {
        "convnet.version": __version__,
        "convnet.model": run.model_name,
        "convnet.input": json.dumps(run.spec.to_json()),
        "convnet.tta": json.dumps(run.tta),
        "convnet.test_accuracy": json.dumps(recorded),
        "convnet.data": json.dumps(run.config["data"]),
        "convnet.run": run.path.name,
        "convnet.temperature": json.dumps(temperature),  # in the graph already; null: not calibrated
        WEIGHTS_KEY: weights_digest(run.path),
    }
    if parity is not None:
        meta["convnet.parity"] = json.dumps(parity)
    if run.config["data"].get("kind") == "folder" and (run.path / runfolder.SPLIT).is_file():
        meta["convnet.split"] = json.dumps(runfolder.read_json(run.path / runfolder.SPLIT))
    return meta


def recorded_accuracy(run: runfolder.Run) -> float | None:
    """The test accuracy in the run's ``metrics.json`` (what ``convnet evaluate`` wrote);
    None without the file or without a test accuracy in [0, 1].

    Raises:
        RunError: the file is not JSON, or not an object of scores (a ``test`` object).
    """
    path = run.path / runfolder.METRICS
    if not path.is_file():
        return None
    metrics = runfolder.read_json(path)
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test", {}), dict):
        found = (_json_kind(metrics) if not isinstance(metrics, dict)
                 else f"\"test\" holding {_json_kind(metrics['test'])}")
        raise RunError(f"{path}: not the scores `convnet evaluate` writes (a JSON object; found {found}); "
                       f"run `convnet evaluate {run.path}` again to rewrite it")
    value = metrics.get("test", {}).get("accuracy")
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1:  # NaN fails too
        return float(value)
    return None


def _json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    kinds = ((bool, "true or false"), (int | float, "a number"), (str, "a string"), (list, "an array"),
             (dict, "an object"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def set_metadata(proto: Any, meta: dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"convnet {meta['convnet.model']}: uint8 images {INPUT_NAME} (N, C, H, W) -> "
                        f"{OUTPUT_NAME} (N, classes); class names and input spec in metadata_props")


def weights_digest(run_dir: Path) -> str:
    """The SHA-256 of a run's weights file (``model.safetensors``), hex."""
    h = hashlib.sha256()
    with open(Path(run_dir) / runfolder.WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
