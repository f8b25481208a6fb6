"""Which data a command or a run uses, as one entry point for every kind: a named data
set (:mod:`convnet.catalog`) or a folder of images (:mod:`convnet.folders`).

:class:`DataOptions` holds the data flags, checked before anything is read;
:func:`load_data` reads what they name; :func:`run_data` reads a run's own data again,
split as the run recorded it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from convnet import runs
from convnet.catalog import DATASETS, load_dataset, named
from convnet.datatypes import Dataset, Split, check_subset
from convnet.errors import DataError, RunError
from convnet.folders import load_folder


@dataclass(frozen=True)
class DataOptions:
    """Which data to train on, and how to read it.

    Attributes:
        dataset: a named data set (``convnet datasets``), used when ``folder`` is None.
        data_dir: a folder holding the named data set's files.
        folder: a folder of images, one subfolder per class (or ``train/`` and ``test/``).
        subset: only the first N training images.
        image_size: ``(H, W)`` images are converted to (folders; default: the most common size, capped at 64).
        channels: 1 or 3 (folders; default: 3 when any image has colour).
        test_split: share of a folder's images held out for testing when it has no ``test/``.
        skip_bad_images: leave out images that cannot be decoded, instead of stopping.
        hflip: whether a mirrored image keeps its class; None = the data set's own answer.
        memory_budget_mb: a folder data set larger than this is read from its cache file a
            batch at a time; None = half the memory available.
        cache_dir: where downloads and decoded folders are kept.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    folder: str | None = None
    subset: int | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    test_split: float = 0.2
    skip_bad_images: bool = False
    hflip: bool | None = None
    memory_budget_mb: float | None = None
    cache_dir: str | None = None

    def validate(self) -> None:
        """Check every value before anything is read or written."""
        if self.folder is not None:
            if self.data_dir is not None:
                raise DataError("--data (a folder of images) and --data-dir (a named data set's files) "
                                "cannot be combined; give one")
            if not Path(self.folder).is_dir():
                raise DataError(f"--data {self.folder}: no such folder")
        else:
            named(self.dataset)
            for flag, value in (("--image-size", self.image_size), ("--channels", self.channels)):
                if value is not None:
                    raise DataError(f"{flag} applies to folders of images (--data DIR); {self.dataset} images are "
                                    f"{named(self.dataset).channels}x{named(self.dataset).height}x"
                                    f"{named(self.dataset).width}")
        check_subset(self.subset)
        if self.channels not in (None, 1, 3):
            raise DataError(f"--channels must be 1 or 3, got {self.channels}")
        if self.image_size is not None and not (8 <= min(self.image_size) and max(self.image_size) <= 1024):
            raise DataError(f"--image-size must be between 8 and 1024 pixels, got {self.image_size}")
        if not 0 < self.test_split < 1:
            raise DataError(f"--test-split must be a fraction between 0 and 1, got {self.test_split}")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            raise DataError(f"--memory-budget must be >= 0 MB, got {self.memory_budget_mb}")


def load_data(options: DataOptions, *, progress: bool = True, files: dict[str, list[str]] | None = None) -> Dataset:
    """The data ``options`` name: a named data set or a folder of images.

    Args:
        options: what to load (validated here).
        progress: show a bar while a folder's images are decoded.
        files: for a folder, the files of each split (``{"train": [...], "test": [...]}``)
            as a run recorded them, instead of dividing the folder anew.
    """
    options.validate()
    if options.folder is not None:
        dataset = load_folder(options.folder, image_size=options.image_size, channels=options.channels,
                              test_split=options.test_split, skip_bad_images=options.skip_bad_images,
                              hflip=options.hflip, memory_budget_mb=options.memory_budget_mb,
                              cache_dir=options.cache_dir, subset=options.subset, progress=progress, files=files)
    else:
        dataset = load_dataset(options.dataset, options.data_dir, subset=options.subset, cache_dir=options.cache_dir)
    if options.hflip is not None and options.hflip != dataset.spec.hflip:
        dataset = replace(dataset, spec=replace(dataset.spec, hflip=options.hflip))
    return dataset


