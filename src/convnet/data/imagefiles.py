"""Image files: any format and mode Pillow reads, to uint8 arrays of one size and
channel count, and the size a folder of them is given by default.

Nothing here imports torch, so the worker processes that decode a folder of images
start fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from convnet.core.errors import InputError

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
        return img.size[0], img.size[1], is_colour(img)  # a palette's colours are decoded: may fail


def is_colour(img: Image.Image) -> bool:
    """Whether an image holds colour: a colour mode, or a palette whose entries are not all grey."""
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


MAX_DEFAULT_SIDE = 64  # the default size is the most common one, scaled down to at most this


def default_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most common ``(H, W)``, scaled down (aspect kept) so that its longer side is at
    most :data:`MAX_DEFAULT_SIDE`; ties go to the larger size."""
    counts = Counter(sizes)
    h, w = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    side = max(h, w)
    if side > MAX_DEFAULT_SIDE:
        h, w = max(8, round(h * MAX_DEFAULT_SIDE / side)), max(8, round(w * MAX_DEFAULT_SIDE / side))
    return h, w
