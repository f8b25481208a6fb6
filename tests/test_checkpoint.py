"""Checkpoints: everything the loop needs to go on (weights, moving average, optimizer
state, every random generator, epoch, history) comes back bit for bit, from a file that
holds tensors and JSON only; a checkpoint that does not fit is refused, named."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convnet.core.errors import RunError
from convnet.data.dataset import InputSpec
from convnet.models.engine import Engine
from convnet.models.networks import create_model
from convnet.training.checkpoint import load_checkpoint, save_checkpoint
from convnet.training.config import EpochRecord, TrainConfig
from convnet.training.loop import make_optimizer
from convnet.training.state import EMA, TrainState

SPEC = InputSpec(1, 12, 12, tuple("abc"))


def _state(model_name: str = "fastnet", seed: int = 0) -> TrainState:
    config = TrainConfig(model=model_name, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, ema=0.9)
    torch.manual_seed(seed)
    model = create_model(model_name, 3, 1, (12, 12))
    engine = Engine.faithful()
    return TrainState(config, SPEC, model, make_optimizer(config, model, engine), engine,
                      torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1), EMA(model, 0.9))


def _steps(state: TrainState, n: int) -> None:
    state.model.train()
    for _ in range(n):
        x = torch.rand(8, 1, 12, 12, generator=state.augment_rng)
        loss = torch.nn.functional.cross_entropy(state.model(x), torch.randint(0, 3, (8,), generator=state.shuffle_rng))
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        assert state.ema is not None
        state.ema.update()


def test_a_checkpoint_restores_the_loop_bit_for_bit(tmp_path: Path) -> None:
    state = _state()
    _steps(state, 3)
    state.epoch, state.history = 2, [EpochRecord(1, 1.5, 0.1, 80.0, 0.1, 0.4), EpochRecord(2, 1.1, 0.1, 80.0, 0.1)]
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    save_checkpoint(tmp_path / "c.safetensors", state)
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())

    restored = _state(seed=99)  # other weights, other generators
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    load_checkpoint(tmp_path / "c.safetensors", restored)
    assert (torch.equal(torch.rand(3), expected_draws[0]) and np.array_equal(np.random.rand(3), expected_draws[1])
            and random.random() == expected_draws[2])
    assert restored.epoch == 2 and restored.history == state.history
    for a, b in zip(state.model.state_dict().values(), restored.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert state.ema is not None and restored.ema is not None
    assert all(torch.equal(a, b) for a, b in zip(state.ema.module.state_dict().values(),
                                                   restored.ema.module.state_dict().values(), strict=True))
    assert torch.equal(state.ema.updates, restored.ema.updates)
    # going on from both gives the same weights: the optimizer's momentum and the generators came back too
    _steps(state, 2)
    _steps(restored, 2)
    for a, b in zip(state.model.parameters(), restored.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_pools_alignment_comes_back_into_the_tensor_the_step_holds(tmp_path: Path) -> None:
    from convnet.training.semi import Alignment

    align = Alignment(torch.tensor([0, 1, 2, 2]), 3, torch.device("cpu"))
    align(torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]))  # the running mean moved off the prior
    state = _state()
    state.align = align.running
    save_checkpoint(tmp_path / "c.safetensors", state)
    fresh = Alignment(torch.tensor([0, 1, 2, 2]), 3, torch.device("cpu"))
    restored = _state(seed=99)
    restored.align = fresh.running
    held = fresh.running  # what a replayed step reads
    assert not torch.equal(held, align.running)
    load_checkpoint(tmp_path / "c.safetensors", restored)
    assert restored.align is held and torch.equal(held, align.running)


def test_the_pools_thresholds_come_back_into_the_tensor_the_step_holds(tmp_path: Path) -> None:
    from convnet.training.semi import Adaptive

    adaptive = Adaptive(3, torch.device("cpu"))
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    adaptive(probs, probs.max(dim=1).values)  # the running means moved off their start
    state = _state()
    state.adaptive = adaptive.running
    save_checkpoint(tmp_path / "c.safetensors", state)
    restored = _state(seed=99)
    held = Adaptive(3, torch.device("cpu")).running  # what a replayed step reads
    restored.adaptive = held
    assert not torch.equal(held, adaptive.running)
    load_checkpoint(tmp_path / "c.safetensors", restored)
    assert restored.adaptive is held and torch.equal(held, adaptive.running)


def test_a_checkpoint_holds_tensors_and_json_only(tmp_path: Path) -> None:
    state = _state()
    save_checkpoint(tmp_path / "c.safetensors", state)
    with safe_open(tmp_path / "c.safetensors", "pt") as f:  # type: ignore[no-untyped-call]
        meta = json.loads(f.metadata()["convnet"])
    assert meta["epoch"] == 0 and meta["history"] == []


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.safetensors", _state("seed"))
    with pytest.raises(RunError, match="the checkpoint's weights do not fit model 'fastnet'"):
        load_checkpoint(tmp_path / "c.safetensors", _state("fastnet"))


def test_a_damaged_checkpoint_says_to_start_again(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _state())
    tensors = load_file(path)
    del tensors["rng.shuffle"]
    with safe_open(path, "pt") as f:  # type: ignore[no-untyped-call]
        metadata = f.metadata()
    save_file(tensors, path, metadata)
    with pytest.raises(RunError, match="damaged checkpoint .*KeyError.*start the run again"):
        load_checkpoint(path, _state())
