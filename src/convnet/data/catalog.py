"""Named data sets: what each is, where it is found, how it is downloaded and verified.

A named data set is looked for, in this order: an explicit ``data_dir``; the user's cache
(``~/.cache/convnet/NAME``); a system copy (Debian's ``dataset-fashion-mnist`` installs one
in ``/usr/share/datasets/fashion-mnist``); else it is downloaded from its official
mirrors into the cache. A download goes to a hidden ``.NAME.part`` file that survives an
interruption and is continued (an HTTP range request) the next time; it is checked
against the published digest and only then renamed into place.

This module reads no images (and imports no torch, so that ``convnet datasets`` is quick):
:mod:`convnet.data.named` reads a named data set into tensors; reading the data a command or a
run asks for, named or a folder, is :mod:`convnet.data.load`'s job.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnet.core.durable import replace_durably
from convnet.core.errors import DataError
from convnet.core.inputspec import InputSpec
from convnet.core.progress import Bar


@dataclass(frozen=True)
class DataFile:
    """One file of a named data set and the digests that identify it."""

    name: str  # e.g. "train-images-idx3-ubyte.gz"
    md5: str  # the digest the publisher gives for the file as served
    sha256: str | None = None  # of the *decompressed* bytes, where known: recompressed copies (Debian's) still match


@dataclass(frozen=True)
class NamedDataset:
    """A data set convnet knows by name: its images, classes, files and mirrors."""

    name: str
    description: str
    classes: tuple[str, ...]
    channels: int
    height: int
    width: int
    dark_background: bool  # a light object drawn on black
    hflip: bool  # a mirrored image keeps its class
    format: str  # "idx" (four files) or "cifar" (one archive of binary batches)
    files: dict[str, DataFile]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()
    train_images: int = 0
    test_images: int = 0

    @property
    def spec(self) -> InputSpec:
        """What its images are: channels, size, classes, background, mirrors."""
        return InputSpec(self.channels, self.height, self.width, self.classes, self.dark_background, self.hflip)

    @property
    def download_bytes(self) -> int:
        return {"fashion-mnist": 30_878_645, "mnist": 11_594_722, "cifar10": 170_052_171}.get(self.name, 0)


FASHION_MNIST = NamedDataset(
    name="fashion-mnist",
    description="Zalando's clothes and shoes, 28x28 grey (the tutorial's data set)",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    channels=1, height=28, width=28, dark_background=True, hflip=True, format="idx",
    files={
        "train_images": DataFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                 "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train_labels": DataFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe",
                                 "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "test_images": DataFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79",
                                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "test_labels": DataFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310",
                                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    train_images=60_000, test_images=10_000,
)

MNIST = NamedDataset(
    name="mnist",
    description="handwritten digits, 28x28 grey (no flips: a mirrored digit is another sign)",
    classes=tuple(str(d) for d in range(10)),
    channels=1, height=28, width=28, dark_background=True, hflip=False, format="idx",
    files={
        "train_images": DataFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train_labels": DataFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        "test_images": DataFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        "test_labels": DataFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    train_images=60_000, test_images=10_000,
)

CIFAR10 = NamedDataset(
    name="cifar10",
    description="small photos of 10 kinds of object, 32x32 colour (the binary version)",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    channels=3, height=32, width=32, dark_background=False, hflip=True, format="cifar",
    files={"archive": DataFile("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")},
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    train_images=50_000, test_images=10_000,
)

GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of a gzip file
DATASETS: dict[str, NamedDataset] = {d.name: d for d in (FASHION_MNIST, MNIST, CIFAR10)}
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_FOLDER = "cifar-10-batches-bin"  # the folder inside the archive


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/convnet``, or ``~/.cache/convnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convnet"


def named(name: str) -> NamedDataset:
    """The named data set, or a :class:`DataError` listing the names."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)} "
                        "(or --data DIR for a folder of images)")
    return DATASETS[name]


# --- where a data set is found


