"""Prediction: logits for a batch of images, and turning files into such batches.

:func:`infer` is the one forward pass that evaluation, the CLI and the API all use.
:func:`input_batches` reads image files (any size or colour mode), ``.npy`` arrays in
channels-first ``(N, 1, H, W)`` or channels-last ``(N, H, W, 1)`` layout, and IDX files,
and gives uint8 ``(N, 1, H, W)`` tensors the model's size, a bounded batch at a time.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from convnet import runs
from convnet.data import DataError, read_idx
from convnet.engine import Engine
from convnet.errors import InputError
from convnet.models import create_model

LAYOUTS = ("auto", "nchw", "nhwc")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused: a decompression-bomb guard


def infer(model: nn.Module, images: torch.Tensor, *, engine: Engine | None = None,
          batch_size: int | None = None, tta: bool = False) -> torch.Tensor:
    """Logits ``(N, num_classes)`` (float32, on the CPU) for ``images``.

    Args:
        model: any registered model, already on ``engine.device``.
        images: uint8 ``(N, C, H, W)`` in [0, 255] or float in [0, 1].
        engine: device and precision; defaults to the CPU fast path.
        batch_size: images per forward pass; defaults to ``engine.infer_batch_size``.
        tta: test-time augmentation: the mean of the logits of each image and its mirror.
    """
    engine = engine or Engine.fast()
    batch_size = batch_size or engine.infer_batch_size
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if chunk.dtype == torch.uint8:
                x = engine.batch(chunk)
            else:
                x = chunk.to(engine.device, torch.float32).contiguous(memory_format=engine.memory_format)
            with engine.precision():
                logits = model(x).float()
                if tta:
                    logits = (logits + model(x.flip(3)).float()) / 2
            out.append(logits.cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


@dataclass(frozen=True)
class Prediction:
    labels: torch.Tensor  # (N,) int64 class indices
    probabilities: torch.Tensor  # (N, num_classes), rows sum to 1


def predict(model: nn.Module, images: torch.Tensor, *, engine: Engine | None = None, tta: bool = False) -> Prediction:
    """Class indices and softmax probabilities for ``images`` (see :func:`infer`)."""
    probs = infer(model, images, engine=engine, tta=tta).softmax(dim=1)
    return Prediction(probs.argmax(dim=1), probs)


def load_model(run_dir: str | os.PathLike[str], engine: Engine | None = None) -> tuple[nn.Module, runs.Run]:
    """The trained model of a run folder, on ``engine.device``, and the run itself."""
    engine = engine or Engine.fast()
    run = runs.open_run(run_dir)
    c, h, _ = run.image_shape
    model = create_model(run.model_name, len(run.classes), c, h)
    runs.load_weights(model, run.path / runs.WEIGHTS)
    return engine.prepare_model(model), run


# --- reading inputs

BATCH_IMAGES = 4096  # images read, converted and predicted at a time: memory stays bounded for any input


@dataclass(frozen=True)
class Inputs:
    """Images from one file: names (one per image) and uint8 ``(N, C, H, W)``."""

    path: str
    names: list[str]
    images: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """Up to a batch of images from one or more files, in order: a name for each image
    and uint8 ``(N, C, H, W)``."""

    names: list[str]
    images: torch.Tensor


def load_inputs(paths: Sequence[str | os.PathLike[str]], image_shape: tuple[int, int, int] = (1, 28, 28), *,
                layout: str = "auto") -> Iterator[Inputs | InputError]:
    """Read each path whole; yield its images, or the error that names what is wrong with it.

    :func:`input_batches` reads the same inputs in bounded memory, whatever their size.
    """
    _check_layout(layout)
    for p in paths:
        try:
            yield load_input(Path(p), image_shape, layout)
        except InputError as e:
            yield e


def input_batches(paths: Sequence[str | os.PathLike[str]], image_shape: tuple[int, int, int] = (1, 28, 28), *,
                  layout: str = "auto", batch_size: int = BATCH_IMAGES) -> Iterator[Batch | InputError]:
    """The images of ``paths`` in batches of at most ``batch_size``, in order, and each
    file's error in its place.

    Memory stays bounded whatever the inputs: a ``.npy`` file is read from disk a batch at
    a time (never whole), and many small image files are gathered into one batch. Every
    check of a file (shape, type, values) is made before its first image is yielded.
    """
    _check_layout(layout)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    names: list[str] = []
    parts: list[torch.Tensor] = []
    held = 0  # images in names/parts, not yet yielded
    for p in paths:
        try:
            for chunk_names, chunk in _file_chunks(Path(p), image_shape, layout, batch_size):
                while len(chunk):
                    take = batch_size - held
                    names += chunk_names[:take]
                    parts.append(chunk[:take])
                    held += len(parts[-1])
                    chunk_names, chunk = chunk_names[take:], chunk[take:]
                    if held == batch_size:
                        yield Batch(names, torch.cat(parts))
                        names, parts, held = [], [], 0
        except InputError as e:
            if held:
                yield Batch(names, torch.cat(parts))
                names, parts, held = [], [], 0
            yield e
    if held:
        yield Batch(names, torch.cat(parts))


def load_input(path: Path, image_shape: tuple[int, int, int] = (1, 28, 28), layout: str = "auto") -> Inputs:
    """One file's images, whole: an image file, a ``.npy`` array or an IDX file."""
    names: list[str] = []
    parts: list[torch.Tensor] = []
    for chunk_names, chunk in _file_chunks(Path(path), image_shape, layout, BATCH_IMAGES):
        names += chunk_names
        parts.append(chunk)
    return Inputs(str(path), names, torch.cat(parts))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")


