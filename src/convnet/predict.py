"""Prediction: logits for a batch of images, and turning files into such batches.

:func:`infer` is the one forward pass that evaluation, the CLI and the API all use.
:func:`load_inputs` reads image files (any size or colour mode), ``.npy`` arrays in
channels-first ``(N, 1, H, W)`` or channels-last ``(N, H, W, 1)`` layout, and IDX files,
and gives uint8 ``(N, 1, H, W)`` tensors the model's size.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
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
          batch_size: int | None = None) -> torch.Tensor:
    """Logits ``(N, num_classes)`` (float32, on the CPU) for ``images``.

    Args:
        model: any registered model, already on ``engine.device``.
        images: uint8 ``(N, C, H, W)`` in [0, 255] or float in [0, 1].
        engine: device and precision; defaults to the CPU fast path.
        batch_size: images per forward pass; defaults to ``engine.infer_batch_size``.
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
                logits = model(x)
            out.append(logits.float().cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)


@dataclass(frozen=True)
class Prediction:
    labels: torch.Tensor  # (N,) int64 class indices
    probabilities: torch.Tensor  # (N, num_classes), rows sum to 1


def predict(model: nn.Module, images: torch.Tensor, *, engine: Engine | None = None) -> Prediction:
    """Class indices and softmax probabilities for ``images`` (see :func:`infer`)."""
    probs = infer(model, images, engine=engine).softmax(dim=1)
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


@dataclass(frozen=True)
class Inputs:
    """Images from one file: names (one per image) and uint8 ``(N, C, H, W)``."""

    path: str
    names: list[str]
    images: torch.Tensor


def load_inputs(paths: Sequence[str | os.PathLike[str]], image_shape: tuple[int, int, int] = (1, 28, 28), *,
                layout: str = "auto") -> Iterator[Inputs | InputError]:
    """Read each path; yield its images, or the error that names what is wrong with it."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    for p in paths:
        try:
            yield load_input(Path(p), image_shape, layout)
        except InputError as e:
            yield e


def load_input(path: Path, image_shape: tuple[int, int, int] = (1, 28, 28), layout: str = "auto") -> Inputs:
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = load_array(path, image_shape, layout)
        return Inputs(str(path), [f"{path}[{i}]" for i in range(len(arr))], arr)
    if "idx" in path.name or suffix == ".gz" or path.name.endswith("ubyte"):
        try:
            data = read_idx(path)
        except DataError as e:
            raise InputError(str(e)) from None
        arr = images_from_array(data, str(path), image_shape, "nchw" if data.ndim == 4 else layout)
        return Inputs(str(path), [f"{path}[{i}]" for i in range(len(arr))], arr)
    return Inputs(str(path), [str(path)], load_image(path, image_shape[1:]).unsqueeze(0))


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
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def load_array(path: Path, image_shape: tuple[int, int, int] = (1, 28, 28), layout: str = "auto") -> torch.Tensor:
    """A ``.npy`` file of images as uint8 ``(N, C, H, W)``; never unpickles anything."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise InputError(f"{path}: not a valid .npy file (no NumPy header); save arrays with numpy.save")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as e:
        raise InputError(f"{path}: cannot read this .npy without unpickling ({e}); save a numeric array") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: not a valid .npy file ({e})") from None
    return images_from_array(arr, str(path), image_shape, layout)


def images_from_array(arr: np.ndarray, path: str, image_shape: tuple[int, int, int] = (1, 28, 28),
                      layout: str = "auto") -> torch.Tensor:
    """An array of images, ``(N, H, W)``, channels first ``(N, C, H, W)`` or channels last
    ``(N, H, W, C)`` (detected, or forced by ``layout``), uint8 in [0, 255] or float in
    [0, 1], as uint8 ``(N, C, H, W)``. ``path`` names the array in error messages."""
    c, h, w = image_shape
    if arr.dtype.kind not in "uif" or arr.dtype.kind == "b":
        raise InputError(f"{path}: array of {arr.dtype} values; expected unsigned bytes or floats in [0, 1]")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 3 and arr.shape[1:] == (h, w) and c == 1:
        arr = arr[:, None]
    elif arr.ndim == 4:
        nchw, nhwc = arr.shape[1:] == (c, h, w), arr.shape[1:] == (h, w, c)
        if layout == "auto":
            layout = "nchw" if nchw else "nhwc" if nhwc else "?"
        if layout == "nhwc" and nhwc:
            arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W): channels last -> first
        elif not (layout == "nchw" and nchw):
            raise InputError(f"{path}: shape {arr.shape} is not {layout if layout != '?' else 'NCHW or NHWC'} "
                             f"images of {(c, h, w)}; expected (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})")
    else:
        raise InputError(f"{path}: shape {arr.shape}; expected (N, {h}, {w}), (N, {c}, {h}, {w}) or (N, {h}, {w}, {c})")
    if arr.dtype.kind == "f":
        a = np.asarray(arr, dtype=np.float64)
        if not np.isfinite(a).all():
            raise InputError(f"{path}: array holds NaN or infinite values")
        scale = 255.0 if a.size == 0 or a.max() <= 1.0 else 1.0  # floats in [0, 1] (the tutorial's), or [0, 255]
        if a.size and (a.min() < 0 or a.max() * scale > 255.0):
            raise InputError(f"{path}: values in [{a.min():g}, {a.max():g}]; expected [0, 1] or [0, 255]")
        arr = np.rint(a * scale).astype(np.uint8)
    elif arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InputError(f"{path}: integer values in [{arr.min()}, {arr.max()}]; expected [0, 255]")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8))
