"""File formats: bytes to uint8 image arrays.

* IDX (MNIST, Fashion-MNIST): :func:`read_idx`, gzipped or not, header checked first.
* CIFAR-10's binary version: :func:`read_cifar_binary`, records of one label byte and
  3,072 pixel bytes (plain bytes: nothing is ever unpickled).
* Image files of any format and mode Pillow reads: :func:`decode_image` converts one to
  the channels and size of an input spec.
* ``.npy`` files: :class:`NpyFile`, read along the first axis with plain file reads.

Nothing here imports torch, so the worker processes that decode a folder of images
start fast.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from convnet.errors import DataError, InputError

# --- IDX

# IDX type codes (the third byte of the magic number) and the numpy types they hold.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
MAX_IDX_BYTES = 1 << 31  # larger IDX files are refused: a guard against gzip bombs (Fashion-MNIST's largest: 47 MB)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, gzipped or not).

    The header is read first and only the bytes it declares are then read (or
    decompressed), so a damaged header or a gzip bomb costs no more than
    :data:`MAX_IDX_BYTES` of memory.

    Raises:
        DataError: naming the file and what is wrong with it (not gzip, corrupt gzip,
            truncated, wrong magic number, size that disagrees with the header).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
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
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_idx_stream(stream: IO[bytes], name: str) -> np.ndarray:
    head = read_up_to(stream, 4)
    if len(head) == 4:
        head += read_up_to(stream, 4 * head[3])
    header, shape, _, expected = _idx_header(bytes(head), name)
    raw = head + read_up_to(stream, expected - header)
    if len(raw) == expected and stream.read(1):
        raise DataError(f"{name}: has trailing bytes: dimensions {shape} need {expected} bytes, the file has more")
    return parse_idx(raw, name)


def read_up_to(stream: IO[bytes], n: int) -> bytearray:
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


# --- CIFAR-10, binary version

CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue planes, row by row


def parse_cifar(raw: bytes, name: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of one file of CIFAR-10's binary version (``data_batch_1.bin`` …).

    Returns:
        uint8 images ``(N, 3, 32, 32)`` (channels first, as stored) and uint8 labels ``(N,)``.

    Raises:
        DataError: the length is not a whole number of records, or a label is outside
            ``0..num_classes-1``.
    """
    if not raw or len(raw) % CIFAR_RECORD:
        raise DataError(f"{name}: {len(raw):,} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR records; "
                        "delete it and fetch it again")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].copy()
    if labels.max() >= num_classes:
        raise DataError(f"{name}: label {int(labels.max())} is outside 0..{num_classes - 1}; the file is damaged")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


# --- image files

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pbm", ".pnm"})
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused: a decompression-bomb guard
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "PA"})
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def image_header(path: str | os.PathLike[str]) -> tuple[int, int, bool]:
    """``(width, height, colour)`` of an image file, from its header (no pixel is decoded,
    except a palette's colours). ``colour`` is False for grey modes and grey palettes.

    Raises:
        InputError: not an image Pillow can identify.
    """
    with _decoding(path), _open(path) as img:
        return img.size[0], img.size[1], _is_colour(img)  # a palette's colours are decoded: may fail


