"""The run folder: everything one training run leaves behind, written atomically.

::

    runs/NAME/
      config.json          resolved training config, data set, engine, library versions
      history.json         one record per epoch: loss, accuracy, seconds, images/s
      model.safetensors    final weights (tensors only: loading them runs no code)
      checkpoint.safetensors  weights, optimizer state, random states and epoch, for --resume
      metrics.json         written by `convnet evaluate`
      split.json           for a folder of images: the files of the training and the test split
      test_data.safetensors  for images given in Python: the held-out images and labels ConvNetClassifier.save kept
      skipped_images.txt   images left out with --skip-bad-images, one per line
      calibration.json     the temperature fitted after training (--calibrate)
      tracking.json        with --log: the trackers, the TensorBoard folder, the MLflow run (convnet.training.tracking)
      tensorboard/         with --log tensorboard: TensorBoard's event files
      plots/               the pictures of the scores (convnet evaluate, convnet inspect)
      inspect.json         what `convnet inspect` found; inspect/ what it keeps (out-of-fold probabilities)
      model.onnx           `convnet export`'s file (and model.parity.json, its parity figures)

This is the one module that spells these names, and the one that writes the run's record
of itself (:func:`write_config`, :func:`write_history`, :func:`write_weights`, ...). Every
file is written through :func:`convnet.core.durable.atomic_write`, so a crash at any moment
leaves the previous version whole.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from convnet.core.durable import atomic_write, write_json
from convnet.core.errors import RunError
from convnet.core.inputspec import InputSpec
from convnet.core.version import __version__

CONFIG, HISTORY, WEIGHTS, CHECKPOINT, METRICS, SPLIT, SKIPPED = (
    "config.json", "history.json", "model.safetensors", "checkpoint.safetensors", "metrics.json", "split.json",
    "skipped_images.txt")
TEST_DATA = "test_data.safetensors"
CALIBRATION = "calibration.json"  # the temperature fitted after training (--calibrate)
TRACKING = "tracking.json"  # with --log: the trackers, the TensorBoard folder, the MLflow run
TENSORBOARD = "tensorboard"  # with --log tensorboard: the subfolder of event files
PLOTS = "plots"  # the subfolder of pictures
INSPECTION = "inspect.json"  # what `convnet inspect RUN` found: shown by `convnet report`
INSPECT_DIR = "inspect"  # what inspection keeps (out-of-fold probabilities)
ONNX = "model.onnx"  # the run's export: `convnet export`'s file by default, and what the CPU predicts with
ONNX_PARITY = "model.parity.json"  # `convnet export`'s parity figures for it


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e}); the run folder is damaged") from None


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(blob))


def tensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (strings), read without its tensors.

    Raises:
        RunError: not a safetensors file.
    """
    try:
        with safe_open(path, "pt") as f:  # type: ignore[no-untyped-call]
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path}: not a valid safetensors file ({e}); "
                       "convnet loads weights only as safetensors") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle above all) is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path}: not a valid safetensors file ({e}); "
                       "convnet loads weights only as safetensors") from None


