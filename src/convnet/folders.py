"""Folders of images: one subfolder per class, decoded once into a cache.

::

    DIR/cat/001.jpg, DIR/cat/002.png, DIR/dog/…        a class per subfolder (names sorted)
    DIR/train/cat/…, DIR/train/dog/…, DIR/test/cat/…   or a training and a test part

Image files are recognised by their extension (:data:`~convnet.formats.IMAGE_SUFFIXES`);
hidden files (``.DS_Store``) are passed over silently, other files (``notes.txt``) are
passed over and named. Every image is converted to one size and channel count
(:func:`~convnet.formats.decode_image`) once, into the cache of :mod:`convnet.imagecache`;
data larger than the memory budget stays there and is read a batch at a time.

A folder without a ``test/`` part is divided with a stratified split, the same one every
time (seed 0); the run records the files of each side.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet import imagecache
from convnet.data import DataOptions
from convnet.datasets import Dataset, DiskImages, InputSpec, Split, stratified_split
from convnet.errors import DataError
from convnet.formats import IMAGE_SUFFIXES
from convnet.sources import default_cache_dir

SPLIT_SEED = 0  # the test split of a folder without test/ is the same every time


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, before any image is decoded."""

    root: Path
    layout: str  # "classes" (one folder per class) or "train-test"
    classes: tuple[str, ...]
    files: list[str]  # paths relative to root, train part first, then test; by class, then by name
    labels: list[int]
    parts: list[int]  # 0: train (or undivided), 1: test
    manifest: str  # SHA-256 over every file's path, size and modification time
    ignored: list[str]  # files passed over: not images by their extension, or outside class folders


def scan_folder(root: str | os.PathLike[str]) -> FolderScan:
    """List a folder of class folders (or ``train/`` and ``test/`` of them).

    Raises:
        DataError: no such folder, fewer than 2 classes, a class folder without images,
            a test class that training lacks, images but no class folders.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    top = _entries(root)
    layout = "train-test" if {"train", "test"} <= set(top.dirs) else "classes"
    parts = [("train", 0), ("test", 1)] if layout == "train-test" else [("", 0)]
    ignored = [f for f in top.files] if layout == "classes" else [*top.files, *(d for d in top.dirs
                                                                                 if d not in ("train", "test"))]
    per_part: dict[int, dict[str, list[tuple[str, os.stat_result]]]] = {}
    for name, part in parts:
        base = root / name if name else root
        class_dirs = _entries(base).dirs
        if name and not class_dirs:
            raise DataError(f"--data {root}: {name}/ holds no class folders; put each class's images in "
                            f"{name}/CLASS/")
        found: dict[str, list[tuple[str, os.stat_result]]] = {}
        for cls in class_dirs:
            images, others = _walk(base / cls, root)
            found[cls] = images
            ignored += others
        if name:
            ignored += [f"{name}/{f}" for f in _entries(base).files]
        per_part[part] = found
    classes = tuple(sorted(per_part[0]))
    if not classes:
        hint = (" (its images lie loose at the top)" if any(Path(f).suffix.lower() in IMAGE_SUFFIXES
                                                            for f in top.files) else "")
        raise DataError(f"--data {root}: no class folders{hint}; put each class's images in a subfolder named after "
                        "the class, e.g. DIR/cat/1.png, DIR/dog/2.png")
    if len(classes) < 2:
        raise DataError(f"--data {root}: only one class folder ({classes[0]}); a classifier needs at least 2, "
                        "one subfolder per class")
    for part, found in per_part.items():
        where = "test/" if part == 1 else "train/" if layout == "train-test" else ""
        for cls, images in found.items():
            if not images:
                raise DataError(f"--data {root}: class folder {where}{cls} holds no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder")
        if part == 1:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f"--data {root}: test/{extra[0]} is a class that train/ does not have; "
                                f"train/ has {', '.join(classes)}")
    files, labels, part_of, digest = [], [], [], hashlib.sha256()
    for part, found in sorted(per_part.items()):
        for label, cls in enumerate(classes):
            for rel, st in found.get(cls, []):
                files.append(rel)
                labels.append(label)
                part_of.append(part)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return FolderScan(root, layout, classes, files, labels, part_of, digest.hexdigest(), sorted(ignored))


@dataclass(frozen=True)
class _Entries:
    dirs: list[str]
    files: list[str]


def _entries(folder: Path) -> _Entries:
    """The visible subfolders and files of ``folder``, sorted."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                (dirs if e.is_dir() else files).append(e.name)
    except OSError as e:
        raise DataError(f"--data: cannot read the folder {folder}: {e.strerror or e}") from None
    return _Entries(sorted(dirs), sorted(files))


