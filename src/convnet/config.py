"""Training settings as plain data: the config, the named recipes, the learning-rate
schedule and the record kept of each epoch."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from convnet.errors import ConvnetError, RunError

# Choices, kept here (a module that imports no torch) so that the command line builds fast.
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
AUGMENTS = ("none", "flip", "translate", "flip-translate")
CLASS_WEIGHTS = ("none", "balanced")  # --class-weight: the loss's weight of each class
SAMPLERS = ("passes", "balanced")  # --sampler: every image once per pass, or classes drawn equally often
DEVICES = ("auto", "cpu", "cuda")
LAYOUTS = ("auto", "nchw", "nhwc")


@dataclass
class TrainConfig:
    """What to train and how. The defaults are the tutorial's plain setting; named
    recipes (:data:`RECIPES`) bundle the stronger ones. ``faithful=True`` keeps the
    tutorial's exact arithmetic, so the tutorial's numbers come back.

    Attributes:
        model: a registered model name (see ``convnet models``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: peak learning rate per step (not scaled by batch size).
        epochs: full passes over the training images (each of ``repeats`` passes).
        batch_size: images per step.
        seed: seeds the initial weights (``torch.manual_seed``), the shuffle order, the
            augmentation and the validation split.
        shuffle: a new random order every epoch; the tutorial did not shuffle.
        momentum: SGD momentum (0 = plain SGD, the tutorial's).
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty (decoupled for ``adamw``).
        label_smoothing: share of the target spread over all classes (0 = none).
        augment: ``none``, ``flip``, ``translate`` or ``flip-translate``, batched on the device.
        translate_px: largest random shift in pixels for ``translate``.
        schedule: ``constant``, or linear warm-up then ``linear`` or ``cosine`` decay to 0.
        warmup_epochs: length of the warm-up, in epochs (may be fractional).
        val_split: share of the training images held out for per-epoch validation.
        target_accuracy: stop once the test accuracy, measured after every epoch,
            reaches this (a time-to-accuracy run); 0 = off.
        tta: predict with test-time augmentation (mean of the image and its mirror).
        ema: decay per step of an exponential moving average of the weights (e.g.
            0.995), which is what gets evaluated and kept; 0 = off.
        freeze_epochs: for a run started from trained weights: epochs in which only the
            classifier head learns (the rest keeps its weights; batch norm's statistics
            still follow the new images), before everything learns.
        body_lr: for a run started from trained weights: the learning rate of every layer
            but the head, as a fraction of the head's (1 = the same).
        class_weight: ``balanced`` weighs each class's loss by ``N / (classes * N_class)``
            (scikit-learn's ``compute_class_weight("balanced")``), so that a rare class
            counts as much as a common one; ``none`` weighs every image alike.
        sampler: ``passes``: every image once per pass; ``balanced``: each batch's images
            drawn with replacement, every class equally likely (as many images per epoch).
        calibrate: after training, fit a temperature on the validation split (``val_split``,
            0.1 when not given) that makes the probabilities calibrated; kept in the run
            (``calibration.json``) and used by every way of predicting.
        repeats: passes over the training images in one epoch, each shuffled and
            augmented anew: 1 as given; more when the training is sized to a small
            data set (:func:`size_to_data`), so that its epochs, schedule, moving
            average and validation checks keep their meaning.
        faithful: the tutorial's exact arithmetic (see README).
    """

    model: str = "seed"
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 15
    batch_size: int = 128
    seed: int = 42
    shuffle: bool = True
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"
    translate_px: int = 2
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    val_split: float = 0.0
    target_accuracy: float = 0.0
    tta: bool = False
    ema: float = 0.0
    freeze_epochs: int = 0
    body_lr: float = 1.0
    class_weight: str = "none"
    sampler: str = "passes"
    calibrate: bool = False
    repeats: int = 1
    faithful: bool = False

    def __post_init__(self) -> None:
        if self.faithful:
            self.shuffle = False

    @property
    def flips(self) -> bool:
        """Whether training or prediction mirrors images."""
        return self.tta or "flip" in self.augment

    def validate(self) -> None:
        """Raise :class:`ConvnetError` naming the flag of the first bad value."""
        for flag, value, choices in (("--optimizer", self.optimizer, OPTIMIZERS), ("--augment", self.augment, AUGMENTS),
                                     ("--schedule", self.schedule, SCHEDULES),
                                     ("--class-weight", self.class_weight, CLASS_WEIGHTS),
                                     ("--sampler", self.sampler, SAMPLERS)):
            if value not in choices:
                raise ConvnetError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")
        from convnet.models import list_models  # imported here: models needs torch, and the CLI reads config at start

        if self.model not in list_models():
            raise ConvnetError(f"unknown model {self.model!r}; choose one of: {', '.join(list_models())}")
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
             "--nesterov needs --optimizer sgd and a --momentum above 0"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.translate_px <= 8, f"--translate-px must be in 0..8, got {self.translate_px}"),
            (0 <= self.warmup_epochs <= self.epochs,
             f"--warmup-epochs must be in 0..--epochs, got {self.warmup_epochs}"),
            (0 <= self.val_split < 1, f"--val-split must be in [0, 1), got {self.val_split}"),
            (0 <= self.target_accuracy <= 1, f"--target-accuracy must be in [0, 1], got {self.target_accuracy}"),
            (0 <= self.ema < 1, f"--ema must be a decay in [0, 1), got {self.ema}"),
            (self.repeats >= 1, f"repeats must be at least 1, got {self.repeats}"),
            (0 <= self.freeze_epochs < self.epochs,
             f"--freeze-epochs must be in 0..--epochs - 1, got {self.freeze_epochs} of {self.epochs} epochs"),
            (math.isfinite(self.body_lr) and 0 < self.body_lr <= 1,
             f"--body-lr must be a fraction in (0, 1], got {self.body_lr}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConvnetError(message)
        if self.faithful:
            plain = TrainConfig()
            for name in ("nesterov", "label_smoothing", "augment", "schedule", "warmup_epochs", "tta", "ema",
                         "repeats", "freeze_epochs", "body_lr", "class_weight", "sampler", "calibrate"):
                if getattr(self, name) != getattr(plain, name):
                    raise ConvnetError(f"--faithful reproduces the tutorial's arithmetic; it cannot be combined with "
                                       f"--{name.replace('_', '-')} {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TrainConfig | None = None, where: str | None = None
                  ) -> TrainConfig:
        """A config from a run's ``config.json`` section (or a recipe file's settings laid
        over ``base``); unknown keys are ignored.

        Raises:
            RunError: a value of the wrong type (ConvnetError naming ``where``, a recipe file).
        """
        plain = cls()
        values = asdict(base) if base is not None else {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value, want = d[f.name], type(getattr(plain, f.name))
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok and where is not None:
                raise ConvnetError(f"{where}: {f.name} = {value!r} should be a {want.__name__}")
            if not ok:
                raise RunError(f"config value {f.name}={value!r} should be a {want.__name__}; "
                               "the run folder is damaged")
            values[f.name] = value
        return cls(**values)


# Named recipes: `convnet train --recipe NAME`; flags given on the command line override them.
# Chosen on a validation split (--val-split 0.1), never on the test set; see README for their numbers.
RECIPES: dict[str, TrainConfig] = {
    "tutorial": TrainConfig(shuffle=False),
    "cpu": TrainConfig(model="fastnet", optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       epochs=24, batch_size=128, label_smoothing=0.1, augment="flip-translate", translate_px=2,
                       schedule="linear", warmup_epochs=1.0, tta=True, ema=0.995),
    "gpu": TrainConfig(model="airnet", optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       epochs=12, batch_size=512, label_smoothing=0.1, augment="flip-translate", translate_px=2,
                       schedule="linear", warmup_epochs=1.0, tta=True, ema=0.0),
    "best": TrainConfig(model="airnet-wide", optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                        epochs=60, batch_size=512, label_smoothing=0.1, augment="flip-translate", translate_px=2,
                        schedule="linear", warmup_epochs=2.0, tta=True, ema=0.0),
}
DEFAULT_RECIPE = {"cpu": "cpu", "cuda": "gpu"}
# settings of one run, not of a recipe
PER_RUN = ("seed", "val_split", "target_accuracy", "faithful", "repeats", "freeze_epochs", "body_lr", "class_weight",
           "sampler", "calibrate")
CALIBRATION_SPLIT = 0.1  # --calibrate without --val-split: the share of the training images held out for it


RECIPE_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.name not in PER_RUN)  # what a recipe holds
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


def resolve_config(recipe_name: str | None = None, overrides: dict[str, Any] | None = None, *,
                   device_type: str = "cpu", faithful: bool = False, hflip: bool = True) -> TrainConfig:
    """The config a run trains with: the recipe (by default the device's, or the
    tutorial's with ``faithful``) with every given override laid over it, fitted to the
    data: where a mirror changes an image's class (``hflip=False``: digits, letters) the
    recipe's flips are left out.

    Args:
        recipe_name: a name in :data:`RECIPES`, or None for the default.
        overrides: field values that were set explicitly (None values are ignored).
        device_type: ``cpu`` or ``cuda``: picks the default recipe.
        faithful: the tutorial's exact arithmetic.
        hflip: whether the data set allows mirrored images.

    Raises:
        ConvnetError: an unknown recipe, or flips asked for explicitly on data that forbids them.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = recipe(recipe_name or ("tutorial" if faithful else DEFAULT_RECIPE.get(device_type, "cpu")))
    if given.get("optimizer", "sgd") != "sgd" and "nesterov" not in given:
        config.nesterov, config.momentum = False, 0.0  # the recipe's SGD momentum does not carry over
    for f in fields(TrainConfig):
        if f.name in given and f.name != "faithful":
            setattr(config, f.name, given[f.name])
    if faithful:
        config.faithful, config.shuffle = True, False
    if not hflip:
        if "flip" in given.get("augment", "") or given.get("tta"):
            raise ConvnetError("this data set's images change class when mirrored (its spec forbids flips); "
                               "use --augment translate or none, and no --tta, or pass --hflip if mirrors are fine")
        config = without_flips(config)
    return config


# Training sized to the data (when --epochs is not given): every epoch trains on about this many images, the
# training images repeated as often as it takes; 10,000 images or more train one pass per epoch, as the recipes
# were tuned. Chosen on validation splits only (benchmarks/size_rule.py; README, "Small data").
SIZED_IMAGES = 10_000
# Runs that start from trained weights (--init-from), unless flags say otherwise: the head alone for the first
# eighth of the epochs (3 of 24), then the rest at a tenth of its learning rate. Chosen on a validation split only
# (benchmarks/transfer.py choose; README, "Fine-tuning").
FINE_TUNE = {"freeze_share": 1 / 8, "body_lr": 0.1}


def fine_tune_defaults(epochs: int) -> dict[str, float | int]:
    """--freeze-epochs and --body-lr for a run of ``epochs`` epochs that starts from trained
    weights: :data:`FINE_TUNE`, at least one frozen epoch and at least one that is not."""
    return {"freeze_epochs": min(max(1, round(epochs * FINE_TUNE["freeze_share"])), epochs - 1),
            "body_lr": FINE_TUNE["body_lr"]}


def size_to_data(config: TrainConfig, train_images: int) -> tuple[TrainConfig, str]:
    """``config`` with as many passes over ``train_images`` images per epoch
    (``repeats``) as make about :data:`SIZED_IMAGES` images, and one line saying what
    was chosen and why. Epochs, warm-up, decay, the moving average's decay per step and
    the validation checks keep their meaning: only the images an epoch sees grow."""
    n = max(1, train_images)
    repeats = max(1, round(SIZED_IMAGES / n))
    sized = replace(config, repeats=repeats)
    steps = sized.epochs * math.ceil(repeats * n / sized.batch_size)
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


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) under ``config.schedule``."""
    if config.schedule == "constant":
        return config.lr
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay
    if config.schedule == "linear":
        return config.lr * (1 - progress)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class EpochRecord:
    """One epoch of training, as ``history.json`` keeps it."""

    epoch: int  # 1-based
    loss: float  # mean of the batch losses, as the tutorial prints it
    seconds: float  # training only, without the evaluation below
    images_per_s: float
    lr: float  # at the epoch's last step
    accuracy: float | None = None  # on the training batches as they were trained on (augmented), during the epoch
    val_loss: float | None = None  # on the held-out --val-split images
    val_accuracy: float | None = None
    test_accuracy: float | None = None  # only measured for --target-accuracy
