"""Training: the config, the optimizer, and the one training loop.

The loop in :func:`train` reads top to bottom: for each epoch, shuffle, then for each
batch slice the in-memory uint8 tensors, scale, forward, loss, zero_grad, backward,
step. Everything optional (progress bar, checkpoints, printing) happens in
:class:`TrainEvents` handlers, which do nothing unless overridden.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from convnet import runs
from convnet.data import Dataset, batches
from convnet.engine import Engine
from convnet.errors import ConvnetError, RunError, TrainingDiverged
from convnet.models import count_parameters, create_model
from convnet.progress import Bar

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass
class TrainConfig:
    """What to train and how. Defaults are convnet's own; ``faithful=True`` switches off
    everything that departs from the tutorial's arithmetic (shuffling, the fast engine),
    so the tutorial's exact numbers come back.

    Attributes:
        model: a registered model name (see ``convnet models``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate per step (not scaled by batch size).
        epochs: full passes over the training images.
        batch_size: images per step.
        seed: seeds the initial weights (``torch.manual_seed``) and the shuffle order.
        shuffle: a new random order every epoch; the tutorial did not shuffle.
        momentum: SGD momentum (0 = plain SGD, the tutorial's).
        weight_decay: L2 penalty (decoupled for ``adamw``).
        faithful: reproduce the tutorial's arithmetic exactly.
    """

    model: str = "seed"
    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 15
    batch_size: int = 128
    seed: int = 42
    shuffle: bool = True
    momentum: float = 0.0
    weight_decay: float = 0.0
    faithful: bool = False

    def __post_init__(self) -> None:
        if self.faithful:
            self.shuffle = False

    def validate(self) -> None:
        """Raise :class:`ConvnetError` naming the flag of the first bad value."""
        if self.optimizer not in OPTIMIZERS:
            raise ConvnetError(f"unknown --optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConvnetError(message)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the config names. In faithful mode the learning rate is passed as
    the tutorial passed it, a float32 tensor (``torch.tensor(1/1e3)``), which rounds it."""
    lr: float | torch.Tensor = torch.tensor(config.lr) if config.faithful else config.lr
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    loss: float  # mean of the batch losses, as the tutorial prints it
    seconds: float
    images_per_s: float


@dataclass
class TrainState:
    """What the loop hands to events: the live objects and the history so far."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    shuffle_rng: torch.Generator
    epoch: int = 0  # epochs completed
    history: list[EpochRecord] = field(default_factory=list)
    stop: bool = False  # an event sets this to end training after the current epoch


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
        print(f"Categorical Cross Entropy : {r.loss:.3f}   epoch {r.epoch:>{width}}/{state.config.epochs}"
              f"  {r.seconds:6.1f} s  {r.images_per_s:8,.0f} images/s", file=self.stream, flush=True)


class RunWriter(TrainEvents):
    """Keeps the run folder current: history every epoch, a checkpoint every epoch
    (weights, optimizer state, random states), the final weights at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_epoch_end(self, state: TrainState) -> None:
        runs.write_json(self.run_dir / runs.HISTORY, [asdict(r) for r in state.history])
        save_checkpoint(self.run_dir / runs.CHECKPOINT, state)

    def on_train_end(self, state: TrainState) -> None:
        runs.save_tensors(self.run_dir / runs.WEIGHTS, state.model.state_dict(), {"model": state.config.model})


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

    torch.manual_seed(config.seed)  # the initial weights, as the tutorial seeds them
    model = engine.prepare_model(create_model(config.model, num_classes, in_channels, height))
    optimizer = make_optimizer(config, model)
    state = TrainState(config, model, optimizer, torch.Generator().manual_seed(config.seed))
    if resume:
        if run_dir is None:
            raise ConvnetError("resume needs the run folder")
        load_checkpoint(run_dir / runs.CHECKPOINT, state)
    elif run_dir is not None:
        write_config(run_dir, config, dataset, engine, model)
    events = EventList(*(e for e in (events, RunWriter(run_dir) if run_dir else None) if e is not None))

    images, labels = dataset.train.images.to(engine.device), dataset.train.labels.to(engine.device)
    n = len(labels)
    loss_fn = nn.CrossEntropyLoss()
    check_each_batch = engine.device.type == "cpu"  # a finite-check costs a GPU sync; there, check per epoch
    events.on_train_start(state, n)
    start = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=state.shuffle_rng).to(engine.device) if config.shuffle else None
        losses = []
        for i, rows in enumerate(batches(n, config.batch_size)):
            idx = order[rows] if order is not None else rows
            x, y = engine.batch(images[idx]), labels[idx]  # (B, C, H, W) float in [0, 1], (B,)
            with engine.precision():
                logits = model(x)  # (B, num_classes)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            if check_each_batch and not torch.isfinite(losses[-1]):
                raise _diverged(epoch, i, losses[-1])
            events.on_batch_end(state, len(y))
        epoch_losses = torch.stack(losses)
        if not check_each_batch and not torch.isfinite(epoch_losses).all():
            bad = int((~torch.isfinite(epoch_losses)).nonzero()[0])
            raise _diverged(epoch, bad, epoch_losses[bad])
        seconds = time.perf_counter() - t0
        state.history.append(EpochRecord(epoch + 1, float(epoch_losses.mean()), seconds, n / seconds))
        state.epoch = epoch + 1
        events.on_epoch_end(state)
        if state.stop:
            break
    events.on_train_end(state)
    return TrainResult(model, state.history, run_dir, time.perf_counter() - start)


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
    meta = {
        "epoch": state.epoch,
        "history": [asdict(r) for r in state.history],
        "optimizer_scalars": opt_scalars,
        "param_groups": groups,
    }
    runs.save_tensors(path, tensors, {"convnet": json.dumps(meta)})


def load_checkpoint(path: Path, state: TrainState) -> None:
    """Restore ``state`` (model, optimizer, random states, epoch, history) in place."""
    from safetensors import safe_open

    tensors = runs.load_tensors(path)
    with safe_open(path, "pt") as f:  # type: ignore[no-untyped-call]
        meta = json.loads((f.metadata() or {}).get("convnet", "{}"))
    if "epoch" not in meta:
        raise RunError(f"{path}: not a convnet checkpoint (no epoch in its metadata)")
    runs_model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        state.model.load_state_dict(runs_model)
    except RuntimeError as e:
        raise RunError(f"{path}: weights do not fit model {state.config.model!r}: {e}") from None
    current = state.optimizer.state_dict()
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v
    for pid, scalars in meta["optimizer_scalars"].items():
        opt_state.setdefault(int(pid), {}).update(scalars)
    groups = []
    for saved, fresh in zip(meta["param_groups"], current["param_groups"], strict=True):
        # keep a tensor learning rate a tensor (faithful mode), with the saved value
        groups.append({k: (torch.tensor(saved[k], dtype=v.dtype) if isinstance(v, torch.Tensor) else saved.get(k, v))
                       for k, v in fresh.items()})
    state.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    state.shuffle_rng.set_state(tensors["rng.shuffle"])
    state.epoch = int(meta["epoch"])
    state.history = [EpochRecord(**r) for r in meta["history"]]


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
