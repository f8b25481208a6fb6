"""Data: the IDX format, where data sets are found, and how batches are taken.

A data set is kept the way it is stored, as one uint8 tensor of images ``(N, 1, H, W)``
and one int64 tensor of labels ``(N,)``; a batch is scaled to float in [0, 1] only when
it is taken (:func:`to_float`). That keeps Fashion-MNIST at 47 MB instead of 188 MB and
lets the whole set live on a GPU.

Known data sets are looked for, in this order: an explicit ``data_dir``; the user's
cache (``~/.cache/convnet/NAME``); a system copy (Debian's ``dataset-fashion-mnist``
installs one in ``/usr/share/datasets/fashion-mnist``); else they are downloaded from
their official mirrors into the cache, verified and written atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from convnet.errors import DataError

# IDX type codes (the third byte of the magic number) and the numpy types they hold.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


MAX_IDX_BYTES = 1 << 31  # larger IDX files are refused: a guard against gzip bombs (Fashion-MNIST's largest: 47 MB)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, gzipped or not).

    The header is read first and only the bytes it declares are then read (or
    decompressed), so a damaged header or a gzip bomb costs no more than
    :data:`MAX_IDX_BYTES` of memory.

    Args:
        path: the file; gzip is detected from its first bytes, not its name.

    Returns:
        The array, with the file's dimensions and native byte order.

    Raises:
        DataError: naming the file and what is wrong with it (not gzip, corrupt gzip,
            truncated, wrong magic number, size that disagrees with the header).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == _GZIP_MAGIC
            f.seek(0)
            if not gzipped:
                if path.suffix == ".gz":
                    raise DataError(f"{path}: not a gzip file although its name ends in .gz")
                return _read_idx_stream(f, str(path))
            try:
                with gzip.GzipFile(fileobj=f) as g:
                    return _read_idx_stream(g, str(path))
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: corrupt or truncated gzip data ({e}); delete it and fetch it again") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_idx_stream(stream: IO[bytes], name: str) -> np.ndarray:
    head = _read_up_to(stream, 4)
    if len(head) == 4:
        head += _read_up_to(stream, 4 * head[3])
    header, shape, _, expected = _idx_header(bytes(head), name)
    raw = head + _read_up_to(stream, expected - header)
    if len(raw) == expected and stream.read(1):
        raise DataError(f"{name}: has trailing bytes: dimensions {shape} need {expected} bytes, the file has more")
    return parse_idx(raw, name)


def _read_up_to(stream: IO[bytes], n: int) -> bytearray:
    """``n`` bytes of ``stream``, fewer at its end; read in pieces, so a header that
    promises much more than the file holds allocates nothing ahead."""
    out = bytearray()
    while len(out) < n and (piece := stream.read(min(n - len(out), 1 << 24))):
        out += piece
    return out


def _idx_header(raw: bytes, name: str) -> tuple[int, tuple[int, ...], np.dtype, int]:
    """Check an IDX header; return its length, the shape, the item type and the file size it implies."""
    if len(raw) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(raw)} bytes, the header alone needs 4)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{name}: wrong magic number 0x{raw[:4].hex()} (an IDX file starts with 00 00, "
            f"a type code in {sorted(hex(c) for c in _IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise DataError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_IDX_BYTES:
        raise DataError(f"{name}: IDX dimensions {shape} declare more than the {MAX_IDX_BYTES:,} bytes allowed "
                        "(a damaged header, or a guard against gzip bombs)")
    return header, shape, dtype, header + math.prod(shape) * dtype.itemsize


def parse_idx(raw: bytes | bytearray, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file; see :func:`read_idx`."""
    header, shape, dtype, expected = _idx_header(bytes(raw[:1024]), name)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{name}: {what}: dimensions {shape} need {expected} bytes, the file has {len(raw)}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


@dataclass(frozen=True)
class IdxFile:
    """One file of a known data set: its name, and the digests that identify it."""

    name: str  # e.g. "train-images-idx3-ubyte.gz"
    sha256: str | None  # of the *decompressed* bytes: recompressed copies (Debian's) still match
    md5_gz: str  # the digest the mirrors publish for the archive itself


