"""A folder of images as a :class:`~convnet.data.dataset.Dataset`: scanned
(:mod:`convnet.data.folderscan`), decoded once into the cache of :mod:`convnet.data.imagecache`,
and divided into a training, a test and (where the folder has one) a validation split.

Every image is converted to one size and channel count
(:func:`~convnet.data.imagefiles.decode_image`) once; data larger than the memory budget stays
in the cache and is read a batch at a time. A folder without a ``test/`` part gives a
stratified share of its training images to the test split, the same one every time (seed 0);
the run records the files of each split.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.core.errors import DataError
from convnet.data import imagecache
from convnet.data.catalog import default_cache_dir
from convnet.data.dataset import Dataset, DiskImages, Images, InputSpec, Split, stratified_split
from convnet.data.folderscan import TEST, TRAIN, VAL, FolderScan, scan_folder, scan_pool

SPLIT_SEED = 0  # the test split of a folder without test/ is the same every time


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def load_folder(folder: str | os.PathLike[str], *, image_size: tuple[int, int] | None = None,
                channels: int | None = None, test_split: float = 0.2, skip_bad_images: bool = False,
                hflip: bool | None = None, memory_budget_mb: float | None = None, cache_dir: str | None = None,
                subset: int | None = None, progress: bool = True,
                files: dict[str, list[str]] | None = None) -> Dataset:
    """A folder of images as a :class:`Dataset`, decoded through the cache.

    Args:
        folder, image_size, channels, test_split, skip_bad_images, hflip,
            memory_budget_mb, cache_dir, subset: as :class:`~convnet.data.options.DataOptions`
            describes them (checked there).
        progress: show bars while decoding.
        files: the files of each split as a run recorded them; otherwise a folder with
            ``train/`` and ``test/`` uses those, and any other is divided (stratified, seed 0).

    Raises:
        DataError: see :func:`~convnet.data.folderscan.scan_folder`; images that cannot be
            decoded (unless ``skip_bad_images``); recorded files that are gone.
    """
    scan = scan_folder(folder)
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    cache, index = _find_cache(scan, image_size, channels, base)
    images, index, notes, decoded = _cached(scan, cache, index, image_size, channels, skip_bad_images, progress)
    if decoded:
        notes.append(f"decoded {index['decoded']['images']:,} images in {index['decoded']['seconds']:.1f} s "
                     f"({index['decoded']['images_per_s']:,.0f} images/s) into {cache}")
    elif index["bad"] and not skip_bad_images:
        raise DataError(imagecache.bad_message(scan.root, [tuple(b) for b in index["bad"]]))
    if scan.ignored:
        shown = ", ".join(scan.ignored[:3]) + (f" and {len(scan.ignored) - 3} more" if len(scan.ignored) > 3 else "")
        notes.append(f"passed over {len(scan.ignored)} file{'s' if len(scan.ignored) > 1 else ''} that "
                     f"{'are' if len(scan.ignored) > 1 else 'is'} not an image in a class folder: {shown}")
    if index["bad"]:
        notes.append(f"left out {len(index['bad'])} image{'s' if len(index['bad']) > 1 else ''} that cannot be "
                     f"decoded (--skip-bad-images): {', '.join(b[0] for b in index['bad'][:3])}")
    in_memory = _in_memory(images, memory_budget_mb)
    if not in_memory:
        notes.append(f"{images.nbytes / 2**20:,.0f} MB of images is over the memory budget: "
                     "training reads them from the cache a batch at a time")
    labels = torch.tensor(index["labels"], dtype=torch.int64)
    train_rows, val_rows, test_rows = _split_rows(scan, index, test_split, files)
    pool_rows = _recorded(scan, index, files, "pool") if files is not None and "pool" in files else None
    if scan.layout == "train-val":
        notes.append(f"test: {test_split:.0%} of train/ held out for the final score (--test-split, stratified): "
                     "the folder has no test/")
    spec = InputSpec(index["channels"], index["height"], index["width"], tuple(index["classes"]),
                     dark_background=False, hflip=True if hflip is None else hflip)

    def split(rows: np.ndarray) -> Split:  # read into memory row by row: never the whole file twice
        part = images.subset(rows)
        return Split(part.load() if in_memory else part, labels[torch.from_numpy(rows)])

    dataset = Dataset(
        "folder", spec, split(train_rows), split(test_rows), str(scan.root),
        origin={"kind": "folder", "layout": scan.layout, "image_size": [index["height"], index["width"]],
                "channels": index["channels"], "test_split": test_split,
                "skip_bad_images": skip_bad_images, "split_seed": SPLIT_SEED, "cache": str(cache)},
        notes=tuple(notes),
        files={side: [index["files"][i] for i in rows] for side, rows in
               (("train", train_rows), ("val", val_rows), ("test", test_rows)) if rows is not None},
        skipped=tuple(b[0] for b in index["bad"]),
        val=split(val_rows) if val_rows is not None else None,
        pool=split(pool_rows).images if pool_rows is not None else None,
    )
    return dataset.first(subset)


def _cached(scan: FolderScan, cache: Path, index: dict[str, Any] | None, image_size: tuple[int, int] | None,
            channels: int | None, skip_bad_images: bool, progress: bool
            ) -> tuple[DiskImages, dict[str, Any], list[str], bool]:
    """The scanned folder's images from ``cache``, decoded into it anew where the cache is
    missing, stale (another manifest) or damaged; with its index, notes for the user, and
    whether it was decoded now.

    Raises:
        DataError: the cache damaged as it was written.
    """
    notes = []
    images = imagecache.load(cache, index) if index is not None and index.get("manifest") == scan.manifest else None
    if images is not None and index is not None:
        return images, index, notes, False
    if index is not None and index.get("manifest") == scan.manifest:
        notes.append(f"the image cache {cache} was damaged: rebuilt")
    if cache.exists():
        shutil.rmtree(cache, ignore_errors=True)
    index = imagecache.build(cache, scan, image_size, channels, skip_bad_images, progress)
    images = imagecache.load(cache, index)
    if images is None:
        raise DataError(f"the image cache {cache} was damaged as it was written; check the disk")
    return images, index, notes, True


def _find_cache(scan: FolderScan, image_size: tuple[int, int] | None, channels: int | None,
                base: Path) -> tuple[Path, dict[str, Any] | None]:
    """The cache folder for these settings and its index (None: none yet). Settings given
    explicitly (a run read again by ``evaluate``, ``report``, ``--resume``) also take the
    cache a run with the default settings made, when it holds images of that size and
    channels, so a folder is decoded once, not once per command."""
    own = imagecache.cache_path(scan.root, image_size, channels, base)
    index = imagecache.read_index(own)
    if index is not None or (image_size is None and channels is None):
        return own, index
    auto = imagecache.cache_path(scan.root, None, None, base)
    found = imagecache.read_index(auto)
    if (found is not None and found.get("manifest") == scan.manifest
            and image_size in (None, (found["height"], found["width"]))
            and channels in (None, found["channels"])):
        return auto, found
    return own, None


def _in_memory(images: DiskImages, memory_budget_mb: float | None) -> bool:
    """The rule: images that fit in the memory budget (by default half the memory available
    now) are read into memory; larger ones stay in the cache file, read a batch at a time."""
    budget = memory_budget_mb * 2**20 if memory_budget_mb is not None else available_memory() / 2
    return images.nbytes <= budget


def _split_rows(scan: FolderScan, index: dict[str, Any], test_split: float, files: dict[str, list[str]] | None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Row numbers of the training, validation (None: the folder has none) and test
    images: as recorded, by the folder's split folders, or with the test images a
    stratified share of the training ones (seed 0); each in a fixed shuffled order."""
    if files is not None:  # a run written before validation splits, or without one, has no "val"
        val = _recorded(scan, index, files, "val") if "val" in files else None
        return _recorded(scan, index, files, "train"), val, _recorded(scan, index, files, "test")
    rng = np.random.default_rng(SPLIT_SEED)
    parts, labels = np.asarray(index["parts"]), np.asarray(index["labels"])
    train = np.flatnonzero(parts == TRAIN)
    if "test" in scan.layout:
        test = np.flatnonzero(parts == TEST)
        if len(test) == 0:
            raise DataError(f"--data {scan.root}: test/ holds no images that could be decoded")
    else:
        kept, held = stratified_split(labels[train], test_split, SPLIT_SEED, "--test-split")
        train, test = train[kept], train[held]
    val = np.flatnonzero(parts == VAL) if "val" in scan.layout else None
    if val is not None and len(val) == 0:
        raise DataError(f"--data {scan.root}: the validation folder holds no images that could be decoded")
    # a fixed shuffled order, so that --subset and unshuffled training see every class
    train, test = train[rng.permutation(len(train))], test[rng.permutation(len(test))]
    return train, (val[rng.permutation(len(val))] if val is not None else None), test


