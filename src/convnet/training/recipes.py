"""Recipes: named bundles of training settings, recipe files (``convnet tune`` writes them),
and how a run's config is resolved from a recipe, the settings given and the data
(:func:`resolve_run`). No torch."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from convnet.core.errors import ConvnetError
from convnet.core.options import RECIPE, taken_by
from convnet.training.config import TrainConfig, check_config

# Named recipes: `convnet train --recipe NAME`; flags given on the command line override them.
# Chosen on a validation split (--val-split 0.1), never on the test set; see docs/performance.md for their numbers.
_CPU = TrainConfig(model="fastnet", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, epochs=24,
                   batch_size=128, label_smoothing=0.1, augment="flip-translate", translate_px=2, schedule="linear",
                   warmup_epochs=1.0, tta=True, ema=0.995)
RECIPES: dict[str, TrainConfig] = {
    "tutorial": TrainConfig(shuffle=False),
    "cpu": _CPU,
    # The cpu recipe with fastnet-lean for 21 epochs: where training is fp32 (no native bfloat16), within the time
    # the tutorial's Adam-15 script takes. Chosen on the validation splits of seeds 0 and 1 (docs/performance.md,
    # "A recipe for fp32"). Validation scored every 3rd epoch and the last: each check costs 7 % of an epoch there,
    # and every run measured kept its last epoch.
    "cpu-fp32": replace(_CPU, model="fastnet-lean", epochs=21, val_every=3),
    "gpu": TrainConfig(model="airnet", optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       epochs=12, batch_size=512, label_smoothing=0.1, augment="flip-translate", translate_px=2,
                       schedule="linear", warmup_epochs=1.0, tta=True, ema=0.0),
    "best": TrainConfig(model="airnet-wide", optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                        epochs=60, batch_size=512, label_smoothing=0.1, augment="flip-translate", translate_px=2,
                        schedule="linear", warmup_epochs=2.0, tta=True, ema=0.0),
}
# The default recipe by what a run trains on (:attr:`convnet.models.engine.Engine.recipe_kind`), and how the first line
# of `convnet train` and `convnet recipes` say where it is the default.
DEFAULT_RECIPE = {"cpu": "cpu", "cpu-fp32": "cpu-fp32", "cuda": "gpu"}
DEFAULT_WHERE = {"cpu": "on a CPU that trains in bfloat16", "cpu-fp32": "where training is fp32: chosen for it",
                 "cuda": "on a GPU"}


RECIPE_FIELDS = tuple(o.name for o in taken_by(RECIPE, TrainConfig))  # what a recipe holds
RECIPE_BASE = "cpu"  # the named recipe a recipe file's settings are laid over, unless its `base` names another


def recipe(name: str) -> TrainConfig:
    """A copy of the named recipe's config, or the one a recipe file holds
    (:func:`read_recipe_file`: a ``.toml`` file, or any path to an existing file)."""
    if name in RECIPES:
        return replace(RECIPES[name])
    if name.endswith(".toml") or os.sep in name or os.path.isfile(name):
        return read_recipe_file(Path(name))
    raise ConvnetError(f"unknown --recipe {name!r}; choose one of: {', '.join(RECIPES)}, or give a recipe file "
                       "(.toml, as `convnet tune` writes)")


def read_recipe_file(path: Path, where: str = "--recipe") -> TrainConfig:
    """A recipe file: TOML, each key a setting of :class:`TrainConfig` by name (those of
    :data:`RECIPE_FIELDS`), laid over the named recipe ``base`` (:data:`RECIPE_BASE`
    unless the file says otherwise). ``where`` names, in errors, what gave the path.

    Raises:
        ConvnetError: no such file, not TOML, an unknown key or a value of the wrong type.
    """
    try:
        found = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvnetError(f"{where} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConvnetError(f"{where} {path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConvnetError(f"{where} {path}: not a TOML file ({e})") from None
    base = found.pop("base", RECIPE_BASE)
    if not isinstance(base, str) or base not in RECIPES:
        raise ConvnetError(f"{where} {path}: base = {base!r} is not a named recipe; choose one of: "
                           f"{', '.join(RECIPES)}")
    unknown = sorted(set(found) - set(RECIPE_FIELDS))
    if unknown:
        raise ConvnetError(f"{where} {path}: unknown setting {', '.join(unknown)}; a recipe holds "
                           f"{', '.join(RECIPE_FIELDS)} (and base)")
    return TrainConfig.from_dict(found, base=RECIPES[base], where=f"{where} {path}")


def recipe_text(config: TrainConfig, comment: str, base: str = RECIPE_BASE) -> str:
    """A recipe file holding ``config``'s recipe settings (:func:`read_recipe_file` reads it
    back), headed by ``comment``."""
    lines = [f"# {line}" for line in comment.splitlines()] + [f"base = {json.dumps(base)}"]
    for name in RECIPE_FIELDS:
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConvnetError(f"recipe setting {name} = {value}: TOML has no such number")
        lines.append(f"{name} = {str(value).lower() if isinstance(value, bool) else json.dumps(value)}")
    return "\n".join(lines) + "\n"


def resolve_config(recipe_name: str | TrainConfig | None = None, overrides: dict[str, Any] | None = None, *,
                   kind: str = "cpu", hflip: bool = True) -> TrainConfig:
    """The recipe (by default the device's, or the tutorial's for a faithful run) with every
    given setting laid over it, fitted to the data: where a mirror changes an image's class
    (``hflip=False``: digits, letters) the recipe's flips are left out. Not checked: see
    :func:`resolve_run`.

    Args:
        recipe_name: a name in :data:`RECIPES`, a recipe file, or a config used as the
            recipe (a search's trial); None for the default.
        overrides: settings given explicitly (None values are ignored).
        kind: what the run trains on (:data:`DEFAULT_RECIPE`'s keys): picks the default recipe.
        hflip: whether the data set allows mirrored images.

    Raises:
        ConvnetError: an unknown recipe, or flips asked for explicitly on data that forbids them.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    faithful = bool(given.get("faithful"))
    config = replace(recipe_name) if isinstance(recipe_name, TrainConfig) else \
        recipe(recipe_name or ("tutorial" if faithful else DEFAULT_RECIPE.get(kind, "cpu")))
    if given.get("optimizer", "sgd") != "sgd" and "nesterov" not in given:
        config.nesterov, config.momentum = False, 0.0  # the recipe's SGD momentum does not carry over
    for f in fields(TrainConfig):
        if f.name in given:
            setattr(config, f.name, given[f.name])
    if faithful:  # the tutorial's training: its order, every training image
        config.shuffle = False
        if not given.get("val_split"):
            config.val_split = 0.0
    if not hflip:
        if "flip" in given.get("augment", "") or given.get("tta"):
            raise ConvnetError("this data set's images change class when mirrored (its spec forbids flips); "
                               "use --augment translate or none, and no --tta, or pass --hflip if mirrors are fine")
        config = without_flips(config)
    return config


def resolve_run(recipe_name: str | TrainConfig | None, overrides: dict[str, Any], *, kind: str = "cpu", hflip: bool,
                from_weights: bool = False, train_images: int | None = None,
                pool: bool = False) -> tuple[TrainConfig, str]:
    """The config a new run trains with, checked (:func:`~convnet.training.config.check_config`),
    and a line saying how it was sized: the recipe with the given settings laid over it
    (:func:`resolve_config`); for a run that starts from trained weights, fine-tuning's defaults
    (:func:`fine_tune_defaults`) where no setting says otherwise; and, when
    ``train_images`` (the images it trains on, validation held out) is known and
    ``epochs`` is not given, sized to the data
    (:func:`size_to_data`; never the tutorial's recipe or a faithful run). The command
    line, the estimator and ``convnet tune``'s trials all resolve through here. ``kind``
    picks the default recipe where ``recipe_name`` is None, as in :func:`resolve_config`.

    Raises:
        ConvnetError: a bad setting, named by its flag.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    config = resolve_config(recipe_name, given, kind=kind, hflip=hflip)
    if from_weights:  # fine-tuning's defaults, where no setting says otherwise
        config = replace(config, **{k: v for k, v in fine_tune_defaults(config.epochs).items() if k not in given})
    sizing = ""
    if train_images is not None and "epochs" not in given and not config.faithful and recipe_name != "tutorial":
        config, sizing = size_to_data(config, train_images, pool)
    check_config(config, from_weights=from_weights)
    return config, sizing


def trained_images(images: int, val_split: float) -> int:
    """How many of ``images`` are trained on when ``val_split`` of them is held out
    (the stratified split rounds the held-out share up)."""
    return images - math.ceil(val_split * images) if val_split else images


# Training sized to the data (when --epochs is not given): every epoch trains on about this many images, the
# training images repeated as often as it takes; 10,000 images or more train one pass per epoch, as the recipes
# were tuned. Chosen on validation splits only (benchmarks/size_rule.py; docs/small-data.md).
SIZED_IMAGES = 10_000
# Runs that start from trained weights (--init-from), unless flags say otherwise: the head alone for the first
# eighth of the epochs (3 of 24), then the rest at a tenth of its learning rate. Chosen on a validation split only
# (benchmarks/transfer.py choose; docs/small-data.md, "Fine-tuning").
FINE_TUNE = {"freeze_share": 1 / 8, "body_lr": 0.1}
# With unlabelled images (--unlabeled), sized runs train this many times the recipe's epochs: the consistency loss
# keeps improving long after the labels alone have stopped (docs/small-data.md, "Few labels": 1,000 labels, seed 0,
# judged on 2,000 other training images: 24 epochs 0.8635, 48 epochs 0.8765, 60 epochs 0.8845). 60 keeps a run with
# the whole pool of Fashion-MNIST within twice the time of training on all of it labelled.
POOL_EPOCHS = 2.5


def fine_tune_defaults(epochs: int) -> dict[str, float | int]:
    """--freeze-epochs and --body-lr for a run of ``epochs`` epochs that starts from trained
    weights: :data:`FINE_TUNE`, at least one frozen epoch and at least one that is not."""
    return {"freeze_epochs": min(max(1, round(epochs * FINE_TUNE["freeze_share"])), epochs - 1),
            "body_lr": FINE_TUNE["body_lr"]}


def size_to_data(config: TrainConfig, train_images: int, pool: bool = False) -> tuple[TrainConfig, str]:
    """``config`` with as many passes over ``train_images`` images per epoch
    (``repeats``) as make about :data:`SIZED_IMAGES` images, and one line saying what
    was chosen and why. Epochs, warm-up, decay, the moving average's decay per step and
    the validation checks keep their meaning: only the images an epoch sees grow. With
    unlabelled images (``pool``), :data:`POOL_EPOCHS` times the epochs."""
    n = max(1, train_images)
    repeats = max(1, round(SIZED_IMAGES / n))
    sized = replace(config, repeats=repeats, epochs=round(config.epochs * POOL_EPOCHS) if pool else config.epochs)
    steps = sized.epochs * math.ceil(repeats * n / sized.batch_size)
    if pool and POOL_EPOCHS != 1:
        return sized, (f"{sized.epochs} epochs of {repeats} passes over {n:,} images ({steps:,} steps of "
                       f"{sized.batch_size}): {POOL_EPOCHS}x the recipe's epochs, as learning from unlabelled "
                       f"images needs; every epoch about {SIZED_IMAGES:,} labelled images (--epochs N trains N single "
                       "passes instead)")
    if repeats == 1:
        return sized, (f"{sized.epochs} epochs of one pass over {n:,} images ({steps:,} steps of "
                       f"{sized.batch_size}), as the recipe says")
    return sized, (f"{sized.epochs} epochs of {repeats} passes over {n:,} images ({steps:,} steps of "
                   f"{sized.batch_size}): sized to the data, every epoch about {SIZED_IMAGES:,} images "
                   "(--epochs N trains N single passes instead)")


def without_flips(config: TrainConfig) -> TrainConfig:
    """``config`` with no mirrored images: no flip augmentation (shifts stay), no
    test-time flips; for data whose images change class when mirrored (digits, letters)."""
    return replace(config, augment={"flip": "none", "flip-translate": "translate"}.get(config.augment, config.augment),
                   tta=False)


def settings_as_flags(config: TrainConfig) -> list[str]:
    """A recipe's settings as the flags of ``convnet train`` that set them (``--tta``,
    ``--no-nesterov``, ``--lr 0.1``), one per setting."""
    flags = []
    for name in RECIPE_FIELDS:
        value, flag = getattr(config, name), "--" + name.replace("_", "-")
        flags.append((flag if value else "--no-" + flag[2:]) if isinstance(value, bool) else f"{flag} {value}")
    return flags


def describe_recipes(path: Path | None = None) -> list[tuple[str, list[str]]]:
    """What ``convnet recipes`` lists: each named recipe (or the recipe file ``path``) with
    a note of where it is the default, and its settings as flags."""
    if path is not None:  # one recipe file, as `convnet train --recipe FILE` reads it
        return [(str(path), settings_as_flags(read_recipe_file(path, where="convnet recipes")))]
    found = []
    for name, config in RECIPES.items():
        default = [DEFAULT_WHERE[kind] for kind, r in DEFAULT_RECIPE.items() if r == name]
        note = (f" (the default {', '.join(default)})" if default else
                " (the tutorial's settings; base of --faithful)" if name == "tutorial" else "")
        found.append((name + note, settings_as_flags(config)))
    return found
