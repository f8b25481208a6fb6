"""The input spec: what a trained model expects of an image (channels, size, class names
and preprocessing), as plain data. Every run records it, and everything that feeds a
model (predict, evaluate, report, export, serve) reads it from there. No torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from convnet.core.errors import RunError


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: uint8 images ``(N, channels, height, width)`` of these classes.

    Attributes:
        channels: 1 (grey) or 3 (RGB).
        height, width: pixels.
        classes: class names, index = label.
        dark_background: the data set draws a light object on black (MNIST, Fashion-MNIST):
            a picture with a light background is inverted before it is predicted.
        hflip: a left-right mirror keeps the class (true of clothes and photos, not of
            digits or letters): recipes use flips for augmentation and test-time
            augmentation only where this holds.
        scale: the preprocessing inside the model's input: ``x * scale``, uint8 to [0, 1].
        mean, std: per channel, for a model started from weights trained on normalized
            images (ImageNet's): the model takes ``(x * scale - mean) / std`` and applies it
            itself (see :func:`convnet.models.networks.create_model`); None: no normalization.
    """

    channels: int
    height: int
    width: int
    classes: tuple[str, ...]
    dark_background: bool = False
    hflip: bool = True
    scale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.channels, self.height, self.width

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        for key in ("mean", "std"):  # runs without them read as before
            d[key] = list(d[key]) if d[key] is not None else None
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "config.json") -> InputSpec:
        """Read a spec back, checking every field.

        Raises:
            RunError: a missing or malformed field, naming it.
        """
        if not isinstance(d, dict):
            raise RunError(f"{where}: the input spec is not an object; the run folder is damaged")
        checks = {"channels": lambda v: type(v) is int and v in (1, 3), "height": lambda v: type(v) is int and v > 0,
                  "width": lambda v: type(v) is int and v > 0,
                  "classes": lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v),
                  "dark_background": lambda v: isinstance(v, bool), "hflip": lambda v: isinstance(v, bool),
                  "scale": lambda v: type(v) in (float, int) and math.isfinite(v) and v > 0,
                  "mean": lambda v: _per_channel(v, d.get("channels"), lambda x: True),
                  "std": lambda v: _per_channel(v, d.get("channels"), lambda x: x > 0)}
        for key, ok in checks.items():
            if key not in d and key in ("dark_background", "hflip", "scale", "mean", "std"):
                continue
            if not ok(d.get(key)):
                raise RunError(f"{where}: missing or malformed input.{key} ({d.get(key)!r}); the run folder is damaged")
        if ("mean" in d) != ("std" in d):
            raise RunError(f"{where}: input.mean and input.std come together; the run folder is damaged")
        mean, std = (tuple(float(x) for x in d[k]) if k in d else None for k in ("mean", "std"))
        return cls(d["channels"], d["height"], d["width"], tuple(d["classes"]), d.get("dark_background", False),
                   d.get("hflip", True), float(d.get("scale", 1 / 255)), mean, std)


def _per_channel(value: Any, channels: Any, ok: Any) -> bool:
    """A list of one finite number per channel, each ``ok``."""
    return (isinstance(value, list) and len(value) == channels and all(
        type(x) in (float, int) and math.isfinite(x) and ok(x) for x in value))