def _recorded(scan: FolderScan, index: dict[str, Any], files: dict[str, list[str]], side: str) -> np.ndarray:
    """The rows of the files a run recorded for ``side``.

    Raises:
        DataError: one of them is gone or cannot be decoded any more.
    """
    where = {f: i for i, f in enumerate(index["files"])}
    gone = [f for f in files[side] if f not in where]
    if gone:
        raise DataError(f"--data {scan.root}: {len(gone)} image{'s' if len(gone) > 1 else ''} of the run's "
                        f"{side} split {'are' if len(gone) > 1 else 'is'} gone or unreadable (first: "
                        f"{gone[0]}); the run can only be scored on its own images")
    return np.array([where[f] for f in files[side]], dtype=np.int64)


def load_pool(folder: str | os.PathLike[str], spec: InputSpec, *, memory_budget_mb: float | None = None,
              cache_dir: str | None = None, progress: bool = True
              ) -> tuple[Images, dict[str, Any], list[str], list[str]]:
    """A folder of unlabelled images (any layout, searched recursively, as ``convnet
    predict DIR`` finds them), decoded once into the cache at ``spec``'s size and channels,
    in memory unless over the memory budget. Images that cannot be decoded are left out.

    Returns:
        The images, what a run records of them (folder, count, the folder's manifest, the
        images' SHA-256), notes for the user, and each image's file (relative to the folder).

    Raises:
        DataError: not a folder, or no image in it.
    """
    scan = scan_pool(folder)
    size, channels = (spec.height, spec.width), spec.channels
    cache = imagecache.cache_path(scan.root, size, channels, Path(cache_dir) if cache_dir else default_cache_dir())
    images, index, notes, decoded = _cached(scan, cache, imagecache.read_index(cache), size, channels, True, progress)
    if decoded:
        notes.append(f"decoded {len(images):,} unlabelled images into {cache}")
    if index["bad"]:
        notes.append(f"left out {len(index['bad'])} unlabelled image{'s' if len(index['bad']) > 1 else ''} that "
                     f"cannot be decoded: {', '.join(b[0] for b in index['bad'][:3])}")
    pool = images.load() if _in_memory(images, memory_budget_mb) else images
    record = {"source": str(scan.root), "images": len(images), "manifest": scan.manifest,
              "sha256": index["images_sha256"]}
    return pool, record, notes, list(index["files"])
