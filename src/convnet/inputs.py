"""Inputs for prediction: files, arrays and images turned into uint8 batches in a run's
input spec, a bounded number at a time.

Accepted: image files (any format and mode Pillow reads, any size: converted as
:func:`~convnet.formats.decode_image` says), ``.npy`` arrays and IDX files of images,
numpy arrays and torch tensors, PIL images. Arrays may be ``(N, H, W)``, channels first
``(N, C, H, W)`` or channels last ``(N, H, W, C)`` with C = 1 or 3, detected from the
shape (or forced with ``layout``: a shape that fits both is refused until it is); grey
images are repeated into RGB and colour turned to grey (ITU-R 601 luma, as Pillow does)
when the run's channels differ. Values are uint8 in [0, 255] or floats in [0, 1].
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.config import LAYOUTS
from convnet.datasets import InputSpec
from convnet.errors import DataError, InputError
from convnet.formats import NpyFile, decode_image, read_idx

BATCH_IMAGES = 4096  # images read, converted and predicted at a time: memory stays bounded for any input
SpecLike = InputSpec | tuple[int, int, int]


def as_spec(spec: SpecLike) -> InputSpec:
    """An :class:`InputSpec` for a bare ``(C, H, W)``: grey images are taken to be drawn
    Fashion-MNIST's way (a light object on black)."""
    if isinstance(spec, InputSpec):
        return spec
    c, h, w = spec
    return InputSpec(c, h, w, ("0", "1"), dark_background=c == 1)


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


def load_inputs(paths: Sequence[str | os.PathLike[str]], spec: SpecLike = (1, 28, 28), *,
                layout: str = "auto") -> Iterator[Inputs | InputError]:
    """Read each path whole; yield its images, or the error that names what is wrong with it.

    :func:`input_batches` reads the same inputs in bounded memory, whatever their size.
    """
    check_layout(layout)
    for p in paths:
        try:
            yield load_input(Path(p), spec, layout)
        except InputError as e:
            yield e


def input_batches(paths: Sequence[str | os.PathLike[str]], spec: SpecLike = (1, 28, 28), *,
                  layout: str = "auto", batch_size: int = BATCH_IMAGES) -> Iterator[Batch | InputError]:
    """The images of ``paths`` in batches of at most ``batch_size``, in order, and each
    file's error in its place.

    Memory stays bounded whatever the inputs: a ``.npy`` file is read from disk a batch at
    a time (never whole), and many small image files are gathered into one batch. Every
    check of a file (shape, type, values) is made before its first image is yielded.
    """
    check_layout(layout)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    names: list[str] = []
    parts: list[torch.Tensor] = []
    held = 0  # images in names/parts, not yet yielded
    for p in paths:
        try:
            for chunk_names, chunk in _file_chunks(Path(p), as_spec(spec), layout, batch_size):
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


def load_input(path: Path, spec: SpecLike = (1, 28, 28), layout: str = "auto") -> Inputs:
    """One file's images, whole: an image file, a ``.npy`` array or an IDX file."""
    names: list[str] = []
    parts: list[torch.Tensor] = []
    for chunk_names, chunk in _file_chunks(Path(path), as_spec(spec), layout, BATCH_IMAGES):
        names += chunk_names
        parts.append(chunk)
    return Inputs(str(path), names, torch.cat(parts))


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")


