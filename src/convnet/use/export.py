"""ONNX export of a run (``convnet export``), checked in ONNX Runtime before it is written.

The graph and its metadata are :mod:`convnet.use.onnxgraph`'s. Before the file is written,
ONNX Runtime predicts every test image of the run's data, next to what ``convnet predict
RUN --device cpu`` answers for them with PyTorch (the run's own engine, in fp32 like every
prediction: see :func:`convnet.models.engine.exact_arithmetic`): the labels must agree on
at least :data:`MIN_LABEL_AGREEMENT` of them and no probability may differ by more than
:data:`MAX_PROBABILITY_DIFFERENCE`. The figures are printed and written beside the file
(``NAME.parity.json``); a model that fails is not written. Written to ``RUN/model.onnx``
(the default), the file is also the run's kept export, which its predictions on the CPU use
(:mod:`convnet.use.loadrun`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from convnet.core import runfolder
from convnet.core.durable import atomic_write, check_output_file, write_json
from convnet.core.errors import ConvnetError, RunError
from convnet.data.dataset import Images
from convnet.training.tracking import log_file
from convnet.use.loadrun import LoadedRun, keep_export, load_run, run_temperature
from convnet.use.onnxfile import metadata_json, new_session
from convnet.use.onnxgraph import INPUT_NAME, OPSET, export_model, recorded_accuracy, run_metadata, set_metadata

MIN_LABEL_AGREEMENT = 0.999
MAX_PROBABILITY_DIFFERENCE = 1e-4
PARITY_BATCH = 256  # images per ONNX Runtime call during the check


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
    set_metadata(proto, run_metadata(run, run_temperature(run), parity.to_json()))
    blob = proto.SerializeToString()

    def write(f: IO[bytes]) -> None:
        f.write(blob)

    atomic_write(path, write)
    figures = parity_path(path)
    write_json(figures, {"onnx": path.name, "run": str(run.path), "opset": OPSET, **parity.to_json()})
    return ExportResult(path, figures, parity, OPSET, log_file(run.path, path))  # a tracked run keeps its export


def check_parity(session: Any, loaded: LoadedRun, images: Images, labels: torch.Tensor | None = None) -> Parity:
    """The one parity check: the exported model in ONNX Runtime (``session``) against what
    the run itself predicts in PyTorch (:meth:`LoadedRun.torch_probabilities`), on uint8
    ``images`` (with their ``labels``, the accuracy of both too)."""
    reference = loaded.torch_probabilities(images)  # (N, K)
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
    """A run's model as the bytes of an ``.onnx`` file with the run's metadata, for serving:
    its kept export (``RUN/model.onnx``) where it was made from these weights, else exported
    in memory and checked first in ONNX Runtime (:func:`check_parity`, ``threads`` per call)
    on :data:`PROBE_IMAGES` random images; ``convnet export`` checks every test image.
    Bytes, so that every worker of ``convnet serve`` makes its own session of one export.

    Raises:
        ConvnetError: the exported model differs from PyTorch.
    """
    kept = loaded.onnx.kept() if loaded.onnx is not None else None
    if kept is not None:  # the run's own export, made from these weights: its metadata brought up to date
        import onnx

        proto = onnx.load_model_from_string(kept.path.read_bytes())
        parity = metadata_json(kept.path, kept.metadata, "convnet.parity")
        set_metadata(proto, run_metadata(loaded.run, run_temperature(loaded.run), parity))
        return proto.SerializeToString()
    proto = export_model(loaded.model, loaded.spec, tta=loaded.tta)
    session = new_session(proto.SerializeToString(), threads)
    probe = torch.randint(0, 256, (PROBE_IMAGES, *loaded.spec.shape), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    parity = check_parity(session, loaded, probe)
    if not parity.passed:
        raise ConvnetError(f"{loaded.path}: the model exported for serving differs from PyTorch by "
                           f"{parity.max_probability_difference:.1e} on random images; export it with `convnet "
                           "export` to see the parity figures")
    set_metadata(proto, run_metadata(loaded.run, run_temperature(loaded.run), None))
    blob = proto.SerializeToString()
    if loaded.onnx is not None:  # a run that predicts on the CPU: kept, so that its predictions use it too
        keep_export(loaded.run, blob)
    return blob