def _is_colour(img: Image.Image) -> bool:
    if img.mode in ("P", "PA"):
        palette = img.getpalette() or []
        rgb = np.asarray(palette, dtype=np.int16)[: len(palette) // 3 * 3].reshape(-1, 3)
        return bool((rgb != rgb[:, :1]).any())
    return img.mode in COLOUR_MODES


def decode_image(source: str | os.PathLike[str] | bytes | Image.Image, channels: int, size: tuple[int, int], *,
                 dark_background: bool = False, invert: bool | None = None) -> np.ndarray:
    """An image, of any format and mode, as uint8 ``(channels, H, W)``.

    The conversion, in order:

    1. modes: 16-bit and float images are scaled to 8 bits; transparency is laid on
       white; then the image becomes grey (``channels=1``, ITU-R 601 luma) or RGB
       (``channels=3``; grey is repeated);
    2. ``dark_background`` data sets (MNIST, Fashion-MNIST: a light object on black): an
       image whose border is mostly light is inverted, unless ``invert`` says otherwise;
    3. size: an image of another size keeps its aspect ratio: it is padded to the
       target's aspect ratio with its background (the mean colour of its border; black
       for dark-background sets) and resized (Lanczos) to ``size`` ``(H, W)``.

    Raises:
        InputError: naming the file and the problem (not an image, truncated, a
            decompression bomb, empty).
    """
    name = source if isinstance(source, str | os.PathLike) else "<image>"
    if isinstance(source, Image.Image):
        return _convert(source, channels, size, dark_background, invert)
    with _decoding(name), _open(source) as img:
        img.load()
        return _convert(img, channels, size, dark_background, invert)


@contextlib.contextmanager
def _decoding(name: str | os.PathLike[str]) -> Iterator[None]:
    """Turn what Pillow raises on a damaged file into one :class:`InputError` naming it."""
    try:
        yield
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{name}: image has more than the {MAX_IMAGE_PIXELS:,} pixels allowed "
                         "(a guard against decompression bombs)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        raise InputError(f"{name}: broken or truncated image ({e})") from None


class _open:  # noqa: N801 (used as a context manager, like open())
    """``Image.open`` with the checks every caller wants: a decompression-bomb guard on
    the declared size, an empty image refused, errors turned into :class:`InputError`."""

    def __init__(self, source: str | os.PathLike[str] | bytes) -> None:
        self.name = source if isinstance(source, str | os.PathLike) else "<image>"
        self.source = io.BytesIO(source) if isinstance(source, bytes) else source
        self.catcher = warnings.catch_warnings()

    def __enter__(self) -> Image.Image:
        self.catcher.__enter__()
        warnings.simplefilter("ignore")  # Pillow warns about damaged metadata; the image is judged on decoding
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            self.img = Image.open(self.source)
        except FileNotFoundError:
            self.catcher.__exit__(None, None, None)
            raise InputError(f"{self.name}: no such file") from None
        except IsADirectoryError:
            self.catcher.__exit__(None, None, None)
            raise InputError(f"{self.name}: is a folder; give the image files (e.g. {self.name}/*.png)") from None
        except UnidentifiedImageError as e:
            self.catcher.__exit__(None, None, None)
            raise InputError(f"{self.name}: not a readable image ({e})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            self.catcher.__exit__(None, None, None)
            raise InputError(f"{self.name}: image has more than the {MAX_IMAGE_PIXELS:,} pixels allowed "
                             "(a guard against decompression bombs)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            self.catcher.__exit__(None, None, None)
            raise InputError(f"{self.name}: broken or truncated image ({e})") from None
        w, h = self.img.size
        if w * h > MAX_IMAGE_PIXELS:
            self.__exit__(None, None, None)
            raise InputError(f"{self.name}: image is {w}x{h}, more than the {MAX_IMAGE_PIXELS:,} pixels allowed "
                             "(a guard against decompression bombs)")
        if w == 0 or h == 0:
            self.__exit__(None, None, None)
            raise InputError(f"{self.name}: image is empty ({w}x{h})")
        return self.img

    def __exit__(self, *exc: object) -> None:
        try:
            if hasattr(self, "img"):
                self.img.close()
        finally:
            self.catcher.__exit__(None, None, None)


def _convert(img: Image.Image, channels: int, size: tuple[int, int], dark_background: bool,
             invert: bool | None) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)  # (H, W) or (H, W, 3)
    a = a[:, :, None] if a.ndim == 2 else a  # (H, W, C)
    if dark_background:
        if invert is None:
            border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (border pixels, C)
            invert = float(border.mean()) > 127
        if invert:
            a = 255 - a
    a = _fit(a, size, dark_background)
    return np.array(a.transpose(2, 0, 1), order="C")  # (H, W, C) -> (C, H, W): channels first, a writable copy


def _fit(a: np.ndarray, size: tuple[int, int], dark_background: bool) -> np.ndarray:
    """``a`` ``(h, w, C)`` padded to the aspect ratio of ``size`` ``(H, W)`` with its
    background, then resized to it; returned unchanged when it already has that size."""
    h, w, c = a.shape
    th, tw = size
    if (h, w) == (th, tw):
        return a
    # the padded canvas: the smallest with the target's aspect ratio that holds the image
    if w * th >= h * tw:
        ph, pw = max(h, round(w * th / tw)), w
    else:
        ph, pw = h, max(w, round(h * tw / th))
    if (ph, pw) != (h, w):
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (border pixels, C)
        background = np.zeros(c, np.uint8) if dark_background else np.rint(border.mean(axis=0)).astype(np.uint8)
        canvas = np.empty((ph, pw, c), np.uint8)
        canvas[:] = background
        top, left = (ph - h) // 2, (pw - w) // 2
        canvas[top:top + h, left:left + w] = a
        a = canvas
    mode = "L" if c == 1 else "RGB"
    resized = Image.fromarray(a[:, :, 0] if c == 1 else a, mode).resize((tw, th), Image.Resampling.LANCZOS)
    out = np.asarray(resized, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


# --- .npy files


class NpyFile:
    """A ``.npy`` file read along its first axis with plain file reads: ``npy[a:b]`` is a
    copy of rows ``a..b``, so a file of any size is never held whole (nor mapped into the
    process), and nothing is ever unpickled.

    Raises:
        InputError: not a ``.npy`` file, a damaged header, Python objects, too short.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise InputError(f"{path}: not a valid .npy file (no NumPy header); save arrays with numpy.save")
                f.seek(0)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, dtype = read_header(f)
                self.offset = f.tell()
                data_bytes = os.fstat(f.fileno()).st_size - self.offset
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
        except Exception:  # noqa: BLE001 (numpy's header parser raises ValueError, SyntaxError, tokenize errors…)
            raise InputError(f"{path}: not a valid .npy file (its header is damaged); save arrays with numpy.save") \
                from None
        if dtype.hasobject:
            raise InputError(f"{path}: holds Python objects ({dtype}); reading them needs unpickling, which convnet "
                             "never does; save a numeric array")
        if any(d < 0 for d in shape):
            raise InputError(f"{path}: not a valid .npy file (shape {shape})")
        needed = math.prod(shape) * dtype.itemsize
        if data_bytes < needed:
            raise InputError(f"{path}: truncated .npy file: shape {shape} of {dtype} needs {needed:,} bytes of data, "
                             f"the file holds {data_bytes:,}")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self.fortran_order = bool(fortran_order)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        part = (stop - start, *self.shape[1:])
        if math.prod(part) == 0:
            return np.empty(part, self.dtype)
        if self.fortran_order:  # rows are not contiguous on disk; numpy writes this order only when asked
            mapped = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order="F")
            return np.array(mapped[start:stop])
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset + start * self.row_bytes)
                data = f.read((stop - start) * self.row_bytes)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from None
        if len(data) != (stop - start) * self.row_bytes:
            raise InputError(f"{self.path}: the file became shorter while it was read")
        return np.frombuffer(data, self.dtype).reshape(part)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed), one positioned read each."""
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if self.fortran_order:
            mapped = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order="F")
            out[:] = mapped[rows]
            return out
        size = self.row_bytes
        flat = out.reshape(len(rows), -1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(rows.tolist()):
                if os.preadv(fd, [memoryview(flat[i])], self.offset + r * size) != size:
                    raise InputError(f"{self.path}: the file became shorter while it was read")
        finally:
            os.close(fd)
        return out
