"""The decoded-image cache of a folder: images decoded once, by a process per core, into
one uint8 ``.npy`` file, with an index that says what it holds.

::

    ~/.cache/convnet/folders/NAME-KEY/      KEY: the folder's path and the size and channel settings
      images.npy     uint8 (N, C, H, W), the images that decoded, in the index's order
      index.json     the folder's manifest (every file's path, size and modification time),
                     classes, each image's file, label and part, the files that failed, the
                     images' SHA-256; written last

Every file is written to a temporary name and renamed; the images' SHA-256 is checked on
every load, so a cache that is damaged, or older than the folder, is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from convnet.core.durable import atomic_write, replace_durably, write_json
from convnet.core.errors import DataError, InputError
from convnet.core.progress import Bar
from convnet.data.dataset import DiskImages
from convnet.data.folderscan import FolderScan
from convnet.data.imagefiles import decode_image, default_size, image_header

CACHE_VERSION = 1  # bump when decoding changes, so older caches are rebuilt
INLINE_FILES = 2_000  # fewer files are decoded in this process: a pool costs more to start than it saves
CHUNK = 256  # files per task given to a decoding process


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


def pool_imap(fn: Callable[..., Any], tasks: list[tuple[Any, ...]], sizes: list[int], desc: str,
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


def cache_path(root: Path, image_size: tuple[int, int] | None, channels: int | None, base: Path) -> Path:
    """The cache folder of ``root`` under ``base`` for these settings (None: chosen from the images)."""
    setting = [str(root), list(image_size) if image_size else "auto", channels or "auto", CACHE_VERSION]
    key = hashlib.sha256(json.dumps(setting).encode()).hexdigest()[:16]
    return base / "folders" / f"{root.name[:40]}-{key}"


def bad_message(root: Path, bad: list[tuple[str, str]]) -> str:
    first_file, reason = bad[0]
    others = f" and {len(bad) - 1} other image{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
    return (f"--data {root}: cannot decode {first_file} ({reason}){others}; fix or remove "
            f"{'them' if others else 'it'}, or pass --skip-bad-images to leave them out")


def read_index(cache: Path) -> dict[str, Any] | None:
    """The cache's index, or None when there is none or it is not one this version wrote
    whole (then the cache is rebuilt)."""
    try:
        index = json.loads((cache / "index.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return index if _consistent(index) else None


def _consistent(index: Any) -> bool:
    """Whether ``index`` has every field, of the right type, its lists of one length."""
    if not isinstance(index, dict) or index.get("version") != CACHE_VERSION:
        return False
    if not all(isinstance(index.get(k), int) and not isinstance(index.get(k), bool) and index[k] > 0
               for k in ("channels", "height", "width")):
        return False
    lists = [index.get(k) for k in ("files", "labels", "parts", "classes", "bad")]
    if not all(isinstance(v, list) for v in lists) or not isinstance(index.get("images_sha256"), str):
        return False
    files, labels, parts, classes, _ = lists
    return (len(files) == len(labels) == len(parts)
            and all(isinstance(y, int) and 0 <= y < len(classes) for y in labels))


def build(cache: Path, scan: FolderScan, image_size: tuple[int, int] | None, channels: int | None,
          skip_bad_images: bool, progress: bool) -> dict[str, Any]:
    """Decode every image of ``scan`` into a new cache; the index is written last."""

    root, n = str(scan.root), len(scan.files)
    t0 = time.perf_counter()
    bad: dict[int, str] = {}
    size = image_size
    if size is None or channels is None:
        slices = _chunks(n)
        parts = dict(pool_imap(_headers, [(root, scan.files[s]) for s in slices],
                                [s.stop - s.start for s in slices], "reading image headers", progress))
        heads = [h for i in range(len(slices)) for h in parts[i]]
        bad = {i: h for i, h in enumerate(heads) if isinstance(h, str)}
        good = [h for h in heads if not isinstance(h, str)]
        if not good:
            raise DataError(bad_message(scan.root, [(scan.files[i], r) for i, r in bad.items()]))
        size = size or default_size([(h, w) for h, w, _ in good])
        channels = channels or (3 if any(c for _, _, c in good) else 1)
    created = not cache.exists()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the image cache {cache}: {e.strerror or e}") from None
    tmp = cache / f".images.{os.getpid()}.npy"
    try:
        return _build_into(cache, tmp, scan, size, channels, bad, skip_bad_images, progress, t0)
    except BaseException:
        if created:  # a refused or interrupted build leaves no folder behind
            shutil.rmtree(cache, ignore_errors=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _build_into(cache: Path, tmp: Path, scan: FolderScan, size: tuple[int, int], channels: int, bad: dict[int, str],
                skip_bad_images: bool, progress: bool, t0: float) -> dict[str, Any]:
    root, n = str(scan.root), len(scan.files)
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
        for k, (images, failed) in pool_imap(_decode, tasks, [s.stop - s.start for s in todo],
                                              "decoding images", progress):
            os.pwrite(f.fileno(), images.tobytes(), offset + todo[k].start * row)
            bad.update({todo[k].start + i: reason for i, reason in failed})
    bad_list = sorted((scan.files[i], r) for i, r in bad.items())
    if bad and not skip_bad_images:
        raise DataError(bad_message(scan.root, bad_list))
    keep = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
    if len(keep) == 0:
        raise DataError(f"--data {scan.root}: none of its {n} images could be decoded")
    final = cache / "images.npy"
    digest = _write_rows(tmp, keep, final) if bad else _sync_and_rename(tmp, final)
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
    """Rename ``tmp`` to ``final`` durably (:func:`~convnet.core.durable.replace_durably`);
    return its SHA-256."""
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    replace_durably(tmp, final)
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


def load(cache: Path, index: dict[str, Any]) -> DiskImages | None:
    """The cache's images, left on disk, once checked against the index; None when damaged."""
    images = _verified(cache / "images.npy", str(index.get("images_sha256")))
    if images is None or tuple(images.shape) != (len(index["files"]), index["channels"], index["height"],
                                                  index["width"]):
        return None
    return images
