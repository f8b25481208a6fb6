"""What a search may change: ``convnet tune``'s space, one :class:`Param` per setting.

The default space lies around the base recipe (:func:`default_space`); ``--param`` and
``--space FILE`` narrow or widen it, read by :func:`parse_param` from text or TOML values.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convnet.core.errors import ConvnetError
from convnet.training.config import TrainConfig
from convnet.training.recipes import RECIPE_FIELDS


@dataclass(frozen=True)
class Param:
    """One searched setting: a ``float`` or ``int`` range (``log``: on a log scale), a
    ``choice`` among values, or a ``fixed`` value (narrowed to one)."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind in ("fixed", "choice"):  # a fixed value too, so that the trial records it
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind in ("fixed", "choice"):
            return ", ".join(map(str, self.choices))
        return f"{self.low:g} to {self.high:g}" + (" (log)" if self.log else "")


def default_space(base: TrainConfig) -> dict[str, Param]:
    """The search space around ``base``: its learning rate /10 to x3, its epochs /4 to x1,
    its batch size /2, x1 or x2, weight decay 1e-5 to 1e-3, label smoothing 0 to 0.2, and
    its model or resnet20."""
    return {
        "lr": Param("lr", "float", base.lr / 10, base.lr * 3, log=True),
        "weight_decay": Param("weight_decay", "float", 1e-5, 1e-3, log=True),
        "epochs": Param("epochs", "int", max(1, base.epochs // 4), base.epochs),
        "label_smoothing": Param("label_smoothing", "float", 0.0, 0.2),
        "batch_size": Param("batch_size", "choice", choices=(max(1, base.batch_size // 2), base.batch_size,
                                                             base.batch_size * 2)),
        "model": Param("model", "choice", choices=tuple(dict.fromkeys((base.model, "resnet20")))),
    }


def parse_param(name: str, spec: Any) -> Param:
    """A setting's search from text (``LOW:HIGH``, ``LOW:HIGH:log``, ``A,B,C`` or one
    value) or from a TOML value (a number, a string or a list of choices).

    Raises:
        ConvnetError: not a recipe setting, or a spec that does not fit its type.
    """
    if name not in RECIPE_FIELDS:
        raise ConvnetError(f"--param {name}: not a setting a search can change; choose from "
                           f"{', '.join(RECIPE_FIELDS)}")
    want = type(getattr(TrainConfig(), name))

    def value(text: Any) -> Any:
        if isinstance(text, want) and not (want is int and isinstance(text, bool)):
            return text
        if want is float and isinstance(text, int) and not isinstance(text, bool):
            return float(text)
        if isinstance(text, str):
            text = text.strip()
            try:
                return {"true": True, "false": False}[text.lower()] if want is bool else want(text)
            except (KeyError, ValueError):
                pass
        raise ConvnetError(f"--param {name}={spec}: {text!r} is not a {want.__name__}")

    if isinstance(spec, list):
        return Param(name, "choice", choices=tuple(value(v) for v in spec))
    if isinstance(spec, str) and ":" in spec and want in (int, float):
        parts = spec.split(":")
        log = len(parts) == 3 and parts[2].strip() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ConvnetError(f"--param {name}={spec}: a range is LOW:HIGH or LOW:HIGH:log")
        low, high = value(parts[0]), value(parts[1])
        if not low < high or (log and low <= 0):
            raise ConvnetError(f"--param {name}={spec}: LOW must be below HIGH (and above 0 on a log scale)")
        return Param(name, want.__name__, low, high, log=log)
    if isinstance(spec, str) and "," in spec:
        return Param(name, "choice", choices=tuple(value(v) for v in spec.split(",")))
    return Param(name, "fixed", choices=(value(spec),))


def read_space(path: Path) -> dict[str, Any]:
    """A search-space file: TOML, each key a setting and its search as :func:`parse_param`
    reads it (e.g. ``lr = "0.01:0.5:log"``, ``model = ["fastnet", "resnet20"]``)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvnetError(f"--space {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConvnetError(f"--space {path}: not a readable TOML file ({e})") from None