def run_data(run: runs.Run, data_dir: str | os.PathLike[str] | None = None, *, progress: bool = True,
             split: dict[str, Any] | None = None) -> Dataset:
    """The data set a run was trained on, split as it was: for a folder of images the
    recorded files of each split (``split``, else the run's ``split.json``); for a named
    set the same subset, from ``data_dir`` if given, else from the folder it was read from
    if that still exists, else found as usual; for images given in Python the held-out
    images :meth:`ConvNetClassifier.save <convnet.estimator.ConvNetClassifier.save>` kept
    (no training images are kept: the training split is empty, and its accuracy not measured).

    Raises:
        RunError: the data found is not the run's (other counts, sizes or classes).
    """
    data = run.config["data"]
    spec = run.spec
    if data.get("kind") == "folder":
        if split is None and (run.path / runs.SPLIT).is_file():
            split = runs.read_json(run.path / runs.SPLIT)
        if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "test")):
            raise RunError(f"{run.path / runs.SPLIT}: missing or damaged; it lists the files of each split")
        options = DataOptions(folder=str(data_dir or data["source"]), subset=data.get("subset"),
                              image_size=(spec.height, spec.width), channels=spec.channels,
                              test_split=float(data.get("test_split", 0.2)),
                              skip_bad_images=bool(data.get("skip_bad_images", False)), hflip=spec.hflip)
        dataset = load_data(options, progress=progress, files=split)
    elif data.get("test_data") is not None:
        return _kept_test_data(run, data_dir)
    elif data.get("name") not in DATASETS:
        raise RunError(f"{run.path} keeps no images to score on (it was trained on images given in Python, "
                       f"{data.get('name')!r}); pass X_test, y_test to save(): clf.save(DIR, X_test, y_test) keeps "
                       "held-out images for `convnet evaluate`, `report` and `export` (`predict` and `serve` work "
                       "without them)")
    else:
        if data_dir is None and data.get("source") and Path(data["source"]).is_dir():
            data_dir = data["source"]
        dataset = load_dataset(data["name"], data_dir, subset=data.get("subset"))
    if data.get("train_images") not in (None, len(dataset.train)):
        raise RunError(f"{run.path} was trained on {data['train_images']} {data['name']} images from "
                       f"{data.get('source')}, but {dataset.source} holds {len(dataset.train)}; "
                       "pass --data-dir with the run's own data")
    if dataset.spec.shape != spec.shape or dataset.classes != spec.classes:
        raise RunError(f"{run.path} was trained on {spec.shape} images of {len(spec.classes)} classes, but "
                       f"{dataset.source} holds {dataset.spec.shape} images of {dataset.num_classes}; "
                       "give the run's own data")
    return replace(dataset, spec=spec)


def _kept_test_data(run: runs.Run, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """The held-out images and labels a saved estimator keeps (``runs.TEST_DATA``, named by
    the run's ``data.test_data``), read from ``data_dir`` if given, else from the run folder
    (or the folder of an .onnx file exported from it). No training images are kept: the
    training split is empty, so evaluation reports its accuracy as not measured.

    Raises:
        RunError: the file is missing, or not images in the run's input spec with class indices.
    """
    name = run.config["data"]["test_data"]
    if not isinstance(name, str) or Path(name).name != name:  # a file beside config.json, nowhere else
        raise RunError(f"{run.path}: malformed data.test_data ({name!r}) in its config; the run folder is damaged")
    path = Path(data_dir or (run.path if run.path.is_dir() else run.path.parent)) / name
    tensors = runs.load_tensors(path)
    images, labels, spec = tensors.get("images"), tensors.get("labels"), run.spec
    if (images is None or labels is None or images.dtype != torch.uint8 or tuple(images.shape[1:]) != spec.shape
            or labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),) or len(labels) == 0
            or int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise RunError(f"{path}: not uint8 images {spec.shape} with their class indices (0 to "
                       f"{spec.num_classes - 1}); the run folder is damaged")
    held_out = Split(images, labels)
    none = Split(images[:0], labels[:0])
    return Dataset(str(run.config["data"]["name"]), spec, none, held_out, source=str(path.resolve()))
