"""Folders of images: one subfolder per class, decoded once into a cache.

::

    DIR/cat/001.jpg, DIR/cat/002.png, DIR/dog/…        a class per subfolder (names sorted)
    DIR/train/cat/…, DIR/train/dog/…, DIR/test/cat/…   or a training and a test part

Image files are recognised by their extension (:data:`~convnet.formats.IMAGE_SUFFIXES`);
hidden files (``.DS_Store``) are passed over silently, other files (``notes.txt``) are
passed over and named. Every image is converted to one size and channel count
(:func:`~convnet.formats.decode_image`) by a pool of processes, one per core, into a uint8
cache under ``~/.cache/convnet/folders/``. The cache is keyed by the folder and the size
and channel settings, and holds the path, size and modification time of every file: any
added, removed or changed file rebuilds it. Its files are written atomically, and the
images' SHA-256 is checked on every load: a damaged cache is rebuilt, never trusted.

A folder without a ``test/`` part is divided with a stratified split, the same one every
time (seed 0); the run records the files of each side.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.datasets import Dataset, DiskImages, InputSpec, Split, stratified_split
from convnet.errors import DataError, InputError
from convnet.formats import IMAGE_SUFFIXES, decode_image, image_header
from convnet.progress import Bar
from convnet.sources import DataOptions, default_cache_dir

CACHE_VERSION = 1  # bump when decoding changes, so older caches are rebuilt
MAX_DEFAULT_SIDE = 64  # the default size is the most common one, scaled down to at most this
INLINE_FILES = 2_000  # fewer files are decoded in this process: a pool costs more to start than it saves
SPLIT_SEED = 0  # the test split of a folder without test/ is the same every time
CHUNK = 256  # files per task given to a decoding process


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
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            (dirs if e.is_dir() else files).append(e.name)
    return _Entries(sorted(dirs), sorted(files))


def _walk(folder: Path, root: Path) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """Image files under ``folder`` (recursively, hidden ones left out) with their stat,
    and the other files, as paths relative to ``root``."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
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