def idx_file(folder: Path, gz_name: str) -> Path | None:
    """The file of that name in ``folder``, gzipped or not."""
    for candidate in (folder / gz_name, folder / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def cifar_batches(folder: Path) -> Path | None:
    """The folder holding CIFAR-10's extracted ``.bin`` files: ``folder`` or its ``cifar-10-batches-bin``."""
    for candidate in (folder, folder / CIFAR_FOLDER):
        if all((candidate / n).is_file() for n in (*CIFAR_TRAIN, CIFAR_TEST)):
            return candidate
    return None


def has_all(folder: Path, ds: NamedDataset) -> bool:
    """Whether ``folder`` holds a complete copy of ``ds``."""
    if ds.format == "cifar":
        return (folder / ds.files["archive"].name).is_file() or cifar_batches(folder) is not None
    return all(idx_file(folder, f.name) is not None for f in ds.files.values())


def locate(ds: NamedDataset, data_dir: str | os.PathLike[str] | None = None,
           cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder ``ds`` would be read from, or None when it would have to be downloaded.

    Raises:
        DataError: ``data_dir`` given but missing, or without the data set's files.
    """
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder}: no such folder")
        if not has_all(folder, ds):
            names = ", ".join(f.name for f in ds.files.values())
            what = (f"the archive {names} or the extracted {CIFAR_FOLDER} files" if ds.format == "cifar"
                    else f"the IDX files {names} (gzipped or not)")
            raise DataError(f"--data-dir {folder}: expected {what}")
        return folder
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / ds.name
    for folder in (cache, *map(Path, ds.system_dirs)):
        if has_all(folder, ds):
            return folder
    return None


def file_digest(path: Path, f: DataFile) -> tuple[str, str, str]:
    """``(digest, expected, what)`` for ``path`` as ``f``: the SHA-256 of its content where
    that is known (so a recompressed copy passes), else the published MD5 of the file."""
    if f.sha256 is not None:
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
        return hashlib.sha256(raw).hexdigest(), f.sha256, "SHA-256 of content"
    md5 = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            md5.update(chunk)
    return md5.hexdigest(), f.md5, "MD5"


def verify(path: Path, f: DataFile, name: str | None = None) -> None:
    """Check that ``path`` holds ``f``; raise :class:`DataError` on a mismatch."""
    digest, expected, what = file_digest(path, f)
    if digest != expected:
        raise DataError(f"{name or path}: checksum mismatch ({what} {digest[:12]}…, expected {expected[:12]}…)")


def download_dataset(ds: NamedDataset, folder: Path, *, timeout_s: float = 60.0, progress: bool = True) -> None:
    """Fetch each file of ``ds`` into ``folder`` from the first mirror that serves it.

    Each file grows in a hidden ``.NAME.part`` beside its final name; an interrupted
    download is continued from there next time (where the server honours range
    requests). The whole file is then checked against its digest, and only then
    renamed into place: a file under its real name is always complete and verified.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache {folder}: {e.strerror or e}; pass --data-dir") from None
    for f in ds.files.values():
        target = folder / f.name
        if target.is_file():
            continue
        errors: list[str] = []
        for mirror in ds.mirrors:
            try:
                _fetch_verified(mirror + f.name, target, f, timeout_s, progress)
                break
            except DataError as e:
                errors.append(str(e))
        else:
            raise DataError(
                f"could not download {ds.name} ({f.name}): " + "; ".join(errors)
                + f". Put its files in a folder and pass --data-dir, or place them in {folder}"
            )


def _fetch_verified(url: str, target: Path, f: DataFile, timeout_s: float, progress: bool) -> None:
    part = target.with_name(f".{target.name}.part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (fixed mirrors)
            resumed = have > 0 and response.status == 206
            size = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
            bar = Bar(size or None, f"downloading {target.name}", unit="B", enabled=progress)
            bar.update(have if resumed else 0)
            got = have if resumed else 0
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            bar.close()
            if size and got < size:  # the part stays (a hidden file): the next attempt continues it
                raise DataError(f"{url}: the connection broke off after {got:,} of {size:,} bytes")
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already whole: verify it below
            pass
        else:
            raise DataError(f"{url}: {e.code} {e.reason}") from None
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # the part stays (a hidden file) so that the next attempt continues it
        raise DataError(f"{url}: {getattr(e, 'reason', None) or e}") from None
    try:
        verify(part, f, name=url)
    except DataError:
        part.unlink(missing_ok=True)  # a wrong file is never continued
        raise
    replace_durably(part, target)


def describe_datasets(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """What ``convnet datasets`` lists: each named data set, its images and where it is found."""
    rows = []
    for ds in DATASETS.values():
        folder = locate(ds, None, cache_dir)
        where = str(folder) if folder is not None else (
            f"not here: downloaded from {ds.mirrors[0]} on first use ({ds.download_bytes / 1e6:.0f} MB)")
        rows.append({"name": ds.name, "image": f"{ds.channels}x{ds.height}x{ds.width}",
                     "channels": ds.channels, "height": ds.height, "width": ds.width, "classes": len(ds.classes),
                     "train_images": ds.train_images, "test_images": ds.test_images, "hflip": ds.hflip,
                     "found": folder is not None, "where": where, "description": ds.description})
    return rows
