"""ONNX export of a run, checked in ONNX Runtime before it is written.

The exported graph is the whole of what convnet does to a batch of images in the run's
input spec::

    images         uint8 (N, C, H, W), N dynamic
    x = images * spec.scale                        float32 in [0, 1]
    logits = model(x)                              (N, num_classes)
    logits = (logits + model(x.flip(3))) / 2       only for a run predicted with test-time flips
    probabilities = softmax(logits)                float32 (N, num_classes), rows sum to 1

so a program that loads it needs ONNX Runtime and nothing of convnet. It is made by
PyTorch's ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``) at opset
:data:`OPSET`, always in fp32 (a run trained in bfloat16 is exported in fp32 too).

Before the file is written, ONNX Runtime predicts every test image of the run's data,
next to what ``convnet predict RUN --device cpu`` answers for them (the run's own engine,
in fp32 like every prediction: see :func:`convnet.models.engine.exact_arithmetic`): the labels must agree on at least
:data:`MIN_LABEL_AGREEMENT` of them and no probability may differ by more than
:data:`MAX_PROBABILITY_DIFFERENCE`. The figures are printed and written beside the file
(``NAME.parity.json``); a model that fails is not written.

The model's metadata (``metadata_props``, strings) holds what :mod:`convnet.use.onnxfile`
needs to use it like a run folder: ``convnet.input`` (the input spec, class names
included), ``convnet.version``, ``convnet.model``, ``convnet.tta``,
``convnet.test_accuracy`` (the run's, from its ``metrics.json``), ``convnet.parity``, and
``convnet.data`` (the run's data section) with, for a folder of images, ``convnet.split``
(the files of each split), so that ``convnet evaluate FILE.onnx`` finds the data again.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.durable import atomic_write, check_output_file, write_json
from convnet.core.errors import ConvnetError, RunError
from convnet.core.version import __version__
from convnet.data.dataset import Images, InputSpec
from convnet.training.tracking import log_file
from convnet.use.loadrun import LoadedRun, load_run, run_temperature
from convnet.use.onnxfile import new_session

OPSET = 18  # the exporter's own default in torch 2.9-2.13; ONNX Runtime >= 1.14 runs it
MIN_LABEL_AGREEMENT = 0.999
MAX_PROBABILITY_DIFFERENCE = 1e-4
PARITY_BATCH = 256  # images per ONNX Runtime call during the check
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


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


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime against the run's own predictions (``convnet predict RUN``) on the same images."""

    images: int
    label_agreement: float  # share of images given the same label
    max_probability_difference: float  # largest |p_onnx - p_torch| over all images and classes
    onnx_accuracy: float | None  # on the images' labels (None: images without labels)
    torch_accuracy: float | None
    min_label_agreement: float = MIN_LABEL_AGREEMENT
    max_allowed_difference: float = MAX_PROBABILITY_DIFFERENCE

    @property
    def passed(self) -> bool:
        return (self.label_agreement >= self.min_label_agreement
                and self.max_probability_difference <= self.max_allowed_difference)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        text = (f"parity on {self.images:,} test images, ONNX Runtime vs `convnet predict RUN`: labels agree on "
                f"{self.label_agreement:.2%} (need >= {self.min_label_agreement:.1%}), largest probability "
                f"difference {self.max_probability_difference:.2e} (need <= {self.max_allowed_difference:.0e})")
        if self.onnx_accuracy is None or self.torch_accuracy is None:
            return text
        return f"{text}; test accuracy {self.onnx_accuracy:.4f} in ONNX, {self.torch_accuracy:.4f} in PyTorch"


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the .onnx file
    parity_path: Path  # its parity figures, JSON
    parity: Parity
    opset: int
    mlflow_run: str | None = None  # the MLflow run the file was added to (a run trained with --log mlflow)