def _walk(folder: Path, root: Path) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """Image files under ``folder`` (recursively, hidden ones left out) with their stat,
    and the other files, as paths relative to ``root``."""
    images, others = [], []

    def unreadable(e: OSError) -> None:
        raise DataError(f"--data: cannot read the folder {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    images.append((rel, path.stat()))
                except OSError:  # a dangling link: decoding names it
                    images.append((rel, os.stat_result((0,) * 10)))
            else:
                others.append(rel)
    return images, others


def parse_image_size(text: str) -> tuple[int, int]:
    """``"32"`` -> ``(32, 32)``; ``"48x64"`` (height x width) -> ``(48, 64)``.

    Raises:
        DataError: anything else.
    """
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise DataError(f"--image-size {text!r}: give N (square) or HxW in pixels, e.g. 32 or 48x64") from None
    if len(parts) > 2:
        raise DataError(f"--image-size {text!r}: give N (square) or HxW in pixels, e.g. 32 or 48x64")
    return h, w


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def load_folder(options: DataOptions, *, progress: bool = True, files: dict[str, list[str]] | None = None) -> Dataset:
    """A folder of images as a :class:`Dataset`, decoded through the cache.

    Args:
        options: ``options.folder`` and the image settings (see :class:`DataOptions`).
        progress: show bars while decoding.
        files: the files of each split as a run recorded them; otherwise a folder with
            ``train/`` and ``test/`` uses those, and any other is divided (stratified, seed 0).

    Raises:
        DataError: see :func:`scan_folder`; images that cannot be decoded (unless
            ``options.skip_bad_images``); recorded files that are gone.
    """
    assert options.folder is not None
    scan = scan_folder(options.folder)
    cache, index = _find_cache(scan, options)
    notes: list[str] = []
    images = None
    if index is not None and index.get("manifest") == scan.manifest:
        images = imagecache.load(cache, index)
        if images is None:
            notes.append(f"the image cache {cache} was damaged: rebuilt")
    if images is None or index is None:
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        index = imagecache.build(cache, scan, options.image_size, options.channels, options.skip_bad_images,
                                 progress)
        notes.append(f"decoded {index['decoded']['images']:,} images in {index['decoded']['seconds']:.1f} s "
                     f"({index['decoded']['images_per_s']:,.0f} images/s) into {cache}")
        images = imagecache.load(cache, index)
        if images is None:
            raise DataError(f"the image cache {cache} was damaged as it was written; check the disk")
    elif index["bad"] and not options.skip_bad_images:
        raise DataError(imagecache.bad_message(scan.root, [tuple(b) for b in index["bad"]]))
    if scan.ignored:
        shown = ", ".join(scan.ignored[:3]) + (f" and {len(scan.ignored) - 3} more" if len(scan.ignored) > 3 else "")
        notes.append(f"passed over {len(scan.ignored)} file{'s' if len(scan.ignored) > 1 else ''} that "
                     f"{'are' if len(scan.ignored) > 1 else 'is'} not an image in a class folder: {shown}")
    if index["bad"]:
        notes.append(f"left out {len(index['bad'])} image{'s' if len(index['bad']) > 1 else ''} that cannot be "
                     f"decoded (--skip-bad-images): {', '.join(b[0] for b in index['bad'][:3])}")
    in_memory = _in_memory(images, options)
    if not in_memory:
        notes.append(f"{images.nbytes / 2**20:,.0f} MB of images is over the memory budget: "
                     "training reads them from the cache a batch at a time")
    labels = torch.tensor(index["labels"], dtype=torch.int64)
    train_rows, test_rows = _split_rows(scan, index, options, files)
    spec = InputSpec(index["channels"], index["height"], index["width"], tuple(index["classes"]),
                     dark_background=False, hflip=True if options.hflip is None else options.hflip)

    def split(rows: np.ndarray) -> Split:  # read into memory row by row: never the whole file twice
        part = images.subset(rows)
        return Split(part.load() if in_memory else part, labels[torch.from_numpy(rows)])

    dataset = Dataset(
        "folder", spec, split(train_rows), split(test_rows), str(scan.root),
        origin={"kind": "folder", "layout": scan.layout, "image_size": [index["height"], index["width"]],
                "channels": index["channels"], "test_split": options.test_split,
                "skip_bad_images": options.skip_bad_images, "split_seed": SPLIT_SEED, "cache": str(cache)},
        notes=tuple(notes),
        files={"train": [index["files"][i] for i in train_rows], "test": [index["files"][i] for i in test_rows]},
        skipped=tuple(b[0] for b in index["bad"]),
    )
    return dataset.first(options.subset)


def _find_cache(scan: FolderScan, options: DataOptions) -> tuple[Path, dict[str, Any] | None]:
    """The cache folder for ``options`` and its index (None: none yet). Settings given
    explicitly (a run read again by ``evaluate``, ``report``, ``--resume``) also take the
    cache a run with the default settings made, when it holds images of that size and
    channels, so a folder is decoded once, not once per command."""
    base = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    own = imagecache.cache_path(scan.root, options.image_size, options.channels, base)
    index = imagecache.read_index(own)
    if index is not None or (options.image_size is None and options.channels is None):
        return own, index
    auto = imagecache.cache_path(scan.root, None, None, base)
    found = imagecache.read_index(auto)
    if (found is not None and found.get("manifest") == scan.manifest
            and options.image_size in (None, (found["height"], found["width"]))
            and options.channels in (None, found["channels"])):
        return auto, found
    return own, None


def _in_memory(images: DiskImages, options: DataOptions) -> bool:
    """The rule: images that fit in the memory budget (by default half the memory available
    now) are read into memory; larger ones stay in the cache file, read a batch at a time."""
    budget = options.memory_budget_mb * 2**20 if options.memory_budget_mb is not None else available_memory() / 2
    return images.nbytes <= budget


def _split_rows(scan: FolderScan, index: dict[str, Any], options: DataOptions,
                files: dict[str, list[str]] | None) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the training and the test images: as recorded, by the folder's
    ``test/`` part, or a stratified split (seed 0) in a fixed shuffled order."""
    if files is not None:
        where = {f: i for i, f in enumerate(index["files"])}
        out = []
        for side in ("train", "test"):
            gone = [f for f in files.get(side, []) if f not in where]
            if gone:
                raise DataError(f"--data {scan.root}: {len(gone)} image{'s' if len(gone) > 1 else ''} of the run's "
                                f"{side} split {'are' if len(gone) > 1 else 'is'} gone or unreadable (first: "
                                f"{gone[0]}); the run can only be scored on its own images")
            out.append(np.array([where[f] for f in files.get(side, [])], dtype=np.int64))
        return out[0], out[1]
    rng = np.random.default_rng(SPLIT_SEED)
    parts = np.asarray(index["parts"])
    if scan.layout == "train-test":
        train, test = np.flatnonzero(parts == 0), np.flatnonzero(parts == 1)
        if len(test) == 0:
            raise DataError(f"--data {scan.root}: test/ holds no images that could be decoded")
    else:
        train, test = stratified_split(np.asarray(index["labels"]), options.test_split, SPLIT_SEED, "--test-split")
    # a fixed shuffled order, so that --subset and unshuffled training see every class
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]
