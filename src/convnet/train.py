"""Training: the config, the optimizer, and the one training loop.

The loop in :func:`train` reads top to bottom: for each epoch, shuffle, then for each
batch slice the in-memory uint8 tensors, scale, forward, loss, zero_grad, backward,
step. Everything optional (progress bar, checkpoints, printing) happens in
:class:`TrainEvents` handlers, which do nothing unless overridden.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from convnet import runs
from convnet.augment import AUGMENTS, augment
from convnet.data import Dataset, Split, batches, split_validation
from convnet.engine import Engine
from convnet.errors import ConvnetError, RunError, TrainingDiverged
from convnet.models import count_parameters, create_model
from convnet.predict import infer
from convnet.progress import Bar

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """What to train and how. The defaults are the tutorial's plain setting; named
    recipes (:data:`RECIPES`) bundle the stronger ones. ``faithful=True`` keeps the
    tutorial's exact arithmetic, so the tutorial's numbers come back.

    Attributes:
        model: a registered model name (see ``convnet models``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: peak learning rate per step (not scaled by batch size).
        epochs: full passes over the training images.
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
    faithful: bool = False

    def __post_init__(self) -> None:
        if self.faithful:
            self.shuffle = False

    def validate(self) -> None:
        """Raise :class:`ConvnetError` naming the flag of the first bad value."""
        for flag, value, choices in (("--optimizer", self.optimizer, OPTIMIZERS), ("--augment", self.augment, AUGMENTS),
                                     ("--schedule", self.schedule, SCHEDULES)):
            if value not in choices:
                raise ConvnetError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")
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
        ]
        for ok, message in checks:
            if not ok:
                raise ConvnetError(message)
        if self.faithful:
            plain = TrainConfig()
            for name in ("nesterov", "label_smoothing", "augment", "schedule", "warmup_epochs", "tta", "ema"):
                if getattr(self, name) != getattr(plain, name):
                    raise ConvnetError(f"--faithful reproduces the tutorial's arithmetic; it cannot be combined with "
                                       f"--{name.replace('_', '-')} {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from a run's ``config.json`` section; unknown keys are ignored.

        Raises:
            RunError: a value of the wrong type.
        """
        plain = cls()
        values = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value, want = d[f.name], type(getattr(plain, f.name))
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
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
    "gpu": TrainConfig(model="fastnet", optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       epochs=16, batch_size=512, label_smoothing=0.1, augment="flip-translate", translate_px=2,
                       schedule="linear", warmup_epochs=1.0, tta=True, ema=0.99),
}
DEFAULT_RECIPE = {"cpu": "cpu", "cuda": "gpu"}


def recipe(name: str) -> TrainConfig:
    """A copy of the named recipe's config."""
    if name not in RECIPES:
        raise ConvnetError(f"unknown --recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return replace(RECIPES[name])


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


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the config names. In faithful mode the learning rate is passed as
    the tutorial passed it, a float32 tensor (``torch.tensor(1/1e3)``), which rounds it.
    Weight decay is not applied to batch-norm and bias parameters."""
    lr: float | torch.Tensor = torch.tensor(config.lr) if config.faithful else config.lr
    if config.weight_decay:
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        params: Any = [{"params": decay, "weight_decay": config.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}]
    else:
        params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # decay, if any, is set per group above


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean of the batch losses, as the tutorial prints it
    seconds: float  # training only, without the evaluation below
    images_per_s: float
    lr: float  # at the epoch's last step
    accuracy: float | None = None  # on the training batches as they were trained on (augmented), during the epoch
    val_loss: float | None = None  # on the held-out --val-split images
    val_accuracy: float | None = None
    test_accuracy: float | None = None  # only measured for --target-accuracy


@dataclass
class TrainState:
    """What the loop hands to events: the live objects and the history so far."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    shuffle_rng: torch.Generator
    augment_rng: torch.Generator
    ema: AveragedModel | None = None  # the moving average of the weights, with --ema
    epoch: int = 0  # epochs completed
    history: list[EpochRecord] = field(default_factory=list)
    stop: bool = False  # an event sets this to end training after the current epoch

    @property
    def final_model(self) -> nn.Module:
        """The model to evaluate and keep: the weights' moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model


class TrainEvents:
    """Hooks the loop calls; each does nothing unless a subclass overrides it."""

    def on_train_start(self, state: TrainState, num_images: int) -> None: ...

    def on_batch_end(self, state: TrainState, num_images: int) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class EventList(TrainEvents):
    def __init__(self, *events: TrainEvents) -> None:
        self.events = events

    def on_train_start(self, state: TrainState, num_images: int) -> None:
        for e in self.events:
            e.on_train_start(state, num_images)

    def on_batch_end(self, state: TrainState, num_images: int) -> None:
        for e in self.events:
            e.on_batch_end(state, num_images)

    def on_epoch_end(self, state: TrainState) -> None:
        for e in self.events:
            e.on_epoch_end(state)

    def on_train_end(self, state: TrainState) -> None:
        for e in self.events:
            e.on_train_end(state)


class ConsolePrinter(TrainEvents):
    """A live bar during each epoch (terminals only) and one line per epoch, in the
    tutorial's words: ``Categorical Cross Entropy : 0.432``."""

    def __init__(self, stream: TextIO | None = None, progress: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.progress = progress
        self.bar: Bar | None = None
        self.num_images = 0

    def on_train_start(self, state: TrainState, num_images: int) -> None:
        self.num_images = num_images

    def on_batch_end(self, state: TrainState, num_images: int) -> None:
        if self.bar is None:
            self.bar = Bar(self.num_images, f"epoch {state.epoch + 1}/{state.config.epochs}", enabled=self.progress)
        self.bar.update(num_images)

    def on_epoch_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        r = state.history[-1]
        width = len(str(state.config.epochs))
        extra = f"  accuracy {r.accuracy:.4f}" if r.accuracy is not None else ""
        if r.val_loss is not None:
            extra += f"  val loss {r.val_loss:.3f} accuracy {r.val_accuracy:.4f}"
        if r.test_accuracy is not None:
            extra += f"  test accuracy {r.test_accuracy:.4f}"
        print(f"Categorical Cross Entropy : {r.loss:.3f}   epoch {r.epoch:>{width}}/{state.config.epochs}"
              f"  {r.seconds:6.1f} s  {r.images_per_s:8,.0f} images/s{extra}", file=self.stream, flush=True)


class RunWriter(TrainEvents):
    """Keeps the run folder current: history every epoch, a checkpoint every epoch
    (weights, optimizer state, random states), the final weights at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_epoch_end(self, state: TrainState) -> None:
        runs.write_json(self.run_dir / runs.HISTORY, [asdict(r) for r in state.history])
        save_checkpoint(self.run_dir / runs.CHECKPOINT, state)

    def on_train_end(self, state: TrainState) -> None:
        runs.save_tensors(self.run_dir / runs.WEIGHTS, state.final_model.state_dict(), {"model": state.config.model})


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochRecord]
    run_dir: Path | None
    seconds: float


def train(
    config: TrainConfig,
    dataset: Dataset,
    *,
    engine: Engine | None = None,
    events: TrainEvents | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train a fresh model (or resume one) on ``dataset.train``.

    Args:
        config: what to train; validated here.
        dataset: the data, uint8 images; moved whole to the engine's device.
        engine: device and fast path; defaults to the faithful engine when
            ``config.faithful`` and the fast one otherwise, on the CPU.
        events: progress, printing, anything else to run at the loop's events.
        run_dir: when given, config, history, checkpoints and weights are written here.
        resume: continue from ``run_dir``'s last checkpoint.

    Raises:
        ConvnetError: a bad config value; TrainingDiverged when the loss stops being finite.
    """
    config.validate()
    engine = engine or (Engine.faithful() if config.faithful else Engine.fast())
    num_classes, (in_channels, height, _) = dataset.num_classes, dataset.image_shape
    train_split, val_split = dataset.train, None
    if config.val_split:
        train_split, val_split = split_validation(dataset.train, config.val_split, config.seed)

    torch.manual_seed(config.seed)  # the initial weights, as the tutorial seeds them
    model = engine.prepare_model(create_model(config.model, num_classes, in_channels, height))
    optimizer = make_optimizer(config, model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    state = TrainState(config, model, optimizer, torch.Generator().manual_seed(config.seed),
                       torch.Generator(engine.device).manual_seed(config.seed + 1), ema)
    if resume:
        if run_dir is None:
            raise ConvnetError("resume needs the run folder")
        load_checkpoint(run_dir / runs.CHECKPOINT, state)
    elif run_dir is not None and engine.is_main:
        write_config(run_dir, config, dataset, engine, model)
    writer = RunWriter(run_dir) if run_dir is not None and engine.is_main else None  # one process writes
    events = EventList(*(e for e in (events, writer) if e is not None))
    net = engine.wrap(model)  # DistributedDataParallel under torchrun, else the model itself

    images, labels = train_split.images.to(engine.device), train_split.labels.to(engine.device)  # (N, C, H, W) uint8
    n = len(labels)
    steps_per_epoch = len(batches(n, config.batch_size))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    check_each_batch = engine.device.type == "cpu"  # a finite-check costs a GPU sync; there, check per epoch
    events.on_train_start(state, n)
    start = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=state.shuffle_rng).to(engine.device) if config.shuffle else None
        losses, correct = [], torch.zeros((), device=engine.device)
        for i, rows in enumerate(batches(n, config.batch_size)):
            idx = order[rows] if order is not None else rows
            x, y = engine.batch(images[idx]), labels[idx]  # (B, C, H, W) float in [0, 1], (B,)
            if config.augment != "none":
                x = augment(x, config.augment, config.translate_px, state.augment_rng)
            batch_images = len(y)
            if engine.world_size > 1:  # this process's share of the global batch
                x, y = x.tensor_split(engine.world_size)[engine.rank], y.tensor_split(engine.world_size)[engine.rank]
            if config.schedule != "constant":
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(config, epoch * steps_per_epoch + i, steps_per_epoch)
            with engine.precision():
                logits = net(x)  # (B, num_classes)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.detach())
            correct += (logits.detach().argmax(dim=1) == y).sum()
            if check_each_batch and not torch.isfinite(losses[-1]):
                raise _diverged(epoch, i, losses[-1])
            events.on_batch_end(state, batch_images)
        epoch_losses = engine.all_mean(torch.stack(losses))  # each process's batch losses, averaged
        if not check_each_batch and not torch.isfinite(epoch_losses).all():
            bad = int((~torch.isfinite(epoch_losses)).nonzero()[0])
            raise _diverged(epoch, bad, epoch_losses[bad])
        seconds = time.perf_counter() - t0
        accuracy = float(engine.all_mean(correct)) * engine.world_size / n  # all processes' hits over all images
        record = EpochRecord(epoch + 1, float(epoch_losses.mean()), seconds, n / seconds,
                             float(optimizer.param_groups[0]["lr"]), accuracy)
        if val_split is not None:
            record.val_loss, record.val_accuracy = _score(state.final_model, val_split, engine, config.tta)
        if config.target_accuracy:
            _, record.test_accuracy = _score(state.final_model, dataset.test, engine, config.tta)
            state.stop = record.test_accuracy >= config.target_accuracy
        state.history.append(record)
        state.epoch = epoch + 1
        events.on_epoch_end(state)
        if state.stop:
            break
    events.on_train_end(state)
    return TrainResult(state.final_model, state.history, run_dir, time.perf_counter() - start)


def _score(model: nn.Module, split: Split, engine: Engine, tta: bool) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split``."""
    logits = infer(model, split.images, engine=engine, tta=tta)
    labels = split.labels.cpu()
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def _diverged(epoch: int, batch: int, loss: torch.Tensor) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: loss is {float(loss)} at epoch {epoch + 1}, batch {batch + 1}; "
        "try a lower --lr (the last good checkpoint is kept)"
    )


def write_config(run_dir: Path, config: TrainConfig, dataset: Dataset, engine: Engine, model: nn.Module) -> None:
    runs.write_json(run_dir / runs.CONFIG, {
        "train": asdict(config),
        "data": {
            "name": dataset.name,
            "source": dataset.source,
            "subset": dataset.subset,
            "classes": list(dataset.classes),
            "image_shape": list(dataset.image_shape),
            "train_images": len(dataset.train),
            "test_images": len(dataset.test),
        },
        "engine": engine.describe(),
        "parameters": count_parameters(model),
        "versions": runs.library_versions(),
        "command": runs.command_line(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


# --- checkpoints: every tensor in one safetensors file, everything else as JSON in its metadata.


def save_checkpoint(path: Path, state: TrainState) -> None:
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    if state.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in state.ema.state_dict().items()})
    opt = state.optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                opt_scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items()} for g in opt["param_groups"]]
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = state.shuffle_rng.get_state()
    tensors["rng.augment"] = state.augment_rng.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    meta = {
        "epoch": state.epoch,
        "history": [asdict(r) for r in state.history],
        "optimizer_scalars": opt_scalars,
        "param_groups": groups,
        "rng_numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "rng_python": random.getstate(),
    }
    runs.save_tensors(path, tensors, {"convnet": json.dumps(meta)})


def load_checkpoint(path: Path, state: TrainState) -> None:
    """Restore ``state`` (model, optimizer, random states, epoch, history) in place.

    Raises:
        RunError: the file is not a convnet checkpoint or does not fit the model.
    """
    from safetensors import safe_open

    tensors = runs.load_tensors(path)
    with safe_open(path, "pt") as f:  # type: ignore[no-untyped-call]
        meta = json.loads((f.metadata() or {}).get("convnet", "{}"))
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    own = state.model.state_dict()
    if set(model_state) != set(own) or any(own[k].shape != v.shape for k, v in model_state.items()):
        raise RunError(f"{path}: the checkpoint's weights do not fit model {state.config.model!r}")
    try:
        state.model.load_state_dict(model_state)
        if state.ema is not None:
            state.ema.load_state_dict({k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")})
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, key = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = v
        for pid, scalars in meta["optimizer_scalars"].items():
            opt_state.setdefault(int(pid), {}).update(scalars)
        groups = []
        for saved, fresh in zip(meta["param_groups"], state.optimizer.state_dict()["param_groups"], strict=True):
            # keep a tensor learning rate a tensor (faithful mode), with the saved value
            groups.append({k: torch.tensor(saved[k], dtype=v.dtype) if isinstance(v, torch.Tensor) else saved.get(k, v)
                           for k, v in fresh.items()})
        state.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        state.shuffle_rng.set_state(tensors["rng.shuffle"])
        state.augment_rng.set_state(tensors["rng.augment"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        kind, pos, has_gauss, cached = meta["rng_numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = meta["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        state.epoch = int(meta["epoch"])
        state.history = [EpochRecord(**r) for r in meta["history"]]
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise RunError(f"{path}: damaged checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
                       "start the run again") from None


def resume(run_dir: str | Path, *, engine: Engine | None = None, events: TrainEvents | None = None,
           data_dir: str | Path | None = None) -> TrainResult:
    """Continue a run from its last complete epoch, with the run's own config and data.

    The result is the same, bit for bit on the CPU, as if the run had never stopped.

    Raises:
        RunError: not a run folder, or no checkpoint in it yet.
    """
    run = runs.open_run(run_dir)
    if not (run.path / runs.CHECKPOINT).is_file():
        raise RunError(f"{run.path}: no checkpoint yet (it stopped before its first epoch ended); start it again")
    config = TrainConfig.from_dict(run.config["train"])
    dataset = runs.run_dataset(run, data_dir)
    return train(config, dataset, engine=engine, events=events, run_dir=run.path, resume=True)