def library_versions() -> dict[str, str]:
    import sklearn  # imported here: scikit-learn takes most of a second to import

    return {
        "convnet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def check_out(out: str | os.PathLike[str] | None) -> None:
    """Refuse an ``--out`` that exists and is not an empty folder, before anything is done.

    Raises:
        RunError: saying to choose a new folder or resume that one.
    """
    if out is None:
        return
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunError(f"--out {path} already exists and is not empty; choose a new folder or use --resume {path}")


def new_run_dir(out: str | os.PathLike[str] | None, name: str, root: str | os.PathLike[str] = "runs") -> Path:
    """``out`` if given (created; must be empty or absent), else ``root/NAME-YYYYmmdd-HHMMSS``."""
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = Path(root) / f"{name}-{stamp}-{n}"
    else:
        check_out(out)
        path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out {path}: cannot create the run folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise RunError(f"--out {path}: folder is not writable")
    return path


@dataclass(frozen=True)
class Run:
    """A finished (or resumable) run folder, read back."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def model_name(self) -> str:
        return str(self.config["train"]["model"])

    @property
    def spec(self) -> InputSpec:
        """The input spec the model was trained for (runs older than the spec: derived
        from their data section)."""
        if "input" in self.config:
            return InputSpec.from_json(self.config["input"], str(self.path / CONFIG))
        c, h, w = self.config["data"]["image_shape"]
        name = self.config["data"]["name"]
        return InputSpec(int(c), int(h), int(w), tuple(self.config["data"]["classes"]),
                         dark_background=name in ("fashion-mnist", "mnist"), hflip=name != "mnist")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def faithful(self) -> bool:
        """Trained with the tutorial's arithmetic: scored with it too."""
        return bool(self.config["train"].get("faithful", False))

    @property
    def tta(self) -> bool:
        """Evaluated with test-time flips: predicted with them too."""
        return bool(self.config["train"].get("tta", False))


def open_run(path: str | os.PathLike[str]) -> Run:
    """Read a run folder's config and history.

    Raises:
        RunError: not a folder, or its config is missing or damaged.
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".onnx":
        raise RunError(f"{p} is an .onnx file; this needs the run folder it was exported from (its model in "
                       "PyTorch)")
    if not p.is_dir():
        raise RunError(f"{p}: no such run folder")
    if not (p / CONFIG).is_file():
        raise RunError(f"{p}: not a run folder (no {CONFIG}); give the folder `convnet train` wrote")
    config = read_json(p / CONFIG)
    for key in ("train", "data"):
        if not isinstance(config, dict) or not isinstance(config.get(key), dict):
            raise RunError(f"{p / CONFIG}: no {key!r} section; the run folder is damaged")
    for section, key, ok in _REQUIRED:
        if not ok(config[section].get(key)):
            raise RunError(f"{p / CONFIG}: missing or malformed {section}.{key} "
                           f"({config[section].get(key)!r}); the run folder is damaged")
    if "input" in config:
        InputSpec.from_json(config["input"], str(p / CONFIG))
    history = read_json(p / HISTORY) if (p / HISTORY).is_file() else []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise RunError(f"{p / HISTORY}: not a list of epoch records; the run folder is damaged")
    return Run(p, config, history)


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(type(d) is int and d > 0 for d in v)


# What the rest of convnet reads from a config.json without looking further: checked once, here.
_REQUIRED: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("train", "model", lambda v: isinstance(v, str)),
    ("data", "name", lambda v: isinstance(v, str)),
    ("data", "classes", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v)),
    ("data", "image_shape", _is_shape),
    ("data", "subset", lambda v: v is None or (type(v) is int and v > 0)),
)


def command_line() -> str:
    import shlex

    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


# --- the run's record of itself, written


def write_config(run_dir: Path, train: Mapping[str, Any], spec: InputSpec, engine: Mapping[str, Any],
                 parameters: int, data: Mapping[str, Any], init: Mapping[str, Any] | None = None,
                 estimator: Mapping[str, Any] | None = None) -> None:
    """Write ``config.json``: the resolved training settings, the input spec, the data it
    was trained on, the engine, the parameter count, the library versions and the command
    line; for a run that started from trained weights, where they came from (``init``);
    for a saved estimator, its parameters and labels (``estimator``)."""
    write_json(run_dir / CONFIG, {**({"init": dict(init)} if init is not None else {}),
        "train": dict(train),
        "input": spec.to_json(),
        "data": {**data, "classes": list(spec.classes), "image_shape": list(spec.shape)},
        "engine": dict(engine),
        "parameters": parameters,
        "versions": library_versions(),
        "command": command_line(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"estimator": json.loads(json.dumps(estimator, default=repr))} if estimator is not None else {}),
    })


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """``history.json``: one record per epoch."""
    write_json(run_dir / HISTORY, history)


def write_weights(run_dir: Path, model: torch.nn.Module, model_name: str) -> None:
    """``model.safetensors``: the weights the run is used with, its model's name in the metadata."""
    save_tensors(run_dir / WEIGHTS, model.state_dict(), {"model": model_name})


def write_calibration(run_dir: Path, record: Mapping[str, Any]) -> None:
    """``calibration.json``: the temperature every way of predicting divides the logits by."""
    write_json(run_dir / CALIBRATION, dict(record))


def write_metrics(run_dir: Path, scores: Mapping[str, Any]) -> None:
    """``metrics.json``: the scores of both splits."""
    write_json(run_dir / METRICS, dict(scores))


def write_data_files(run_dir: Path, files: Mapping[str, list[str]] | None, skipped: list[str] | None) -> None:
    """For a folder of images: the files of each split (``split.json``) and the images
    left out (``skipped_images.txt``)."""
    if files is not None:
        write_json(run_dir / SPLIT, dict(files))
    if skipped:
        text = "".join(f"{name}\n" for name in skipped).encode()
        atomic_write(run_dir / SKIPPED, lambda f: f.write(text))


def write_test_data(run_dir: Path, images: torch.Tensor, labels: torch.Tensor) -> str:
    """``test_data.safetensors``: held-out images and labels a saved estimator keeps for
    ``convnet evaluate``; returns the name ``config.json``'s data record gives it."""
    save_tensors(run_dir / TEST_DATA, {"images": images, "labels": labels})
    return TEST_DATA


def plots_dir(run_dir: Path) -> Path:
    """The folder of a run's pictures."""
    return Path(run_dir) / PLOTS


def plot_path(run_dir: Path, name: str) -> Path:
    """Where the picture ``name`` (``confusion_matrix``, ``reliability``, ...) is kept: ``plots/NAME.png``."""
    return plots_dir(run_dir) / f"{name}.png"


def write_plot(run_dir: Path, name: str, png: bytes) -> Path:
    """Keep a picture (PNG bytes) as ``plots/NAME.png``; returns its path."""
    path = plot_path(run_dir, name)
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda f: f.write(png))
    return path


def write_inspection(run_dir: Path, record: Mapping[str, Any]) -> None:
    """``inspect.json``: what ``convnet inspect`` found, for ``convnet report``."""
    text = json.dumps(dict(record), indent=1).encode()
    atomic_write(Path(run_dir) / INSPECTION, lambda f: f.write(text))


def write_kept(run_dir: Path, kept: Mapping[str, Any]) -> None:
    """Add to ``config.json`` which epoch's weights ``model.safetensors`` holds (``kept``:
    its epoch, and on validation its accuracy and loss)."""
    config = read_json(Path(run_dir) / CONFIG)
    write_json(Path(run_dir) / CONFIG, {**config, "kept": dict(kept)})