def _file_chunks(path: Path, image_shape: tuple[int, int, int], layout: str,
                 batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(names, uint8 (n, C, H, W))`` pieces of one file, ``n <= batch_size``; at least one."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    array: np.ndarray | NpyFile
    if suffix == ".npy":
        array = NpyFile(path)
    elif "idx" in path.name or suffix == ".gz" or path.name.endswith("ubyte"):
        try:
            array = read_idx(path)
        except DataError as e:
            raise InputError(str(e)) from None
        layout = "nchw" if array.ndim == 4 else layout
    else:
        yield [str(path)], load_image(path, image_shape[1:]).unsqueeze(0)
        return
    start = 0
    for images in array_batches(array, str(path), image_shape, layout, batch_size):
        yield [f"{path}[{i}]" for i in range(start, start + len(images))], images
        start += len(images)
    if start == 0:
        raise InputError(f"{path}: holds no images (shape {array.shape})")


def load_image(path: Path, size: tuple[int, int] = (28, 28), *, invert: bool | None = None) -> torch.Tensor:
    """An image file as uint8 ``(1, H, W)``, the way Fashion-MNIST draws things.

    Any mode is accepted (1, L, P, RGB, RGBA, CMYK, 16-bit): transparency is laid on
    white, colour turned to grey. Fashion-MNIST shows a light object on black, so an
    image whose border is mostly light (a photo on a white background) is inverted
    unless ``invert`` says otherwise. The object is padded to a square with the
    background and resized to ``size``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about damaged metadata; the image is judged below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise InputError(f"{path}: image is {w}x{h}, more than the {MAX_IMAGE_PIXELS:,} pixels allowed "
                                     "(a guard against decompression bombs)")
                if w == 0 or h == 0:
                    raise InputError(f"{path}: image is empty ({w}x{h})")
                img.load()
                grey = _to_grey(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path}: image has more than the {MAX_IMAGE_PIXELS:,} pixels allowed "
                         "(a guard against decompression bombs)") from None
    except UnidentifiedImageError as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{path}: broken or truncated image ({e})") from None
    if invert is None:
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        invert = float(border.mean()) > 127
    if invert:
        grey = 255 - grey
    # pad to a square with the background (black after inversion), then resize
    h, w = grey.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = grey
    resized = Image.fromarray(square, "L").resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(resized, np.uint8)).unsqueeze(0)


def _to_grey(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) grey levels of any Pillow image."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


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

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        part = (stop - start, *self.shape[1:])
        if math.prod(part) == 0:
            return np.empty(part, self.dtype)
        if self.fortran_order:  # rows are not contiguous on disk; numpy writes this order only when asked
            mapped = np.memmap(self.path, self.dtype, "r", offset=self.offset, shape=self.shape, order="F")
            return np.array(mapped[start:stop])
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset + start * row_bytes)
                data = f.read((stop - start) * row_bytes)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror or e}") from None
        if len(data) != (stop - start) * row_bytes:
            raise InputError(f"{self.path}: the file became shorter while it was read")
        return np.frombuffer(data, self.dtype).reshape(part)


def load_array(path: Path, image_shape: tuple[int, int, int] = (1, 28, 28), layout: str = "auto") -> torch.Tensor:
    """A ``.npy`` file of images as uint8 ``(N, C, H, W)``; never unpickles anything."""
    return images_from_array(NpyFile(path), str(path), image_shape, layout)


def images_from_array(arr: np.ndarray | NpyFile, path: str, image_shape: tuple[int, int, int] = (1, 28, 28),
                      layout: str = "auto") -> torch.Tensor:
    """An array of images, ``(N, H, W)``, channels first ``(N, C, H, W)`` or channels last
    ``(N, H, W, C)`` (detected, or forced by ``layout``), uint8 in [0, 255] or float in
    [0, 1], as uint8 ``(N, C, H, W)``. ``path`` names the array in error messages."""
    parts = list(array_batches(arr, path, image_shape, layout))
    return torch.cat(parts) if parts else torch.empty((0, *image_shape), dtype=torch.uint8)


def array_batches(arr: np.ndarray | NpyFile, path: str, image_shape: tuple[int, int, int] = (1, 28, 28),
                  layout: str = "auto", batch_size: int = BATCH_IMAGES) -> Iterator[torch.Tensor]:
    """:func:`images_from_array` a batch at a time: uint8 ``(n, C, H, W)``, ``n <= batch_size``.

    The whole array is checked (shape, type, NaN, range) before the first batch; each
    batch is then read and converted on its own, so memory stays bounded for an array of
    any size (a :class:`NpyFile`, a ``numpy.memmap``).
    """
    to_nchw = _layout(tuple(arr.shape), arr.dtype, path, image_shape, layout)
    if len(arr.shape) == 2:  # one (H, W) image
        arr = np.asarray(arr[:arr.shape[0]])[None]
    n = arr.shape[0]
    scale = _value_scale(arr, n, batch_size, path)
    for start in range(0, n, batch_size):
        part = to_nchw(arr[start:start + batch_size])
        if part.dtype.kind == "f":
            part = np.rint(np.asarray(part, dtype=np.float64) * scale)
        yield torch.from_numpy(np.array(part, dtype=np.uint8, order="C"))  # a copy, never a view of arr


def _layout(shape: tuple[int, ...], dtype: np.dtype, path: str, image_shape: tuple[int, int, int],
            layout: str) -> Callable[[np.ndarray], np.ndarray]:
    """Check an array's type and shape; return what turns its rows into ``(n, C, H, W)``."""
    c, h, w = image_shape
    if dtype.kind not in "uif":
        raise InputError(f"{path}: array of {dtype} values; expected unsigned bytes or floats in [0, 1]")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) == 3 and shape[1:] == (h, w) and c == 1:
        return lambda a: a[:, None]  # (N, H, W) -> (N, 1, H, W)
    if len(shape) == 4:
        nchw, nhwc = shape[1:] == (c, h, w), shape[1:] == (h, w, c)
        if layout == "auto":
            layout = "nchw" if nchw else "nhwc" if nhwc else "?"
        if layout == "nhwc" and nhwc:
            return lambda a: a.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W): channels last -> first
        if layout == "nchw" and nchw:
            return lambda a: a
        raise InputError(f"{path}: shape {shape} is not {layout if layout != '?' else 'NCHW or NHWC'} "
                         f"images of {(c, h, w)}; expected (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})")
    raise InputError(f"{path}: shape {shape}; expected (N, {h}, {w}), (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})")


def _value_scale(arr: np.ndarray | NpyFile, n: int, batch_size: int, path: str) -> float:
    """Check every value, a batch at a time; return the factor that brings them to [0, 255]:
    255 for floats in [0, 1] (the tutorial's), else 1."""
    low, high = math.inf, -math.inf
    is_float = arr.dtype.kind == "f"
    for start in range(0, n, batch_size):
        part = arr[start:start + batch_size]
        if part.size == 0:
            continue
        if is_float and not np.isfinite(part).all():
            raise InputError(f"{path}: array holds NaN or infinite values")
        low, high = min(low, part.min().item()), max(high, part.max().item())
    if low > high:  # no values at all
        return 255.0 if is_float else 1.0
    if not is_float:
        if low < 0 or high > 255:
            raise InputError(f"{path}: integer values in [{low}, {high}]; expected [0, 255]")
        return 1.0
    scale = 255.0 if high <= 1.0 else 1.0
    if low < 0 or high * scale > 255.0:
        raise InputError(f"{path}: values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    return scale