@dataclass(frozen=True)
class DatasetSpec:
    """Where a known data set comes from and what it holds."""

    name: str
    classes: tuple[str, ...]
    files: dict[str, IdxFile]  # keys: train_images, train_labels, test_images, test_labels
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    files={
        "train_images": IdxFile("train-images-idx3-ubyte.gz",
                                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                                "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train_labels": IdxFile("train-labels-idx1-ubyte.gz",
                                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                                "25c81989df183df01b3e8a0aad5dffbe"),
        "test_images": IdxFile("t10k-images-idx3-ubyte.gz",
                               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                               "bef4ecab320f06d8554ea6380940ec79"),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte.gz",
                               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                               "bb300cfdad3c16e7a12a480ee83cd310"),
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

MNIST = DatasetSpec(
    name="mnist",
    classes=tuple(str(d) for d in range(10)),
    files={
        "train_images": IdxFile("train-images-idx3-ubyte.gz",
                                None,
                                "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train_labels": IdxFile("train-labels-idx1-ubyte.gz",
                                None,
                                "d53e105ee54ea40749a09fcbcd1e9432"),
        "test_images": IdxFile("t10k-images-idx3-ubyte.gz",
                               None,
                               "9fb629c4189551a2d022fa330f9573f3"),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte.gz",
                               None,
                               "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (FASHION_MNIST, MNIST)}


@dataclass(frozen=True)
class Split:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set: a training and a test split and the class names."""

    name: str
    classes: tuple[str, ...]
    train: Split
    test: Split
    source: str  # the folder the files were read from
    subset: int | None = None  # only the first `subset` training images were kept

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images to float32 in [0, 1], the tutorial's ``X / 255.0``."""
    return images.float() / 255.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/convnet``, or ``~/.cache/convnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convnet"


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    subset: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Dataset:
    """Load a known data set as uint8 tensors, fetching it first if need be.

    Args:
        name: one of :data:`DATASETS` (``fashion-mnist``, ``mnist``).
        data_dir: a folder holding the four IDX files (gzipped or not); when given,
            nothing else is tried.
        subset: keep only the first ``subset`` training images (the test split is kept
            whole), for quick experiments.
        cache_dir: where downloads go; defaults to :func:`default_cache_dir`.
        download: fetch from the mirrors when no local copy is found.

    Raises:
        DataError: unknown name, no copy found, a corrupt file, a failed download.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    if subset is not None and subset <= 0:
        raise DataError(f"--subset must be a positive number of images, got {subset}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = _locate(spec, data_dir, cache / spec.name, download)
    arrays = {key: read_idx(_find_file(folder, f.name)) for key, f in spec.files.items()}
    train = _split(arrays["train_images"], arrays["train_labels"], folder, spec, "train")
    test = _split(arrays["test_images"], arrays["test_labels"], folder, spec, "test")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{folder}: train images are {tuple(train.images.shape[2:])} but test images "
                        f"{tuple(test.images.shape[2:])}; both splits need the same size")
    if subset is not None:
        train = Split(train.images[:subset], train.labels[:subset])
    # the folder made absolute, so that a run folder's record of it holds from any working directory
    return Dataset(spec.name, spec.classes, train, test, os.path.abspath(folder), subset)


def _find_file(folder: Path, gz_name: str) -> Path:
    """The file of that name in ``folder``, gzipped or not."""
    for candidate in (folder / gz_name, folder / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {gz_name} (or its uncompressed form)")


def _has_all(folder: Path, spec: DatasetSpec) -> bool:
    return all(
        (folder / f.name).is_file() or (folder / f.name.removesuffix(".gz")).is_file()
        for f in spec.files.values()
    )


def _locate(spec: DatasetSpec, data_dir: str | os.PathLike[str] | None, cache: Path, download: bool) -> Path:
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder}: no such folder")
        if not _has_all(folder, spec):
            names = ", ".join(f.name for f in spec.files.values())
            raise DataError(f"--data-dir {folder}: expected the IDX files {names} (gzipped or not)")
        return folder
    for folder in (cache, *map(Path, spec.system_dirs)):
        if _has_all(folder, spec):
            return folder
    if not download:
        raise DataError(
            f"{spec.name} not found in {cache} or {', '.join(spec.system_dirs) or 'a system folder'}; "
            "pass --data-dir, or allow the download"
        )
    download_dataset(spec, cache)
    return cache


def _split(images: np.ndarray, labels: np.ndarray, folder: Path, spec: DatasetSpec, which: str) -> Split:
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"{folder}: {which} images must have 3 dimensions (N, H, W) and labels 1, "
            f"got {images.shape} and {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} {which} images but {labels.shape[0]} labels")
    if images.dtype != np.uint8:
        raise DataError(f"{folder}: {which} images must be unsigned bytes, got {images.dtype}")
    if labels.dtype.kind not in "ui":
        raise DataError(f"{folder}: {which} labels must be integers, got {labels.dtype}")
    if 0 in images.shape:
        raise DataError(f"{folder}: {which} images have shape {images.shape}; there is nothing to learn from")
    bad = (labels < 0) | (labels >= len(spec.classes))
    if bad.any():
        raise DataError(f"{folder}: {which} label {int(labels[bad][0])} is outside 0..{len(spec.classes) - 1}")
    x = torch.from_numpy(images).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W): channels first
    y = torch.from_numpy(labels.astype(np.int64))
    return Split(x, y)


def sha256_of_content(path: Path) -> str:
    """SHA-256 of what a file holds: of the decompressed bytes when it is gzipped."""
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return hashlib.sha256(raw).hexdigest()


def verify(path: Path, f: IdxFile, name: str | None = None) -> None:
    """Check that ``path`` holds ``f``: by the SHA-256 of its content where that is known
    (so a recompressed copy passes), else by the published MD5 of the archive."""
    name = name or str(path)
    if f.sha256 is not None:
        digest, expected, what = sha256_of_content(path), f.sha256, "SHA-256 of content"
    else:
        digest, expected, what = hashlib.md5(path.read_bytes()).hexdigest(), f.md5_gz, "MD5"
    if digest != expected:
        raise DataError(f"{name}: checksum mismatch ({what} {digest[:12]}…, expected {expected[:12]}…)")


def download_dataset(spec: DatasetSpec, folder: Path, *, timeout_s: float = 60.0) -> None:
    """Fetch each file of ``spec`` into ``folder`` from the first mirror that serves it.

    Each file is written to a temporary name in ``folder``, its decompressed content is
    checked against the known SHA-256, and only then is it renamed into place, so an
    interrupted or corrupt download never leaves a file that looks complete.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache {folder}: {e.strerror or e}; pass --data-dir") from None
    for f in spec.files.values():
        target = folder / f.name
        if target.is_file():
            continue
        errors: list[str] = []
        for mirror in spec.mirrors:
            url = mirror + f.name
            try:
                _fetch_verified(url, target, f, timeout_s)
                break
            except DataError as e:
                errors.append(str(e))
        else:
            raise DataError(
                f"could not download {spec.name} ({f.name}): " + "; ".join(errors)
                + f". Put the IDX files in a folder and pass --data-dir, or place them in {folder}"
            )


def _fetch_verified(url: str, target: Path, f: IdxFile, timeout_s: float) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (fixed https/http mirrors)
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DataError(f"{url}: {getattr(e, 'reason', None) or e}") from None
            out.flush()
            os.fsync(out.fileno())
        verify(tmp, f, name=url)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def batches(n: int, batch_size: int, *, drop_last: bool = False) -> Sequence[slice]:
    """Slices ``[0:b], [b:2b], …`` covering ``n`` items; the last may be short."""
    stop = n - n % batch_size if drop_last else n
    return [slice(start, min(start + batch_size, n)) for start in range(0, stop, batch_size)]


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of ``split``, the same share of every class (stratified),
    chosen by ``seed``. Both parts keep the original order.

    Returns:
        ``(train, validation)``.
    """
    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be a fraction between 0 and 1, got {fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = split.labels.cpu()
    held = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        k = round(len(idx) * fraction)
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[torch.cat(held)] = True
    if mask.all() or not mask.any():
        raise DataError(f"--val-split {fraction} leaves no {'training' if mask.all() else 'validation'} images")
    keep, val = (~mask).nonzero().flatten(), mask.nonzero().flatten()
    return (Split(split.images[keep], split.labels[keep]), Split(split.images[val], split.labels[val]))
