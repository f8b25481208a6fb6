"""Which data a command or a run uses, as one entry point for every kind: a named data
set (:mod:`convnet.data.catalog`) or a folder of images (:mod:`convnet.data.folders`).

:class:`DataOptions` holds the data flags, checked before anything is read;
:func:`load_data` reads what they name; :func:`run_data` reads a run's own data again,
split as the run recorded it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from convnet.core import runfolder
from convnet.core.errors import RunError
from convnet.data.catalog import DATASETS
from convnet.data.dataset import Dataset, Split, files_without, pool_without_labelled
from convnet.data.folders import load_folder, load_pool
from convnet.data.named import load_dataset
from convnet.data.options import REST, DataOptions


def load_data(options: DataOptions, *, seed: int = 42, progress: bool = True,
              files: dict[str, list[str]] | None = None, pool: bool = True) -> Dataset:
    """The data ``options`` name: a named data set or a folder of images, with ``subset``
    of its training images (a stratified draw by ``seed``) and its unlabelled pool.

    Args:
        options: what to load (validated here).
        seed: chooses the ``subset`` drawn.
        progress: show a bar while a folder's images are decoded.
        files: for a folder, the files of each split (``{"train": [...], "test": [...]}``)
            as a run recorded them, instead of dividing the folder anew (and drawing no subset).
        pool: read the unlabelled pool (``unlabeled``); False: leave it out (scoring needs none).
    """
    options.validate()
    if options.folder is not None:
        dataset = load_folder(options.folder, image_size=options.image_size, channels=options.channels,
                              test_split=options.test_split, skip_bad_images=options.skip_bad_images,
                              hflip=options.hflip, memory_budget_mb=options.memory_budget_mb,
                              cache_dir=options.cache_dir, progress=progress, files=files)
    else:
        dataset = load_dataset(options.name, options.data_dir, cache_dir=options.cache_dir)
    if options.hflip is not None and options.hflip != dataset.spec.hflip:
        dataset = replace(dataset, spec=replace(dataset.spec, hflip=options.hflip))
    if files is None:
        dataset = dataset.draw(options.subset, seed, rest_as_pool=pool and options.unlabeled == REST)
    if not pool:
        return replace(dataset, pool=None, files=files_without(dataset.files, "pool"))
    if options.unlabeled not in (None, REST):
        images, record, notes, _ = load_pool(options.unlabeled, dataset.spec,
                                             memory_budget_mb=options.memory_budget_mb, cache_dir=options.cache_dir,
                                             progress=progress)
        dataset = pool_without_labelled(replace(dataset, pool=images, pool_record=record,
                                                notes=(*dataset.notes, *notes)))
    return dataset


def run_data(run: runfolder.Run, data_dir: str | os.PathLike[str] | None = None, *, progress: bool = True,
             split: dict[str, Any] | None = None, pool: bool = False) -> Dataset:
    """The data set a run was trained on, split as it was: for a folder of images the
    recorded files of each split (``split``, else the run's ``split.json``); for a named
    set the same subset, from ``data_dir`` if given, else from the folder it was read from
    if that still exists, else found as usual; its validation images held out again as the
    run held them out (the same stratified draw); for images given in Python the held-out
    images :meth:`ConvNetClassifier.save <convnet.estimator.ConvNetClassifier.save>` kept
    (no training images are kept: the training split is empty, and its accuracy not measured).

    Raises:
        RunError: the data found is not the run's (other counts, sizes or classes).
    """
    data = run.config["data"]
    recorded = data.get("pool") or {}  # the unlabelled images it learnt from, if any
    spec = run.spec
    if data.get("kind") == "folder":
        if split is None and (run.path / runfolder.SPLIT).is_file():
            split = runfolder.read_json(run.path / runfolder.SPLIT)
        if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "test")):
            raise RunError(f"{run.path / runfolder.SPLIT}: missing or damaged; it lists the files of each split")
        options = DataOptions(folder=str(data_dir or data["source"]),
                              image_size=(spec.height, spec.width), channels=spec.channels,
                              test_split=float(data.get("test_split", 0.2)),
                              skip_bad_images=bool(data.get("skip_bad_images", False)), hflip=spec.hflip)
        dataset = load_data(options, progress=progress, files=split, pool=pool)
        if data.get("subset") and "subset_seed" not in data:  # a run written when --subset took the first N
            dataset = dataset.first(data["subset"])
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
        dataset = load_dataset(data["name"], data_dir)
        if "subset_seed" in data:  # the same stratified draw; the others the pool, where they were
            dataset = dataset.draw(data.get("subset"), int(data["subset_seed"]),
                                   rest_as_pool=pool and recorded.get("source") == REST)
        else:  # a run written when --subset took the first N
            dataset = dataset.first(data.get("subset"))
    if pool and recorded.get("source") not in (None, REST):
        dataset = _same_pool(run, dataset, recorded, progress)
    if data.get("val_held_out") and dataset.val is None and len(dataset.train):  # held out as the run held it
        dataset = dataset.held_out(float(data["val_split"]), int(data["val_seed"]))[0]
    if data.get("train_images") not in (None, len(dataset.train)):
        raise RunError(f"{run.path} was trained on {data['train_images']} {data['name']} images from "
                       f"{data.get('source')}, but {dataset.source} holds {len(dataset.train)}; "
                       "pass --data-dir with the run's own data")
    if dataset.spec.shape != spec.shape or dataset.classes != spec.classes:
        raise RunError(f"{run.path} was trained on {spec.shape} images of {len(spec.classes)} classes, but "
                       f"{dataset.source} holds {dataset.spec.shape} images of {dataset.num_classes}; "
                       "give the run's own data")
    return replace(dataset, spec=spec)


def _kept_test_data(run: runfolder.Run, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """The held-out images and labels a saved estimator keeps (``runfolder.TEST_DATA``, named by
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
    tensors = runfolder.load_tensors(path)
    images, labels, spec = tensors.get("images"), tensors.get("labels"), run.spec
    if (images is None or labels is None or images.dtype != torch.uint8 or tuple(images.shape[1:]) != spec.shape
            or labels.dtype != torch.int64 or tuple(labels.shape) != (len(images),) or len(labels) == 0
            or int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise RunError(f"{path}: not uint8 images {spec.shape} with their class indices (0 to "
                       f"{spec.num_classes - 1}); the run folder is damaged")
    held_out = Split(images, labels)
    none = Split(images[:0], labels[:0])
    return Dataset(str(run.config["data"]["name"]), spec, none, held_out, source=str(path.resolve()))


def _same_pool(run: runfolder.Run, dataset: Dataset, recorded: dict[str, Any], progress: bool) -> Dataset:
    """The run's folder of unlabelled images, read again: the same images, or refused.

    Raises:
        RunError: the folder is gone, or holds other images than when the run started.
    """
    folder = Path(recorded["source"])
    if not folder.is_dir():
        raise RunError(f"{run.path} learnt from the unlabelled images in {folder}, which is gone; resume needs them")
    images, found, _, _ = load_pool(folder, dataset.spec, progress=progress)
    if (found["images"], found["sha256"]) != (recorded.get("images"), recorded.get("sha256")):
        raise RunError(f"{run.path} learnt from {recorded.get('images'):,} unlabelled images in {folder}, which now "
                       f"holds {found['images']:,} other ones; resume needs the same pool (or start a new run)")
    return pool_without_labelled(replace(dataset, pool=images, pool_record=found))
