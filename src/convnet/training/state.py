"""The training loop's state, as the loop hands it to its events and to checkpoints: the
live model, optimizer and random generators, the moving average of the weights, the
epochs done. It lives below :mod:`convnet.training.loop`, :mod:`convnet.training.events` and
:mod:`convnet.training.checkpoint`, which all read it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convnet.data.dataset import InputSpec
from convnet.models.engine import Engine
from convnet.training.config import EpochRecord, TrainConfig


class EMA:
    """An exponential moving average of a model's weights and buffers, updated in place
    after every step, so that it can be part of a step replayed as a CUDA graph.

    The decay warms up: after ``n`` updates it is ``min(decay, (1 + n) / (10 + n))``, so a
    short run (a small data set, few steps) averages its recent weights rather than its
    first ones. :attr:`module` is the averaged model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        self.updates = torch.zeros((), device=device)  # a tensor: counted inside a CUDA graph too
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
        self.floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        self.others = [(a, b) for a, b in pairs if not a.is_floating_point()]  # batch norm's step counters

    @torch.no_grad()
    def update(self) -> None:
        self.updates.add_(1)
        decay = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)
        ema, live = (list(t) for t in zip(*self.floats, strict=True))
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, torch._foreach_mul(live, 1 - decay))
        for a, b in self.others:
            a.copy_(b)


@dataclass
class Best:
    """An epoch on the validation images: the best so far (``state.peak``), or the one the
    run keeps (``state.best``, with its weights, the moving average's where there is one,
    on the CPU)."""

    epoch: int
    val_accuracy: float
    val_loss: float
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def better(self, accuracy: float, loss: float) -> bool:
        """Whether an epoch with this validation accuracy and loss beats this one: a higher
        accuracy, or the same with a lower loss (small validation sets tie often)."""
        return (accuracy, -loss) > (self.val_accuracy, -self.val_loss)

    def to_json(self) -> dict[str, float | int]:
        return {"epoch": self.epoch, "val_accuracy": self.val_accuracy, "val_loss": self.val_loss}


@dataclass
class TrainState:
    """What the loop hands to events: the live objects and the history so far."""

    config: TrainConfig
    spec: InputSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    engine: Engine
    shuffle_rng: torch.Generator
    augment_rng: torch.Generator
    ema: EMA | None = None  # the moving average of the weights, with --ema
    align: torch.Tensor | None = None  # with a pool: the running mean of the teacher's probabilities (semi.Alignment)
    adaptive: torch.Tensor | None = None  # with a pool: the running means behind the thresholds (semi.Adaptive)
    epoch: int = 0  # epochs completed
    history: list[EpochRecord] = field(default_factory=list)
    stop: bool = False  # an event sets this to end training after the current epoch
    calibration: dict[str, Any] | None = None  # the temperature fitted at the end (--calibrate), and on what
    best: Best | None = None  # the epoch the run keeps, with its weights (None without validation)
    peak: Best | None = None  # the best epoch on the validation images so far (no weights)

    @property
    def final_model(self) -> nn.Module:
        """The model as trained so far: the weights' moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def kept_model(self) -> nn.Module:
        """The model the run keeps: the best epoch's weights where there is validation,
        else the last epoch's (a copy where it differs from :attr:`final_model`)."""
        if self.best is None or self.best.epoch == self.epoch:
            return self.final_model
        model = copy.deepcopy(self.final_model)
        model.load_state_dict(self.best.weights)
        return model
