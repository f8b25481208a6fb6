"""Scoring a saved model on its own data: what ``convnet evaluate`` computes for a run
folder (written to its ``metrics.json``) or for an ``.onnx`` file, and what ``convnet
train`` computes at the end of a run; or on a labelled folder of new images.

The model is opened by :mod:`convnet.use.loadrun` and scored by
:func:`~convnet.trust.evaluation.score_splits`, the same scorer for both kinds; the pictures
drawn from the scores are :mod:`convnet.trust.report`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from convnet.core import runfolder
from convnet.core.errors import DataError, InputError
from convnet.core.progress import Bar
from convnet.data.dataset import Dataset, Images, Split
from convnet.data.folderscan import TEST, TRAIN, scan_folder
from convnet.data.inputfiles import input_batches
from convnet.models.engine import Engine
from convnet.trust.evaluation import Evaluation, score_splits
from convnet.use.loadrun import LoadedRun, Model, load_run, open_model

PathLike = str | os.PathLike[str]


def evaluate_run(run_dir: PathLike, *, data_dir: PathLike | None = None, engine: Engine | None = None,
                 dataset: Dataset | None = None, device: str = "auto", test_logits: torch.Tensor | None = None,
                 progress: bool = True, score_train: bool = True) -> Evaluation:
    """Evaluate a run folder's model on the data it was trained on (same subset, same
    split), with the run's own engine (faithful runs in fp32) and test-time augmentation,
    and write the scores to its ``metrics.json``.

    Args:
        dataset: the run's data when it is already in memory (not read again).
        test_logits: the test split's logits when already known (see :func:`evaluate`).
        score_train: score the training split too (False: its accuracy is not measured).
    """
    loaded = load_run(run_dir, device=device, engine=engine)
    return score_run(loaded, dataset or loaded.dataset(data_dir, progress=progress), test_logits=test_logits,
                     score_train=score_train)


def score_run(loaded: LoadedRun, dataset: Dataset, *, test_logits: torch.Tensor | None = None,
              score_train: bool = True) -> Evaluation:
    """Score an opened run on ``dataset`` (its own data) and write its ``metrics.json``.

    A run scored before every prediction was fp32 (its ``metrics.json`` does not say
    ``"inference": "fp32"``) may have recorded a test accuracy computed in bfloat16; when
    the new one differs, :attr:`Evaluation.note` says so in one line."""
    before = _recorded_before(loaded.path / runfolder.METRICS)
    # logits already known (a --target-accuracy run's last check) are PyTorch's: reused unless the run
    # predicts the test split in ONNX Runtime, so that the score is the one `convnet evaluate` gives
    onnx = loaded.onnx is not None and loaded.onnx.session(dataset.test.images) is not None
    known = test_logits.softmax(dim=1) if test_logits is not None and not onnx else None
    result = score_splits(probabilities_of(loaded), dataset, test_probabilities=known, score_train=score_train)
    now = result.test.accuracy
    if before is not None and now is not None and round(before, 6) != round(now, 6):
        result.note = (f"the test accuracy recorded before, {before:.4f}, was predicted in the precision the run "
                       f"trained in; every prediction is fp32 now, which gives {now:.4f} (metrics.json updated)")
    runfolder.write_metrics(loaded.path, result.to_json())
    return result


def _recorded_before(path: Path) -> float | None:
    """The test accuracy in a ``metrics.json`` written before predictions were always
    fp32; None for a newer one, a missing one, or one that cannot be read (it is rewritten)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or "inference" in metrics or not isinstance(metrics.get("test"), dict):
        return None
    value = metrics["test"].get("accuracy")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def score_model(model: Model, dataset: Dataset) -> Evaluation:
    """Score a run folder (its ``metrics.json`` written) or an ``.onnx`` file on ``dataset``."""
    if isinstance(model, LoadedRun):
        return score_run(model, dataset)
    return score_splits(probabilities_of(model), dataset)


def folder_data(model: Model, folder: PathLike, *, progress: bool = True) -> Dataset:
    """A labelled folder as a test split in ``model``'s input spec: its class folders (or
    the ``test/`` split of a split layout), each image read as ``convnet predict`` reads it,
    each class matched to the model's by name.

    Raises:
        DataError: not a labelled folder, a split layout without ``test/``, a class the
            model does not know, an image that cannot be read.
    """
    scan = scan_folder(folder)
    if scan.layout != "classes" and "test" not in scan.layout:
        raise DataError(f"--data {scan.root}: a {scan.layout} layout without test/; give a folder of class folders, "
                        "or one whose test/ split holds the labelled images")
    spec = model.spec
    unknown = sorted(set(scan.classes) - set(spec.classes))
    if unknown:
        raise DataError(f"--data {scan.root}: class {unknown[0]!r} is not one the model knows; its classes are "
                        f"{', '.join(spec.classes)}")
    part = TRAIN if scan.layout == "classes" else TEST
    rows = [i for i, p in enumerate(scan.parts) if p == part]
    files = [scan.root / scan.files[i] for i in rows]
    labels = torch.tensor([spec.classes.index(scan.classes[scan.labels[i]]) for i in rows], dtype=torch.int64)
    images = []
    bar = Bar(len(files), "reading", enabled=progress)
    for item in input_batches(files, spec):
        if isinstance(item, InputError):
            raise DataError(f"--data {scan.root}: {item}")
        images.append(item.images)
        bar.update(len(item.images))
    bar.close()
    none = torch.zeros((0, *spec.shape), dtype=torch.uint8)
    return Dataset("folder", spec, Split(none, labels[:0]), Split(torch.cat(images), labels), str(scan.root))


def evaluate_model(path: PathLike, *, data_dir: PathLike | None = None, data: PathLike | None = None,
                   device: str = "auto", progress: bool = True) -> tuple[Evaluation, Model, Dataset]:
    """What ``convnet evaluate PATH`` scores: a run folder (in PyTorch, as it was
    evaluated; its ``metrics.json`` written) or an ``.onnx`` file (in ONNX Runtime), on
    the data of the run, found again (in ``data_dir`` where it moved), or on the labelled
    folder ``data`` (:func:`folder_data`; the run's ``metrics.json`` left as it is). The
    model is opened (and checked) before the data is read.

    Returns:
        The scores, the opened model and the data they were computed on.
    """
    if data is not None and data_dir is not None:
        raise DataError("--data (a labelled folder to score on) and --data-dir (where the run's own data is now) "
                        "cannot be combined; give one")
    model = open_model(path, device=device)
    if data is not None:
        dataset = folder_data(model, data, progress=progress)
        return score_splits(probabilities_of(model), dataset, score_train=False), model, dataset
    dataset = model.dataset(data_dir, progress=progress)
    return score_model(model, dataset), model, dataset


def probabilities_of(model: Model) -> Callable[[Images], torch.Tensor]:
    """The model's class probabilities, as the scorer takes them."""
    def probabilities(images: Images) -> torch.Tensor:
        return torch.from_numpy(model.probabilities(images))

    return probabilities
