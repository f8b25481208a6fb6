"""Images in a model's input spec, from whatever holds them: numpy arrays and torch
tensors in any layout, PIL images, image files; and labels and splits for training.

Arrays may be ``(N, H, W)``, channels first ``(N, C, H, W)`` or channels last
``(N, H, W, C)`` with C = 1 or 3, detected from the shape (or forced with ``layout``: a
shape that fits both is refused until it is); grey images are repeated into RGB and
colour turned to grey (ITU-R 601 luma, as Pillow does) when the spec's channels differ.
Values are uint8 in [0, 255] or floats in [0, 1]. Image files and PIL images are
converted as :func:`~convnet.data.imagefiles.decode_image` says. Files named for prediction,
read a bounded batch at a time, are :mod:`convnet.data.inputfiles`' job.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from convnet.core.errors import InputError
from convnet.data.arrayfiles import NpyFile
from convnet.data.dataset import DiskImages, InputSpec, Split
from convnet.data.imagefiles import decode_image, default_size, image_header, is_colour
from convnet.data.options import LAYOUTS

BATCH_IMAGES = 4096  # images read, converted and predicted at a time: memory stays bounded for any input


SpecLike = InputSpec | tuple[int, int, int]


def as_spec(spec: SpecLike) -> InputSpec:
    """An :class:`InputSpec` for a bare ``(C, H, W)`` (images taken as they are drawn: no
    inversion; a run's own spec says whether its data set wants one)."""
    if isinstance(spec, InputSpec):
        return spec
    c, h, w = spec
    return InputSpec(c, h, w, ("0", "1"))


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")


def load_image(source: str | os.PathLike[str] | bytes | Any, spec: SpecLike, *,
               invert: bool | None = None) -> torch.Tensor:
    """An image file (or its bytes, or a PIL image) as uint8 ``(C, H, W)`` in ``spec``.

    For a data set drawn as a light object on black (``spec.dark_background``), an image
    whose border is mostly light (a photo on a white background) is inverted unless
    ``invert`` says otherwise. See :func:`convnet.data.imagefiles.decode_image`.
    """
    s = as_spec(spec)
    return torch.from_numpy(decode_image(source, s.channels, (s.height, s.width), dark_background=s.dark_background,
                                         invert=invert))


def images_from_array(arr: np.ndarray | NpyFile, path: str, spec: SpecLike,
                      layout: str = "auto") -> torch.Tensor:
    """An array of images, ``(N, H, W)``, channels first ``(N, C, H, W)`` or channels last
    ``(N, H, W, C)`` (detected, or forced by ``layout``), uint8 in [0, 255] or float in
    [0, 1], as uint8 ``(N, C, H, W)`` in ``spec``. ``path`` names the array in error messages."""
    s = as_spec(spec)
    parts = list(array_batches(arr, path, s, layout))
    return torch.cat(parts) if parts else torch.empty((0, *s.shape), dtype=torch.uint8)


def array_batches(arr: np.ndarray | NpyFile, path: str, spec: SpecLike,
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


MIN_SIDE = 8  # pixels: the smallest images a model takes (convnet.models.networks)


ACCEPTED = ("a numpy array or torch tensor of images (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3, or "
            "flattened square grey images (N, H*W), uint8 in [0, 255] or float in [0, 1]; a list of PIL images; "
            "a list of image file paths")


def as_images(X: Any, spec: SpecLike | None = None, *, layout: str = "auto", name: str = "X") -> torch.Tensor:
    """Images of any kind a notebook holds as uint8 ``(N, C, H, W)``: arrays and tensors
    (see :data:`ACCEPTED`), a list of PIL images, a list of image file paths.

    With ``spec`` the images are converted to it (channels; files and PIL images are
    also resized, as :func:`load_image` does); without it they keep their own size and
    channels, the layout of a 4-d array being read from its shape. ``X`` is always a
    collection: a 2-d array is N flattened images, one per row (scikit-learn's rows are
    samples), never one image.

    Raises:
        InputError: naming ``name``, what was given and what is accepted.
    """
    check_layout(layout)
    s = as_spec(spec) if spec is not None else None
    if isinstance(X, torch.Tensor):
        if s is not None and X.dtype == torch.uint8 and tuple(X.shape[1:]) == s.shape and layout != "nhwc":
            return X  # already what a model takes: no copy
        X = X.detach().cpu()
        X = (X.float() if X.is_floating_point() else X).numpy()
    elif isinstance(X, list | tuple) and X and all(_is_image_source(x) for x in X):
        return _images_from_sources(list(X), s, name)
    elif hasattr(X, "tocsr") and hasattr(X, "nnz"):  # a scipy sparse matrix or array
        raise InputError(f"{name}: a sparse {type(X).__name__} was given; sparse input is not supported, images "
                         f"are dense: expected {ACCEPTED}")
    elif isinstance(X, str | bytes | os.PathLike | dict | set) or np.isscalar(X) or X is None or (
            not isinstance(X, list | tuple | np.ndarray) and not hasattr(X, "__array__")):
        raise InputError(f"{name}: a {type(X).__name__} was given; expected {ACCEPTED}")
    try:
        arr = np.asarray(X)
    except (ValueError, TypeError) as e:
        raise InputError(f"{name}: not an array of images ({e}); expected {ACCEPTED}") from None
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (ValueError, TypeError) as e:
            raise InputError(f"{name}: holds values that are not numbers ({e}); expected {ACCEPTED}") from None
    _check_values(arr, name)
    if arr.ndim == 2:
        arr = _unflatten(arr, s, name)
    if arr.ndim not in (3, 4):
        raise InputError(f"{name}: shape {arr.shape} is not a collection of images; expected {ACCEPTED}")
    if s is None:
        s = as_spec(_own_shape(arr.shape, layout, name))
        if min(s.height, s.width) < MIN_SIDE:
            raise InputError(f"{name}: images of {s.height}x{s.width} pixels (shape {arr.shape}); models need at "
                             f"least {MIN_SIDE}x{MIN_SIDE}")
        layout = "nchw" if arr.ndim == 4 and arr.shape[1:] == s.shape else "nhwc" if arr.ndim == 4 else layout
    return images_from_array(arr, name, s, layout)


def _check_values(arr: np.ndarray, name: str) -> None:
    """Refuse NaN, infinities and negative values before any shape is looked at (pixels
    are never negative), naming them as scikit-learn's checks expect."""
    if arr.dtype.kind not in "if" or arr.size == 0:
        return  # other types are refused with the shape, by images_from_array
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name}: array holds NaN or infinite values; pixels are uint8 in [0, 255] or floats "
                         "in [0, 1]")
    low = arr.min()
    if low < 0:
        raise InputError(f"{name}: Negative values in data (the smallest is {low:g}); pixels are uint8 in [0, 255] "
                         "or floats in [0, 1]")