def default_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most common ``(H, W)``, scaled down (aspect kept) so that its longer side is at
    most :data:`MAX_DEFAULT_SIDE`; ties go to the larger size."""
    counts = Counter(sizes)
    h, w = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    side = max(h, w)
    if side > MAX_DEFAULT_SIDE:
        h, w = max(8, round(h * MAX_DEFAULT_SIDE / side)), max(8, round(w * MAX_DEFAULT_SIDE / side))
    return h, w


# --- decoding, in a pool of processes


def _headers(root: str, files: list[str]) -> list[tuple[int, int, bool] | str]:
    out: list[tuple[int, int, bool] | str] = []
    for f in files:
        try:
            w, h, colour = image_header(os.path.join(root, f))
            out.append((h, w, colour))
        except InputError as e:
            out.append(str(e).removeprefix(os.path.join(root, "")))
    return out


def _decode(root: str, files: list[str], channels: int, size: tuple[int, int]) -> tuple[np.ndarray,
                                                                                        list[tuple[int, str]]]:
    """Decode ``files`` into uint8 ``(n, channels, H, W)`` (zeros where one fails); return
    the images and the offsets of the files that failed, with why."""
    out = np.zeros((len(files), channels, *size), np.uint8)
    bad = []
    for i, f in enumerate(files):
        try:
            out[i] = decode_image(os.path.join(root, f), channels, size)
        except InputError as e:
            bad.append((i, str(e).removeprefix(os.path.join(root, ""))))
    return out, bad


def _pool_imap(fn: Callable[..., Any], tasks: list[tuple[Any, ...]], sizes: list[int], desc: str,
               progress: bool) -> Iterator[tuple[int, Any]]:
    """``(i, fn(*tasks[i]))`` for every task, as each finishes, in a process per core when
    there is enough work; a bar counts ``sizes`` as tasks finish."""
    bar = Bar(sum(sizes), desc, enabled=progress)
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                  len(tasks))
    try:
        if sum(sizes) < INLINE_FILES or workers <= 1:
            for i, task in enumerate(tasks):
                yield i, fn(*task)
                bar.update(sizes[i])
            return
        # fork (Linux): the workers start at once and share the parent's imports; elsewhere, spawn
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                i = futures[future]
                yield i, future.result()
                bar.update(sizes[i])
    finally:
        bar.close()


def _chunks(n: int) -> list[slice]:
    return [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


# --- the cache


def _cache_path(root: Path, options: DataOptions) -> Path:
    setting = [str(root), list(options.image_size) if options.image_size else "auto", options.channels or "auto",
               CACHE_VERSION]
    key = hashlib.sha256(json.dumps(setting).encode()).hexdigest()[:16]
    base = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    return base / "folders" / f"{root.name[:40]}-{key}"


def _bad_message(root: Path, bad: list[tuple[str, str]]) -> str:
    first_file, reason = bad[0]
    others = f" and {len(bad) - 1} other image{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
    return (f"--data {root}: cannot decode {first_file} ({reason}){others}; fix or remove "
            f"{'them' if others else 'it'}, or pass --skip-bad-images to leave them out")


def _read_index(cache: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((cache / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == CACHE_VERSION else None


def _build(cache: Path, scan: FolderScan, options: DataOptions, progress: bool) -> dict[str, Any]:
    """Decode every image of ``scan`` into a new cache; the index is written last."""
    from convnet.runs import write_json

    root, n = str(scan.root), len(scan.files)
    t0 = time.perf_counter()
    bad: dict[int, str] = {}
    size, channels = options.image_size, options.channels
    if size is None or channels is None:
        slices = _chunks(n)
        parts = dict(_pool_imap(_headers, [(root, scan.files[s]) for s in slices],
                                [s.stop - s.start for s in slices], "reading image headers", progress))
        heads = [h for i in range(len(slices)) for h in parts[i]]
        bad = {i: h for i, h in enumerate(heads) if isinstance(h, str)}
        good = [h for h in heads if not isinstance(h, str)]
        if not good:
            raise DataError(_bad_message(scan.root, [(scan.files[i], r) for i, r in bad.items()]))
        size = size or default_size([(h, w) for h, w, _ in good])
        channels = channels or (3 if any(c for _, _, c in good) else 1)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the image cache {cache}: {e.strerror or e}") from None
    tmp = cache / f".images.{os.getpid()}.npy"
    try:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (n, channels, *size)})
        offset, row = len(header.getvalue()), channels * size[0] * size[1]
        todo = _chunks(n)
        tasks = [(root, scan.files[s], channels, size) for s in todo]
        with open(tmp, "wb") as f:
            f.write(header.getvalue())
            f.truncate(offset + n * row)
            # each chunk is written where it belongs as it arrives (workers decode, this process writes)
            for k, (images, failed) in _pool_imap(_decode, tasks, [s.stop - s.start for s in todo],
                                                  "decoding images", progress):
                os.pwrite(f.fileno(), images.tobytes(), offset + todo[k].start * row)
                bad.update({todo[k].start + i: reason for i, reason in failed})
        bad_list = sorted((scan.files[i], r) for i, r in bad.items())
        if bad and not options.skip_bad_images:
            raise DataError(_bad_message(scan.root, bad_list))
        keep = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
        if len(keep) == 0:
            raise DataError(f"--data {scan.root}: none of its {n} images could be decoded")
        final = cache / "images.npy"
        digest = _write_rows(tmp, keep, final) if bad else _sync_and_rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    index = {
        "version": CACHE_VERSION, "root": root, "manifest": scan.manifest, "layout": scan.layout,
        "classes": list(scan.classes), "channels": channels, "height": size[0], "width": size[1],
        "files": [scan.files[i] for i in keep], "labels": [scan.labels[i] for i in keep],
        "parts": [scan.parts[i] for i in keep], "bad": bad_list, "images_sha256": digest,
        "decoded": {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1)},
    }
    write_json(cache / "index.json", index)
    return index


def _write_rows(tmp: Path, keep: np.ndarray, final: Path) -> str:
    """Write rows ``keep`` of the ``.npy`` at ``tmp`` to ``final`` atomically, a chunk at a
    time; return the SHA-256 of ``final``'s bytes."""
    from convnet.runs import atomic_write

    src = np.lib.format.open_memmap(tmp, mode="r")
    digest = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (len(keep), *src.shape[1:])})
        yield header.getvalue()
        for s in range(0, len(keep), 4096):
            rows = keep[s:s + 4096]
            yield np.ascontiguousarray(src[rows[0]:rows[-1] + 1] if _consecutive(rows) else src[rows]).tobytes()

    def write(f: Any) -> None:
        for piece in pieces():
            digest.update(piece)
            f.write(piece)

    atomic_write(final, write)
    return digest.hexdigest()


def _sync_and_rename(tmp: Path, final: Path) -> str:
    """Flush ``tmp`` to disk and rename it to ``final`` (atomic); return its SHA-256."""
    digest = hashlib.sha256()
    with open(tmp, "rb+") as f:
        while block := f.read(1 << 24):
            digest.update(block)
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return digest.hexdigest()


def _consecutive(rows: np.ndarray) -> bool:
    return bool(len(rows) and rows[-1] - rows[0] + 1 == len(rows))


def _verified(path: Path, expected_sha256: str) -> DiskImages | None:
    """The cached images, left on disk, once their SHA-256 matches the index (read through
    once, a block at a time); None when the file is damaged."""
    try:
        images = DiskImages(path)
    except (InputError, DataError):
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    except OSError:
        return None
    return images if digest.hexdigest() == expected_sha256 else None


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
    cache = _cache_path(scan.root, options)
    notes: list[str] = []
    index = _read_index(cache)
    images = None
    if index is not None and index.get("manifest") == scan.manifest:
        images = _load_cached(cache, index)
        if images is None:
            notes.append(f"the image cache {cache} was damaged: rebuilt")
    if images is None or index is None:
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        index = _build(cache, scan, options, progress)
        notes.append(f"decoded {index['decoded']['images']:,} images in {index['decoded']['seconds']:.1f} s "
                     f"({index['decoded']['images_per_s']:,.0f} images/s) into {cache}")
        images = _load_cached(cache, index)
        if images is None:
            raise DataError(f"the image cache {cache} was damaged as it was written; check the disk")
    elif index["bad"] and not options.skip_bad_images:
        raise DataError(_bad_message(scan.root, [tuple(b) for b in index["bad"]]))
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


def _load_cached(cache: Path, index: dict[str, Any]) -> DiskImages | None:
    images = _verified(cache / "images.npy", str(index.get("images_sha256")))
    if images is None or len(images) != len(index.get("files", [])):
        return None
    return images


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