def default_output(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN/model.onnx``."""
    return Path(run_dir) / runfolder.ONNX


def parity_path(onnx_path: Path) -> Path:
    """Where the parity figures of ``NAME.onnx`` go: ``NAME.parity.json`` beside it."""
    return onnx_path.with_name(onnx_path.stem + ".parity.json")


def check_output(out: Path) -> None:
    """Refuse an output path that cannot become an .onnx file, before anything is computed."""
    if out.suffix.lower() != ".onnx":
        raise ConvnetError(f"-o {out}: the file name must end in .onnx")
    if out.is_dir():
        raise ConvnetError(f"-o {out}: is a folder; give a file name such as {out / 'model.onnx'}")
    check_output_file(out, "-o")
    if parity_path(out).is_dir():
        raise ConvnetError(f"-o {out}: its parity figures go to {parity_path(out)}, which is a folder; "
                           "choose another file name")


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
               data_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> ExportResult:
    """What ``convnet export RUN [-o FILE.onnx]`` does: export, check parity on the run's
    test images, and write the file and its figures only if the check passes; a run
    trained with ``--log mlflow`` gets the file among its MLflow artifacts.

    Raises:
        ConvnetError: a bad output path, a run that cannot be read, data that cannot be
            found, or a model that fails the parity check (nothing is written then).
    """
    run = runfolder.open_run(run_dir)
    recorded_accuracy(run)  # a missing run or damaged scores are named before the output path
    path = Path(out) if out is not None else default_output(run_dir)
    check_output(path)
    loaded = load_run(run, device="cpu")  # as `convnet predict RUN --device cpu` opens it
    dataset = loaded.dataset(data_dir, progress=progress)
    proto = export_model(loaded.model, run.spec, tta=run.tta)
    test = dataset.test
    if len(test) == 0:
        raise RunError("the run's test split is empty: there is nothing to check the exported model on")
    parity = check_parity(new_session(proto.SerializeToString()), loaded, test.images, test.labels)
    if not parity.passed:
        raise ConvnetError(f"{run.path}: the exported model fails the parity check, so it was not written: "
                           f"{parity.describe()}")
    set_metadata(proto, run_metadata(run, parity))
    blob = proto.SerializeToString()

    def write(f: IO[bytes]) -> None:
        f.write(blob)

    atomic_write(path, write)
    figures = parity_path(path)
    write_json(figures, {"onnx": path.name, "run": str(run.path), "opset": OPSET, **parity.to_json()})
    return ExportResult(path, figures, parity, OPSET, log_file(run.path, path))  # a tracked run keeps its export


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


def check_parity(session: Any, loaded: LoadedRun, images: Images, labels: torch.Tensor | None = None) -> Parity:
    """The one parity check: the exported model in ONNX Runtime (``session``) against what
    the run itself predicts (:meth:`LoadedRun.probabilities`, the path of ``convnet predict
    RUN``), on uint8 ``images`` (with their ``labels``, the accuracy of both too)."""
    reference = loaded.probabilities(images)  # (N, K)
    ours = np.concatenate([session.run(None, {INPUT_NAME: images[s:s + PARITY_BATCH].numpy()})[0]
                           for s in range(0, len(images), PARITY_BATCH)])
    y = labels.cpu().numpy() if labels is not None else None
    return Parity(
        images=len(images),
        label_agreement=float((ours.argmax(1) == reference.argmax(1)).mean()),
        max_probability_difference=float(np.abs(ours - reference).max()),
        onnx_accuracy=float((ours.argmax(1) == y).mean()) if y is not None else None,
        torch_accuracy=float((reference.argmax(1) == y).mean()) if y is not None else None,
    )


PROBE_IMAGES = 32  # random images a run exported in memory is checked on before it is served


def export_in_memory(loaded: LoadedRun, threads: int | None = None) -> bytes:
    """A run's model exported to ONNX in memory, for serving: the bytes of an ``.onnx`` file
    with the run's metadata, checked first in ONNX Runtime (:func:`check_parity`, ``threads``
    per call) on :data:`PROBE_IMAGES` random images; ``convnet export`` checks every test
    image. Bytes, so that every worker of ``convnet serve`` makes its own session of one export.

    Raises:
        ConvnetError: the exported model differs from PyTorch.
    """
    proto = export_model(loaded.model, loaded.spec, tta=loaded.tta)
    session = new_session(proto.SerializeToString(), threads)
    probe = torch.randint(0, 256, (PROBE_IMAGES, *loaded.spec.shape), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    parity = check_parity(session, loaded, probe)
    if not parity.passed:
        raise ConvnetError(f"{loaded.path}: the model exported for serving differs from PyTorch by "
                           f"{parity.max_probability_difference:.1e} on random images; export it with `convnet "
                           "export` to see the parity figures")
    set_metadata(proto, run_metadata(loaded.run, None))
    return proto.SerializeToString()


def run_metadata(run: runfolder.Run, parity: Parity | None) -> dict[str, str]:
    """The metadata written into the .onnx file (all values strings, JSON where structured)."""
    recorded = recorded_accuracy(run)
    if recorded is None:  # no metrics.json: the fp32 score measured at export
        recorded = parity.torch_accuracy if parity is not None else None
    meta = {
        "convnet.version": __version__,
        "convnet.model": run.model_name,
        "convnet.input": json.dumps(run.spec.to_json()),
        "convnet.tta": json.dumps(run.tta),
        "convnet.test_accuracy": json.dumps(recorded),
        "convnet.data": json.dumps(run.config["data"]),
        "convnet.run": run.path.name,
        "convnet.temperature": json.dumps(run_temperature(run)),  # in the graph already; null: not calibrated
    }
    if parity is not None:
        meta["convnet.parity"] = json.dumps(parity.to_json())
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
