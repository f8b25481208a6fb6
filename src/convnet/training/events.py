"""The training loop's events: hooks that do nothing unless overridden, and the ones
convnet uses: validation, stopping at a target accuracy, printing, keeping the run folder.

The loop calls them in the order given; an event that fills in the epoch's record
(validation, test accuracy) comes before one that prints or writes it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.progress import Bar
from convnet.data.dataset import Split
from convnet.models.inference import infer
from convnet.training.checkpoint import save_checkpoint
from convnet.training.config import TrainConfig
from convnet.training.state import Best, TrainState


class TrainEvents:
    """Hooks the loop calls; each does nothing unless a subclass overrides it."""

    def on_train_start(self, state: TrainState, num_images: int) -> None: ...

    def on_batch_end(self, state: TrainState, num_images: int) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class EventList(TrainEvents):
    """Several events, called in order."""

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


def score(model: nn.Module, split: Split, state: TrainState, tta: bool) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split``."""
    logits = infer(model, split.images, engine=state.engine, tta=tta)
    labels = split.labels.cpu()
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def checked(config: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` (from 1) scores the held-out images: every ``val_every`` and the last."""
    return epoch % config.val_every == 0 or epoch >= config.epochs


class Validation(TrainEvents):
    """Loss and accuracy on held-out images after every epoch, or every ``val_every`` (``val_loss``,
    ``val_accuracy``), and the epoch the run keeps: the best (``state.peak``), or a later
    one whose accuracy is within one standard error of the best's (``state.best``, its
    weights copied to the CPU): on a small validation set a difference that size is noise,
    and the later epochs of a schedule are the better trained. Training stops once the
    config's ``target_accuracy`` is reached or, with ``patience``, once that many epochs
    have passed without a better one."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def on_epoch_end(self, state: TrainState) -> None:
        record, config = state.history[-1], state.config
        if not checked(config, record.epoch):
            return
        record.val_loss, record.val_accuracy = score(state.final_model, self.split, state, config.tta)
        if state.peak is None or state.peak.better(record.val_accuracy, record.val_loss):
            state.peak = Best(record.epoch, record.val_accuracy, record.val_loss)
        peak = state.peak
        noise = math.sqrt(peak.val_accuracy * (1 - peak.val_accuracy) / max(1, len(self.split)))  # its standard error
        if record.val_accuracy >= peak.val_accuracy - noise:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in state.final_model.state_dict().items()}
            state.best = Best(record.epoch, record.val_accuracy, record.val_loss, weights)
        if config.target_accuracy and record.val_accuracy >= config.target_accuracy:
            state.stop = True
        if config.patience and record.epoch - peak.epoch >= config.patience:
            state.stop = True


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T that minimises the negative log-likelihood of ``softmax(logits /
    T)`` on held-out images (Guo et al., 2017), searched over log T in [-4, 4]."""
    from scipy.optimize import minimize_scalar

    z, y = logits.double().cpu(), labels.cpu()
    found = minimize_scalar(lambda log_t: float(nn.functional.cross_entropy(z / math.exp(log_t), y)),
                            bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-6})
    return math.exp(float(found.x))


class Calibrate(TrainEvents):
    """At the end of training: the temperature that calibrates the kept model's
    probabilities (the best epoch's) on ``split`` (held-out images), in ``state.calibration``."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def on_train_end(self, state: TrainState) -> None:
        logits = infer(state.kept_model(), self.split.images, engine=state.engine, tta=state.config.tta)
        labels = self.split.labels.cpu()
        t = fit_temperature(logits, labels)
        loss = nn.functional.cross_entropy
        state.calibration = {"temperature": t, "fitted_on": "validation split", "images": len(labels),
                             "nll_before": float(loss(logits, labels)), "nll_after": float(loss(logits / t, labels))}


class StopAtAccuracy(TrainEvents):
    """Measure the accuracy on ``split`` after every epoch (``test_accuracy``) and stop
    training once it reaches ``target``: a benchmark's time to a test accuracy (``convnet
    bench --target-accuracy``). A run that decides by what it measures watches validation instead
    (``target_accuracy``: :class:`Validation`)."""

    def __init__(self, split: Split, target: float, *, tta: bool = False) -> None:
        self.split, self.target, self.tta = split, target, tta
        self.logits: torch.Tensor | None = None  # of the last measurement, for whoever scores the final model

    def on_epoch_end(self, state: TrainState) -> None:
        self.logits = infer(state.final_model, self.split.images, engine=state.engine, tta=self.tta)
        accuracy = float((self.logits.argmax(1) == self.split.labels.cpu()).float().mean())
        state.history[-1].test_accuracy = accuracy
        state.stop = state.stop or accuracy >= self.target


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
        if r.pool_used is not None:  # the share of the pool images drawn that the teacher was sure of
            extra += f"  pool {r.pool_used:.0%}" + (f" at {r.pool_confidence:.2f}" if r.pool_used else "")
        if state.peak is not None and state.peak.epoch == r.epoch:
            extra += "  best"
        elif state.best is not None and state.best.epoch == r.epoch:
            extra += "  kept"
        print(f"Categorical Cross Entropy : {r.loss:.3f}   epoch {r.epoch:>{width}}/{state.config.epochs}"
              f"  {r.seconds:6.1f} s  {r.images_per_s:8,.0f} images/s{extra}", file=self.stream, flush=True)

    def on_train_end(self, state: TrainState) -> None:
        best, peak, config = state.best, state.peak, state.config
        if best is None or peak is None:
            return
        why = ""
        if state.epoch < config.epochs:
            why = (f"stopped after epoch {state.epoch} of {config.epochs}: " + (
                f"validation accuracy {state.history[-1].val_accuracy:.4f} reached --target-accuracy "
                f"{config.target_accuracy}" if config.target_accuracy
                and (state.history[-1].val_accuracy or 0) >= config.target_accuracy
                else f"no better validation accuracy for --patience {config.patience} epochs") + "; ")
        which = "the best" if best.epoch == peak.epoch else \
            f"within one standard error of the best, {peak.val_accuracy:.4f} at epoch {peak.epoch}"
        print(f"{why}kept the weights of epoch {best.epoch} (validation accuracy {best.val_accuracy:.4f}, loss "
              f"{best.val_loss:.3f}: {which})", file=self.stream, flush=True)


class RunWriter(TrainEvents):
    """Keeps the run folder current: history and a checkpoint every epoch (the last
    epoch's weights, optimizer state, random states: what ``--resume`` continues from); the
    weights the run keeps (the best epoch's on validation, else the last's) as soon as an
    epoch improves on them and at the end, when ``config.json`` records which epoch they are."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_epoch_end(self, state: TrainState) -> None:
        runfolder.write_history(self.run_dir, [asdict(r) for r in state.history])
        save_checkpoint(self.run_dir / runfolder.CHECKPOINT, state)
        if state.best is not None and state.best.epoch == state.epoch:  # the epoch kept moved on: written at once
            runfolder.write_weights(self.run_dir, state.final_model, state.config.model)

    def on_train_end(self, state: TrainState) -> None:
        runfolder.write_weights(self.run_dir, state.kept_model(), state.config.model)
        runfolder.write_kept(self.run_dir, {"epoch": state.epoch, "of": "last epoch"} if state.best is None else {
            **state.best.to_json(), "of": "the last epoch within one standard error of the best on validation",
            "best": state.peak.to_json() if state.peak is not None else None})
        if state.calibration is not None:
            runfolder.write_calibration(self.run_dir, state.calibration)
