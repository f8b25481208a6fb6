"""A named data set read into tensors: its files found (or downloaded) by
:mod:`convnet.data.catalog`, decoded, checked and split as published."""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from convnet.core.errors import DataError
from convnet.data.arrayfiles import CIFAR_RECORD, parse_cifar, read_idx
from convnet.data.catalog import (
    CIFAR_FOLDER,
    CIFAR_TEST,
    CIFAR_TRAIN,
    NamedDataset,
    cifar_batches,
    default_cache_dir,
    download_dataset,
    idx_file,
    locate,
    named,
)
from convnet.data.dataset import Dataset, InputSpec, Split, source_path
from convnet.data.options import check_subset


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    subset: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Load a named data set as uint8 tensors, fetching it first if need be.

    Args:
        name: one of :data:`DATASETS` (``fashion-mnist``, ``mnist``, ``cifar10``).
        data_dir: a folder holding its files; when given, nothing else is tried.
        subset: keep only the first ``subset`` training images (the test split whole).
        cache_dir: where downloads go; defaults to :func:`default_cache_dir`.
        download: fetch from the mirrors when no local copy is found.

    Raises:
        DataError: unknown name, no copy found, a corrupt file, a failed download.
    """
    ds = named(name)
    check_subset(subset)
    folder = locate(ds, data_dir, cache_dir)
    if folder is None:
        cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / ds.name
        if not download:
            raise DataError(f"{ds.name} not found in {cache} or {', '.join(ds.system_dirs) or 'a system folder'}; "
                            "pass --data-dir, or allow the download")
        download_dataset(ds, cache)
        folder = cache
    train, test = (_read_cifar(folder, ds) if ds.format == "cifar" else _read_idx_set(folder, ds))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{folder}: train images are {tuple(train.images.shape[2:])} but test images "
                        f"{tuple(test.images.shape[2:])}; both splits need the same size")
    spec = ds.spec
    if tuple(train.images.shape[1:]) != spec.shape:  # a folder of IDX files of another size, read as this set
        c, h, w = (int(d) for d in train.images.shape[1:])
        spec = InputSpec(c, h, w, spec.classes, spec.dark_background, spec.hflip)
    dataset = Dataset(ds.name, spec, train, test, source_path(folder), origin={"kind": "named"})
    return dataset.first(subset)


def _read_idx_set(folder: Path, ds: NamedDataset) -> tuple[Split, Split]:
    arrays = {}
    for key, f in ds.files.items():
        path = idx_file(folder, f.name)
        if path is None:
            raise DataError(f"{folder}: missing {f.name} (or its uncompressed form)")
        arrays[key] = read_idx(path)
    return (_split(arrays["train_images"][:, None], arrays["train_labels"], folder, ds, "train"),
            _split(arrays["test_images"][:, None], arrays["test_labels"], folder, ds, "test"))


def _read_cifar(folder: Path, ds: NamedDataset) -> tuple[Split, Split]:
    """CIFAR-10 from its extracted ``.bin`` files, else straight from the archive."""
    raw: dict[str, bytes] = {}
    batches = cifar_batches(folder)
    if batches is not None:
        raw = {n: (batches / n).read_bytes() for n in (*CIFAR_TRAIN, CIFAR_TEST)}
    else:
        archive = folder / ds.files["archive"].name
        wanted = {f"{CIFAR_FOLDER}/{n}": n for n in (*CIFAR_TRAIN, CIFAR_TEST)}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    if member.name in wanted and member.isfile():
                        if member.size > 20_000 * CIFAR_RECORD:  # the real batches hold 10,000 records
                            raise DataError(f"{archive}: {member.name} declares {member.size:,} bytes; "
                                            "the archive is damaged")
                        handle = tar.extractfile(member)
                        assert handle is not None
                        raw[wanted[member.name]] = handle.read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{archive}: damaged archive ({e}); delete it and fetch it again") from None
        missing = sorted(set(wanted.values()) - set(raw))
        if missing:
            raise DataError(f"{archive}: lacks {', '.join(missing)}; is it CIFAR-10's binary version?")
    parts = [parse_cifar(raw[n], f"{folder}/{n}", len(ds.classes)) for n in CIFAR_TRAIN]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = parse_cifar(raw[CIFAR_TEST], f"{folder}/{CIFAR_TEST}", len(ds.classes))
    return (_split(train_images, train_labels, folder, ds, "train"),
            _split(test_images, test_labels, folder, ds, "test"))


def _split(images: np.ndarray, labels: np.ndarray, folder: Path, ds: NamedDataset, which: str) -> Split:
    """Check one split's arrays (images already ``(N, C, H, W)``) and make tensors of them."""
    if images.ndim != 4 or labels.ndim != 1:
        raise DataError(f"{folder}: {which} images must have 3 dimensions (N, H, W) and labels 1, "
                        f"got {images.shape[:1] + images.shape[2:]} and {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {which} images but {labels.shape[0]} labels")
    if images.dtype != np.uint8:
        raise DataError(f"{folder}: {which} images must be unsigned bytes, got {images.dtype}")
    if labels.dtype.kind not in "ui":
        raise DataError(f"{folder}: {which} labels must be integers, got {labels.dtype}")
    if 0 in images.shape:
        shown = images.shape[:1] + images.shape[2:] if images.shape[1] == 1 else images.shape
        raise DataError(f"{folder}: {which} images have shape {shown}; there is nothing to learn from")
    bad = (labels < 0) | (labels >= len(ds.classes))
    if bad.any():
        raise DataError(f"{folder}: {which} label {int(labels[bad][0])} is outside 0..{len(ds.classes) - 1}")
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


# --- download
