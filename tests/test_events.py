"""The loop's events: called in the order given, at the moments they name; validation and
the test accuracy filled into the epoch's record before anything prints or writes it; a
target accuracy stops training; the run writer keeps history and checkpoint current."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from convnet.core import runfolder
from convnet.core.errors import ConvnetError
from convnet.data.dataset import InputSpec, Split
from convnet.training.config import TrainConfig
from convnet.training.events import ConsolePrinter, EventList, RunWriter, StopAtAccuracy, TrainEvents
from convnet.training.loop import train
from convnet.training.state import TrainState

SPEC = InputSpec(1, 12, 12, ("dark", "light"))


def _split(n: int, seed: int) -> Split:
    """A problem the seed model learns in an epoch or two: the class is the image's brightness."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 180 + torch.randint(0, 60, (n, 1, 12, 12), generator=g)).to(torch.uint8)
    return Split(images, labels)


class Recorder(TrainEvents):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name, self.images = log, name, 0

    def on_train_start(self, state: TrainState, num_images: int) -> None:
        self.log.append(f"{self.name} start {num_images}")

    def on_batch_end(self, state: TrainState, num_images: int) -> None:
        self.images += num_images

    def on_epoch_end(self, state: TrainState) -> None:
        record = state.history[-1]
        self.log.append(f"{self.name} epoch {record.epoch} images {self.images} "
                        f"val {record.val_accuracy is not None} test {record.test_accuracy is not None}")

    def on_train_end(self, state: TrainState) -> None:
        self.log.append(f"{self.name} end")


def test_events_are_called_in_order_with_the_epochs_record_filled_in() -> None:
    log: list[str] = []
    config = TrainConfig(model="seed", epochs=2, batch_size=16, val_split=0.25)
    train(config, _split(64, 0), SPEC, events=[Recorder(log, "a"), StopAtAccuracy(_split(32, 1), 1.1),
                                               Recorder(log, "b")])
    # 48 images trained (a quarter held out for validation), 48 per epoch; validation runs before every event,
    # the test accuracy is filled in by StopAtAccuracy, so "a" (before it) sees none and "b" (after it) sees one
    assert log == ["a start 48", "b start 48",
                   "a epoch 1 images 48 val True test False", "b epoch 1 images 48 val True test True",
                   "a epoch 2 images 96 val True test False", "b epoch 2 images 96 val True test True",
                   "a end", "b end"]


def test_a_target_accuracy_stops_training_and_keeps_its_logits() -> None:
    test = _split(64, 1)
    stop = StopAtAccuracy(test, 0.9)
    result = train(TrainConfig(model="seed", epochs=30, batch_size=16, lr=3e-3), _split(256, 0), SPEC, events=stop)
    assert len(result.history) < 30 and result.history[-1].test_accuracy is not None
    assert result.history[-1].test_accuracy >= 0.9 > max([0.0, *(r.test_accuracy or 0.0 for r in result.history[:-1])])
    assert stop.logits is not None and stop.logits.shape == (64, 2)
    assert float((stop.logits.argmax(1) == test.labels).float().mean()) == result.history[-1].test_accuracy


def test_a_target_accuracy_or_patience_without_validation_is_refused() -> None:
    for watch in ({"target_accuracy": 0.9}, {"patience": 2}):
        with pytest.raises(ConvnetError, match="watch the validation accuracy; --val-split 0 holds no images out"):
            train(TrainConfig(model="seed", epochs=1, val_split=0.0, **watch), _split(16, 0), SPEC)


def test_the_printer_writes_the_tutorials_line_per_epoch_and_the_epoch_kept() -> None:
    out = io.StringIO()
    train(TrainConfig(model="seed", epochs=2, batch_size=16, val_split=0.0), _split(32, 0), SPEC,
          events=ConsolePrinter(out, progress=False))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("Categorical Cross Entropy : ") for line in lines)
    assert "epoch 1/2" in lines[0] and "epoch 2/2" in lines[1] and "images/s" in lines[0]
    out = io.StringIO()
    result = train(TrainConfig(model="seed", epochs=2, batch_size=16), _split(32, 0), SPEC,
                   events=ConsolePrinter(out, progress=False))
    *epochs, kept = out.getvalue().splitlines()
    assert len(epochs) == 2 and all("val loss" in line for line in epochs) and result.best is not None
    assert epochs[result.best["epoch"] - 1].endswith("  best")
    assert kept.startswith(f"kept the weights of epoch {result.best['epoch']} (validation accuracy ")


def test_the_run_writer_keeps_history_and_checkpoint_current(tmp_path: Path) -> None:
    log: list[str] = []
    result = train(TrainConfig(model="seed", epochs=2, batch_size=16), _split(32, 0), SPEC, run_dir=tmp_path,
                   events=EventList(Recorder(log, "x")))
    history = json.loads((tmp_path / runfolder.HISTORY).read_text())
    assert [h["loss"] for h in history] == [r.loss for r in result.history]  # the records, read back
    assert (tmp_path / runfolder.CHECKPOINT).is_file() and (tmp_path / runfolder.WEIGHTS).is_file()
    assert log[-1] == "x end"
    assert isinstance(RunWriter(tmp_path), TrainEvents)