def _file_chunks(path: Path, spec: InputSpec, layout: str,
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
        yield [str(path)], load_image(path, spec).unsqueeze(0)
        return
    start = 0
    for images in array_batches(array, str(path), spec, layout, batch_size):
        yield [f"{path}[{i}]" for i in range(start, start + len(images))], images
        start += len(images)
    if start == 0:
        raise InputError(f"{path}: holds no images (shape {array.shape})")


def load_image(source: str | os.PathLike[str] | bytes | Any, spec: SpecLike = (1, 28, 28), *,
               invert: bool | None = None) -> torch.Tensor:
    """An image file (or its bytes, or a PIL image) as uint8 ``(C, H, W)`` in ``spec``.

    For a data set drawn as a light object on black (``spec.dark_background``), an image
    whose border is mostly light (a photo on a white background) is inverted unless
    ``invert`` says otherwise. See :func:`convnet.formats.decode_image`.
    """
    s = as_spec(spec)
    return torch.from_numpy(decode_image(source, s.channels, (s.height, s.width), dark_background=s.dark_background,
                                         invert=invert))


def load_array(path: Path, spec: SpecLike = (1, 28, 28), layout: str = "auto") -> torch.Tensor:
    """A ``.npy`` file of images as uint8 ``(N, C, H, W)``; never unpickles anything."""
    return images_from_array(NpyFile(path), str(path), spec, layout)


def images_from_array(arr: np.ndarray | NpyFile, path: str, spec: SpecLike = (1, 28, 28),
                      layout: str = "auto") -> torch.Tensor:
    """An array of images, ``(N, H, W)``, channels first ``(N, C, H, W)`` or channels last
    ``(N, H, W, C)`` (detected, or forced by ``layout``), uint8 in [0, 255] or float in
    [0, 1], as uint8 ``(N, C, H, W)`` in ``spec``. ``path`` names the array in error messages."""
    s = as_spec(spec)
    parts = list(array_batches(arr, path, s, layout))
    return torch.cat(parts) if parts else torch.empty((0, *s.shape), dtype=torch.uint8)


def array_batches(arr: np.ndarray | NpyFile, path: str, spec: SpecLike = (1, 28, 28),
                  layout: str = "auto", batch_size: int = BATCH_IMAGES) -> Iterator[torch.Tensor]:
    """:func:`images_from_array` a batch at a time: uint8 ``(n, C, H, W)``, ``n <= batch_size``.

    The whole array is checked (shape, type, NaN, range) before the first batch; each
    batch is then read and converted on its own, so memory stays bounded for an array of
    any size (a :class:`NpyFile`, a ``numpy.memmap``).
    """
    s = as_spec(spec)
    check_layout(layout)
    to_nchw = _layout(tuple(arr.shape), arr.dtype, path, s, layout)
    if len(arr.shape) == 2:  # one (H, W) image
        arr = np.asarray(arr[:arr.shape[0]])[None]
    n = arr.shape[0]
    scale = _value_scale(arr, n, batch_size, path)
    for start in range(0, n, batch_size):
        part = to_nchw(arr[start:start + batch_size])
        if part.dtype.kind == "f":
            part = np.rint(np.asarray(part, dtype=np.float64) * scale)
        part = np.array(part, dtype=np.uint8, order="C")  # a copy, never a view of arr
        yield torch.from_numpy(_to_channels(part, s.channels))


def _to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``(n, k, H, W)`` with k in (1, 3) as ``channels`` channels: grey repeated, or
    colour to grey by ITU-R 601 luma (Pillow's ``convert("L")``)."""
    k = a.shape[1]
    if k == channels:
        return a
    if k == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=1))
    rgb = a.astype(np.uint32)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16  # Pillow's integer arithmetic
    return luma.astype(np.uint8)[:, None]


def _layout(shape: tuple[int, ...], dtype: np.dtype, path: str, spec: InputSpec,
            layout: str) -> Callable[[np.ndarray], np.ndarray]:
    """Check an array's type and shape; return what turns its rows into ``(n, k, H, W)``, k in (1, 3)."""
    c, h, w = spec.shape
    want = f"(N, {h}, {w}), (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})"
    if dtype.kind not in "uif":
        raise InputError(f"{path}: array of {dtype} values; expected unsigned bytes or floats in [0, 1]")
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) == 3:
        if shape[1:] == (h, w):
            return lambda a: a[:, None]  # (N, H, W) -> (N, 1, H, W): grey
        raise InputError(f"{path}: shape {shape}; expected {want}")
    if len(shape) == 4:
        nchw = shape[1] in (1, 3) and shape[2:] == (h, w)
        nhwc = shape[3] in (1, 3) and shape[1:3] == (h, w)
        if layout == "auto":
            if nchw and nhwc:
                raise InputError(f"{path}: shape {shape} reads both as channels first (NCHW) and channels last "
                                 "(NHWC); say which with --layout nchw or --layout nhwc")
            layout = "nchw" if nchw else "nhwc" if nhwc else "?"
        if layout == "nhwc" and nhwc:
            return lambda a: a.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W): channels last -> first
        if layout == "nchw" and nchw:
            return lambda a: a
        raise InputError(f"{path}: shape {shape} is not {layout if layout != '?' else 'NCHW or NHWC'} "
                         f"images of {h}x{w} with 1 or 3 channels; expected {want}")
    raise InputError(f"{path}: shape {shape}; expected {want}")


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