def _is_image_source(x: Any) -> bool:
    return isinstance(x, str | os.PathLike | Image.Image)


def _unflatten(arr: np.ndarray, spec: InputSpec | None, name: str) -> np.ndarray:
    """``(N, H*W)`` rows of flattened grey images as ``(N, H, W)``: square when no spec says the size."""
    n, f = arr.shape
    if spec is not None:
        if f != spec.height * spec.width:
            raise InputError(f"{name}: shape {arr.shape}: {f} values per row, but the model takes "
                             f"{spec.height}x{spec.width} images ({spec.height * spec.width} values per flattened "
                             f"grey image); expected {ACCEPTED}")
        return arr.reshape(n, spec.height, spec.width)
    side = math.isqrt(f)
    if f < MIN_SIDE * MIN_SIDE:
        raise InputError(f"{name}: {f} feature(s) (shape={arr.shape}) while a minimum of {MIN_SIDE * MIN_SIDE} is "
                         f"required: a row is a flattened square image of at least {MIN_SIDE}x{MIN_SIDE} pixels "
                         f"(tabular data is not images); expected {ACCEPTED}")
    if side * side != f:
        raise InputError(f"{name}: shape {arr.shape}: {f} values per row is not a flattened square image "
                         f"(tabular data is not images); expected {ACCEPTED}")
    return arr.reshape(n, side, side)


