"""Options declared once: a dataclass field made with :func:`option` is the whole
declaration of a setting (its name, type and default from the field; its help, choices
and the interfaces that take it in the field's metadata).

Everything else is made from the declarations (:func:`declared`): the command line's
flags (``convnet train``, ``convnet tune``), the keys a recipe file holds, and the
parameters of :class:`~convnet.ConvNetClassifier`. A test checks that each interface
takes exactly the options that say so. This module imports nothing heavy, so the
command line builds its parser without loading PyTorch.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

# The interfaces an option can be taken by:
TRAIN = "train"  # a flag of `convnet train`
TUNE = "tune"  # a flag of `convnet tune`: fixes the setting for every trial (--param searches it)
RECIPE = "recipe"  # a key of a recipe (named or a file): the recipe's value, when not given
ESTIMATOR = "estimator"  # a parameter of ConvNetClassifier
TUTORIAL = "tutorial"  # a flag of `convnet tutorial`
BENCH = "bench"  # a flag of `convnet bench`
EVERYWHERE = frozenset({TRAIN, TUNE, RECIPE, ESTIMATOR})  # a recipe's training setting
DEVICES = ("auto", "cpu", "cuda")  # where every command computes: --device
PRECISIONS = ("auto", "fp32", "bf16")  # the training arithmetic: --precision


@dataclass(frozen=True)
class Option:
    """One declared option.

    Attributes:
        name: the field's name: the config key, the recipe key and (unless ``alias``)
            the estimator's parameter; the flag is ``--`` and the name with dashes
            (unless ``flag`` says otherwise).
        type: the field's type (``int``, ``float``, ``str``, ``bool``, ``Path``, ...).
        default: the field's default.
        help: what it does, without its default (:meth:`help_text` adds it).
        choices: the values it takes, where it takes a few.
        takes: the interfaces that take it (:data:`TRAIN`, :data:`TUNE`, ...).
        alias: scikit-learn's name for it as an estimator parameter (``random_state``).
        shown: the default as help states it, where the field's default is not what a
            user gets (a recipe's value, a data set's answer).
        metavar: the flag's placeholder in ``--help``.
        flag: the flag, where it is not ``--name-with-dashes``.
        parse: turns a flag's text into the value (default: ``type``).
    """

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    takes: frozenset[str] = frozenset()
    alias: str | None = None
    shown: str | None = None
    metavar: str | None = None
    flag: str | None = None
    parse: Callable[[str], Any] | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def param_name(self) -> str:
        """The estimator's parameter: scikit-learn's name where it has one."""
        return self.alias or self.name

    @property
    def base_type(self) -> Any:
        """The type without ``| None``."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        return args[0] if len(args) == 1 and typing.get_origin(self.type) in (typing.Union, _UnionType) else self.type

    @property
    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if RECIPE in self.takes:
            return "the recipe's"
        if self.default is None or self.default == ():
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return str(self.default)

    def help_text(self) -> str:
        """The help line, its default stated: ``--help`` shows it, the docs list it."""
        return f"{self.help} (default: {self.default_text})".replace("%", "%%")


_UnionType = type(int | None)


def option(default: Any, help: str, *, choices: tuple[Any, ...] = (), takes: frozenset[str] | set[str] = frozenset(),
           alias: str | None = None, shown: str | None = None, metavar: str | None = None, flag: str | None = None,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field that declares an option (see :class:`Option`)."""
    meta = {"help": help, "choices": tuple(choices), "takes": frozenset(takes), "alias": alias, "shown": shown,
            "metavar": metavar, "flag": flag, "parse": parse}
    return field(default=default, metadata={"option": meta})


def declared(*classes: type) -> list[Option]:
    """The options the fields of ``classes`` declare, in order."""
    found = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            meta = f.metadata.get("option")
            if meta is not None:
                found.append(Option(f.name, hints[f.name], f.default, **meta))
    return found


def taken_by(interface: str, *classes: type) -> list[Option]:
    """The options of ``classes`` that ``interface`` takes."""
    return [o for o in declared(*classes) if interface in o.takes]
