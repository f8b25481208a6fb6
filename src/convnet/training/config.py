"""Training settings as plain data: the config (each field the one declaration of its
option, :mod:`convnet.core.options`), the one function that checks it, the learning-rate
schedule and the record kept of each epoch. No torch: the command line builds its flags
from here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from convnet.core.errors import ConvnetError, RunError
from convnet.core.options import BENCH, DEVICES, ESTIMATOR, EVERYWHERE, PRECISIONS, TRAIN, TUNE, TUTORIAL, option
from convnet.data.options import DataOptions
from convnet.models.names import list_models

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
AUGMENTS = ("none", "flip", "translate", "flip-translate")
CLASS_WEIGHTS = ("none", "balanced")  # --class-weight: the loss's weight of each class
SAMPLERS = ("passes", "balanced")  # --sampler: every image once per pass, or classes drawn equally often
TRACKERS = ("tensorboard", "mlflow")

PER_RUN = frozenset({TRAIN, ESTIMATOR})  # a setting of one run, not of a recipe


@dataclass
class TrainConfig:
    """What to train and how. The defaults are the tutorial's plain setting; named recipes
    (:data:`convnet.training.recipes.RECIPES`) bundle the stronger ones. ``faithful=True`` keeps
    the tutorial's exact arithmetic, so the tutorial's numbers come back. Each field's
    help (``convnet train --help``) says what it does; :func:`check_config` checks them.
    """

    model: str = option("seed", "registered model (see `convnet models`)", takes=EVERYWHERE, metavar="NAME")
    optimizer: str = option("adam", "the optimizer", choices=OPTIMIZERS, takes=EVERYWHERE)
    lr: float = option(1e-3, "peak learning rate per step (not scaled by batch size)", takes=EVERYWHERE)
    epochs: int = option(15, "passes over the training images", takes=EVERYWHERE,
                         shown="the recipe's, each epoch repeating a small data set to about 10,000 images")
    batch_size: int = option(128, "images per step", takes=EVERYWHERE)
    seed: int = option(42, "initial weights, shuffle order, augmentation and validation split",
                       takes={TRAIN, TUNE, ESTIMATOR}, alias="random_state")
    shuffle: bool = option(True, "a new order every epoch (the tutorial did not shuffle)", takes=EVERYWHERE,
                           shown="on, off with --faithful")
    momentum: float = option(0.0, "SGD momentum (0: plain SGD, the tutorial's)", takes=EVERYWHERE)
    nesterov: bool = option(False, "Nesterov momentum for SGD", takes=EVERYWHERE)
    weight_decay: float = option(0.0, "L2 penalty (decoupled for adamw); none on batch norm and biases",
                                 takes=EVERYWHERE)
    label_smoothing: float = option(0.0, "share of the target spread over all classes", takes=EVERYWHERE)
    augment: str = option("none", "batched augmentation on the device", choices=AUGMENTS, takes=EVERYWHERE)
    translate_px: int = option(2, "largest random shift in pixels, for --augment translate", takes=EVERYWHERE)
    schedule: str = option("constant", "learning-rate schedule: linear warm-up, then linear or cosine decay to 0",
                           choices=SCHEDULES, takes=EVERYWHERE)
    warmup_epochs: float = option(0.0, "length of the linear warm-up, in epochs (may be fractional)",
                                  takes=EVERYWHERE)
    val_split: float = option(0.1, "share of the training images held out (stratified, by --seed) and scored every "
                              "epoch; the best epoch's weights are kept; a folder's own val/ is used instead; 0: "
                              "none, the last epoch's weights", takes={TRAIN, TUNE, ESTIMATOR},
                              alias="validation_fraction", shown="0.1; 0 with --faithful")
    val_every: int = option(1, "score the held-out images every N epochs and after the last (each check is a pass "
                            "over them, two with --tta); the best of the epochs checked is kept", takes=EVERYWHERE,
                            metavar="N")
    target_accuracy: float = option(0.0, "stop once the validation accuracy, checked at every scored epoch "
                                    "(--val-every), reaches this (0: off)", takes={TRAIN}, shown="off")
    patience: int = option(0, "stop once the validation accuracy has not improved for this many epochs (0: off)",
                           takes={TRAIN, ESTIMATOR}, alias="n_iter_no_change", shown="off")
    tta: bool = option(False, "predict with the mean of each image and its mirror", takes=EVERYWHERE)
    ema: float = option(0.0, "keep and evaluate a moving average of the weights, decay per step (0: off)",
                        takes=EVERYWHERE)
    freeze_epochs: int = option(0, "with --init-from: epochs that train the classifier head alone", takes=PER_RUN,
                                shown="an eighth of the epochs with --init-from, 3 of 24; else 0")
    body_lr: float = option(1.0, "with --init-from: learning rate of all but the head, as a fraction of --lr",
                            takes=PER_RUN, shown="0.1 with --init-from; else 1")
    class_weight: str = option("none", "balanced: weigh each class's loss inversely to its images, for imbalanced "
                               "classes", choices=CLASS_WEIGHTS, takes=PER_RUN)
    sampler: str = option("passes", "balanced: draw every class equally often, with replacement; passes: every "
                          "image once per pass", choices=SAMPLERS, takes=PER_RUN)
    calibrate: bool = option(False, "after training, fit a temperature on the held-out images (--val-split, 0.1 if "
                             "not given) so that probabilities match accuracy; every way of predicting uses it",
                             takes=PER_RUN)
    faithful: bool = option(False, "the tutorial's exact arithmetic: fp32, no shuffling, its float32 learning rate",
                            takes={*PER_RUN, TUTORIAL})
    precision: str = option("auto", "the training step's arithmetic: bf16 (bfloat16 autocast), fp32, or auto: bf16 on "
                            "a GPU and on a CPU that computes it natively (AVX512-BF16, AMX), else fp32; predictions "
                            "are always fp32", choices=PRECISIONS, takes={TRAIN, TUNE, ESTIMATOR, BENCH})
    # passes over the training images in one epoch, each shuffled and augmented anew: 1 as given; more when the
    # training is sized to a small data set (convnet.training.recipes.size_to_data), not an option of its own
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.faithful:  # the tutorial's training: its order, every training image
            self.shuffle, self.val_split = False, 0.0

    @property
    def flips(self) -> bool:
        """Whether training or prediction mirrors images."""
        return self.tta or "flip" in self.augment

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


@dataclass
class TrainRequest:
    """Everything a training run is asked: the settings given (laid over a recipe), the
    data, the weights it starts from, where it computes, and what it writes. ``convnet
    train``, the estimator, ``convnet tune``'s trials, the tutorial and ``convnet inspect
    --train-folds`` each make one and train through :func:`convnet.fit.fit_run`.

    Attributes:
        settings: :class:`TrainConfig` fields given explicitly (None: the recipe's), or a
            whole config, trained as it is (no recipe, no sizing).
        data: which data (:class:`DataOptions`), or a data set already in memory.
        mlflow_experiment: the MLflow experiment the run goes into.

    The other fields are options; their help (``convnet train --help``) says what each does.
    """

    settings: dict[str, Any] | TrainConfig = field(default_factory=dict)
    data: Any = field(default_factory=DataOptions)  # DataOptions, or a convnet.Dataset (its module loads torch)
    recipe: str | None = option(None, "named settings (see `convnet recipes`) or a recipe file, e.g. one `convnet "
                                "tune` wrote", takes={TRAIN, TUNE, ESTIMATOR}, metavar="NAME|FILE",
                                shown="cpu on a CPU, gpu on a GPU; tutorial with --faithful")
    init_from: str | None = option(None, "start from trained weights: a run folder, a .safetensors file, or hf:REPO "
                                   "from the Hugging Face hub, e.g. hf:timm/resnet18.a1_in1k",
                                   takes={TRAIN, ESTIMATOR}, metavar="SOURCE", shown="fresh weights")
    device: str = option("auto", "where to compute", choices=DEVICES, takes={TRAIN, TUNE, ESTIMATOR, TUTORIAL, BENCH})
    out: Path | None = option(None, "the run folder, new or empty", takes={TRAIN}, metavar="DIR",
                              shown="runs/MODEL-OPTIMIZER-TIME")
    resume: Path | None = option(None, "continue RUN from its last complete epoch, with its own settings and data",
                                 takes={TRAIN}, metavar="RUN")
    progress: bool = option(True, "no live progress bar", takes={TRAIN, TUTORIAL}, flag="--no-progress",
                            shown="a bar in a terminal")
    log: tuple[str, ...] = option((), "also send the epochs, scores and pictures to TensorBoard (RUN/tensorboard/) or "
                                  "MLflow; repeat for both; needs the tracking extra", choices=TRACKERS,
                                  takes={TRAIN, ESTIMATOR}, shown="the run folder only")
    mlflow_uri: str | None = option(None, "with --log mlflow: the tracking server or store",
                                    takes={TRAIN, ESTIMATOR}, metavar="URI",
                                    shown="MLFLOW_TRACKING_URI, else MLflow's own default")
    mlflow_experiment: str = "convnet"


# what --faithful cannot be combined with: every setting that departs from the tutorial's arithmetic
NOT_FAITHFUL = ("nesterov", "label_smoothing", "augment", "schedule", "warmup_epochs", "tta", "ema", "repeats",
                "freeze_epochs", "body_lr", "class_weight", "sampler", "calibrate", "patience")


def check_config(config: TrainConfig, *, from_weights: bool = False, held_out: bool | None = None) -> None:
    """Every check of a training config, in one place: each value against its range and
    choices, and the settings that only work together. ``convnet train``, the estimator,
    ``convnet tune`` and a direct :func:`convnet.train` call all check through here,
    before anything is read or written.

    Args:
        from_weights: the run starts from trained weights (``--init-from``), which
            ``freeze_epochs`` needs.
        held_out: whether held-out images are given for validation (default: whether
            ``val_split`` holds some out), which ``calibrate`` needs.

    Raises:
        ConvnetError: the first bad value, named by its flag, with what is accepted.
    """
    if not isinstance(config, TrainConfig):
        raise ConvnetError(f"config: a {type(config).__name__} was given; expected a convnet.TrainConfig "
                           "(e.g. convnet.TrainConfig(epochs=5) or convnet.RECIPES['cpu'])")
    for name, choices in (("optimizer", OPTIMIZERS), ("augment", AUGMENTS), ("schedule", SCHEDULES),
                          ("class_weight", CLASS_WEIGHTS), ("sampler", SAMPLERS)):
        if getattr(config, name) not in choices:
            raise ConvnetError(f"unknown {flag(name)} {getattr(config, name)!r}; choose one of: {', '.join(choices)}")
    if config.model not in list_models():
        raise ConvnetError(f"unknown model {config.model!r}; choose one of: {', '.join(list_models())}")
    if config.faithful:
        if config.val_split:
            raise ConvnetError(f"--faithful trains on every training image, as the tutorial did; it cannot be "
                               f"combined with --val-split {config.val_split}")
        plain = TrainConfig()
        for name in NOT_FAITHFUL:
            if getattr(config, name) != getattr(plain, name):
                raise ConvnetError(f"--faithful reproduces the tutorial's arithmetic; it cannot be combined with "
                                   f"{flag(name)} {getattr(config, name)}")
    c = config
    checks = [
        (c.epochs >= 1, f"--epochs must be at least 1, got {c.epochs}"),
        (c.batch_size >= 1, f"--batch-size must be at least 1, got {c.batch_size}"),
        (math.isfinite(c.lr) and c.lr > 0, f"--lr must be a positive number, got {c.lr}"),
        (0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}"),
        (not c.nesterov or (c.optimizer == "sgd" and c.momentum > 0),
         "--nesterov needs --optimizer sgd and a --momentum above 0"),
        (c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}"),
        (0 <= c.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {c.label_smoothing}"),
        (0 <= c.translate_px <= 8, f"--translate-px must be in 0..8, got {c.translate_px}"),
        (0 <= c.warmup_epochs <= c.epochs, f"--warmup-epochs must be in 0..--epochs, got {c.warmup_epochs}"),
        (0 <= c.val_split < 1, f"--val-split must be in [0, 1), got {c.val_split}"),
        (c.val_every >= 1, f"--val-every must be a number of epochs, 1 or more, got {c.val_every}"),
        (0 <= c.target_accuracy <= 1, f"--target-accuracy must be in [0, 1], got {c.target_accuracy}"),
        (c.patience >= 0, f"--patience must be a number of epochs, 0 or more, got {c.patience}"),
        (not (c.target_accuracy or c.patience) or (held_out if held_out is not None else c.val_split > 0),
         "--target-accuracy and --patience watch the validation accuracy; --val-split 0 holds no images out"),
        (0 <= c.ema < 1, f"--ema must be a decay in [0, 1), got {c.ema}"),
        (c.repeats >= 1, f"repeats must be at least 1, got {c.repeats}"),
        (0 <= c.freeze_epochs < c.epochs,
         f"--freeze-epochs must be in 0..--epochs - 1, got {c.freeze_epochs} of {c.epochs} epochs"),
        (math.isfinite(c.body_lr) and 0 < c.body_lr <= 1, f"--body-lr must be a fraction in (0, 1], got {c.body_lr}"),
        (not c.freeze_epochs or from_weights, "--freeze-epochs trains the head of a model that starts from trained "
                                              "weights; give them with --init-from"),
        (not c.calibrate or (held_out if held_out is not None else c.val_split > 0),
         "--calibrate fits a temperature on held-out training images; --val-split 0 holds none (leave it out for "
         "0.1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConvnetError(message)


def flag(name: str) -> str:
    """The flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


# A warm-up is never shorter than the steps of this many images (at most half the run): the recipes warm up for one
# epoch, which a few passes over a small folder make a handful of steps, and fastnet at 0.1 then blew up (960 digit
# images, `--epochs 25`: 8 steps of warm-up, loss 10.5 in the 2nd epoch, test 0.483; 80 steps: 0.988; --epochs 12,
# 48 steps: 0.975 against 0.258). 10,000 images are the steps of an epoch sized to the data (`size_to_data`), so a
# run of `--epochs N` warms up as a sized one does; a full data set's epoch is longer and is unchanged.
WARMUP_MIN_IMAGES = 10_000


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The warm-up's length in steps: ``warmup_epochs`` of them, and at least :data:`WARMUP_MIN_IMAGES` images'
    steps (at most half the run) where the config warms up at all."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if warmup == 0:
        return 0
    return max(warmup, min(math.ceil(WARMUP_MIN_IMAGES / config.batch_size), config.epochs * steps_per_epoch // 2))


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) under ``config.schedule``,
    after a linear warm-up of :func:`warmup_steps`."""
    if config.schedule == "constant":
        return config.lr
    total = config.epochs * steps_per_epoch
    warmup = warmup_steps(config, steps_per_epoch)
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
    test_accuracy: float | None = None  # only measured for a benchmark's time to a test accuracy
    pool_used: float | None = None  # with unlabelled images: the share of those drawn the teacher was sure of
    pool_confidence: float | None = None  # and its mean most-probable-class probability on them