def _own_shape(shape: tuple[int, ...], layout: str, name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an ``(N, H, W)`` or 4-d array's images, the layout read from the shape."""
    if len(shape) == 3:
        return 1, shape[1], shape[2]
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if layout == "auto" and first and last:
        raise InputError(f"{name}: shape {shape} reads both as channels first (NCHW) and channels last (NHWC); "
                         "say which with layout='nchw' or layout='nhwc'")
    if layout in ("auto", "nchw") and first:
        return shape[1], shape[2], shape[3]
    if layout in ("auto", "nhwc") and last:
        return shape[3], shape[1], shape[2]
    raise InputError(f"{name}: shape {shape} is not {layout.upper() if layout != 'auto' else 'NCHW or NHWC'} "
                     f"images with 1 or 3 channels; expected {ACCEPTED}")


def _images_from_sources(sources: list[Any], spec: InputSpec | None, name: str) -> torch.Tensor:
    """PIL images or image files as uint8 ``(N, C, H, W)``: in ``spec``, or else in the
    most common size (at most 64 pixels a side) and grey unless one has colour, each as it is
    (never inverted)."""
    invert = None
    if spec is None:
        headers = [(x.size[0], x.size[1], is_colour(x)) if isinstance(x, Image.Image) else image_header(x)
                   for x in sources]
        size = default_size([(h, w) for w, h, _ in headers])
        spec, invert = InputSpec(3 if any(c for _, _, c in headers) else 1, *size, ("0", "1")), False
    return torch.stack([load_image(x, spec, invert=invert) for x in sources])


def spec_of(images: torch.Tensor, classes: Sequence[str], *, hflip: bool = True) -> InputSpec:
    """The input spec of training images uint8 ``(N, C, H, W)`` given as arrays: their
    channels and size, these classes, and a dark background where grey images' borders
    are mostly dark (MNIST, Fashion-MNIST, scikit-learn's digits)."""
    _, c, h, w = images.shape
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    dark = c == 1 and float(border.float().mean()) <= 127
    return InputSpec(c, h, w, tuple(classes), dark_background=dark, hflip=hflip)


def as_labels(y: Any, n: int, num_classes: int, name: str = "y") -> torch.Tensor:
    """Class indices ``(n,)`` int64 in ``0..num_classes-1`` from an array, tensor or list.

    Raises:
        InputError: a wrong shape or length, or values that are not class indices.
    """
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    try:
        a = np.asarray(y)
    except (ValueError, TypeError) as e:
        raise InputError(f"{name}: not an array of class indices ({e})") from None
    if a.ndim != 1 or len(a) != n:
        raise InputError(f"{name}: shape {a.shape}; expected ({n},): one class index per image")
    if a.dtype.kind not in "ui" or (n and (a.min() < 0 or a.max() >= num_classes)):
        shown = f"values in [{a.min()}, {a.max()}]" if n and a.dtype.kind in "uif" else f"{a.dtype} values"
        raise InputError(f"{name}: {shown}; expected integer class indices 0..{num_classes - 1}")
    return torch.from_numpy(a.astype(np.int64))


def as_split(data: Any, spec: InputSpec, name: str = "data") -> Split:
    """A split from a :class:`Split` whose images are in any kind :func:`as_images`
    accepts (a uint8 ``(N, C, H, W)`` tensor in ``spec`` passes untouched), or from a
    pair ``(images, labels)``; labels are class indices.

    Raises:
        InputError: naming what was given and what is accepted.
    """
    if isinstance(data, Split):
        images, labels = data.images, data.labels
    elif isinstance(data, tuple) and len(data) == 2:
        images, labels = data
    else:
        raise InputError(f"{name}: a {type(data).__name__} was given; expected a convnet.Split or a pair "
                         f"(images, labels) with images as {ACCEPTED}")
    if not isinstance(images, DiskImages):
        images = as_images(images, spec, name=f"{name} images")
    if isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.shape == (len(images),):
        ok = len(labels) == 0 or (int(labels.min()) >= 0 and int(labels.max()) < spec.num_classes)
        if ok:
            return data if isinstance(data, Split) and images is data.images else Split(images, labels)
    return Split(images, as_labels(labels, len(images), spec.num_classes, f"{name} labels"))
