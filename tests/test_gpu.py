"""The GPU engine: the training step replayed as a CUDA graph gives the eager step's
numbers; faithful runs, resume, predict, evaluate and bench on CUDA; torchrun with NCCL.

Tests that need CUDA carry the ``gpu`` marker and skip where no GPU is visible; the
graph switch's fall-back is checked on the CPU as well."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from convnet.core import runfolder
from convnet.data.named import load_dataset
from convnet.models.engine import Engine, StepRunner
from convnet.training.config import TrainConfig
from convnet.training.events import TrainEvents
from convnet.training.loop import train
from convnet.training.run import data_record, resume
from convnet.training.state import TrainState

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fastnet with everything a recipe uses (augmentation draws, a schedule, EMA, label smoothing),
# a batch size that leaves a ragged last batch (256 = 5 x 48 + 16)
FULL = TrainConfig(model="fastnet", optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                   epochs=3, batch_size=48, label_smoothing=0.1, augment="flip-translate", schedule="linear",
                   warmup_epochs=1.0, ema=0.9)


def convnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convnet", *args], capture_output=True, text=True, timeout=600)


def test_step_runner_runs_eagerly_off_cuda() -> None:
    """On the CPU the graph switch is a no-op: the same function runs, every call."""
    calls = []

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(len(labels))
        return images.float().sum()

    runner = StepRunner(step, Engine(torch.device("cpu"), graphs=True))
    for n in (4, 4, 4, 4, 4, 2):
        assert float(runner(images=torch.ones(n, 1, 2, 2), labels=torch.zeros(n))) == 4 * n
    assert calls == [4, 4, 4, 4, 4, 2] and runner.graph is None and runner.note == ""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_graphed_step_gives_the_eager_numbers(toy_dir: Path, optimizer: str) -> None:
    ds = load_dataset("fashion-mnist", toy_dir)
    config = replace(FULL, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3,
                     momentum=0.9 if optimizer == "sgd" else 0.0, nesterov=optimizer == "sgd")
    graphed_engine = Engine.fast(torch.device("cuda"))
    eager = train(config, ds.train, ds.spec, engine=replace(graphed_engine, graphs=False))
    graphed = train(config, ds.train, ds.spec, engine=graphed_engine)
    assert graphed.graphed and not eager.graphed
    for a, b in zip(eager.history, graphed.history, strict=True):  # same draws, same kernels: tolerance for bf16
        assert abs(a.loss - b.loss) < 2e-3 and abs(a.accuracy - b.accuracy) < 0.02, (a, b)
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(graphed.model.state_dict()[k].float(), v.float(), rtol=0.05, atol=0.02, msg=k)


@pytest.mark.gpu
@needs_cuda
def test_capture_failure_falls_back_to_eager() -> None:
    """A step that synchronises with the host cannot be captured: the runner says why and
    runs every step eagerly, with the same results."""
    device = torch.device("cuda")
    total = torch.zeros((), device=device)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total.add_(images.sum())
        if float(total) < 0:  # a host synchronisation: illegal while capturing
            total.zero_()
        return total.clone()

    runner = StepRunner(step, Engine.fast(device), warmup=1)
    out = [float(runner(images=torch.ones(3, device=device), labels=torch.zeros(3, device=device))) for _ in range(4)]
    assert out == [3.0, 6.0, 9.0, 12.0] and runner.graph is None and "capture failed" in runner.note


@pytest.mark.gpu
@needs_cuda
def test_faithful_first_losses_on_cuda(real_fashion: Path) -> None:
    """The tutorial's arithmetic on a GPU: its first losses, within what another
    convolution kernel (TF32, cuDNN) changes."""
    ds = load_dataset("fashion-mnist", real_fashion)
    engine = Engine.faithful(torch.device("cuda"))
    sgd = TrainConfig(model="seed", optimizer="sgd", lr=0.001, epochs=2, batch_size=128, seed=42, faithful=True)
    losses = [r.loss for r in train(sgd, ds.train, ds.spec, engine=engine).history]
    assert abs(losses[0] - 2.288) < 0.005 and abs(losses[1] - 2.031) < 0.01, losses
    adam = replace(sgd, optimizer="adam", epochs=1)
    (first,) = [r.loss for r in train(adam, ds.train, ds.spec, engine=engine).history]
    assert abs(first - 0.499) < 0.005, first


class _StopAfter(TrainEvents):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, state: TrainState) -> None:
        state.stop = state.epoch >= self.epochs


@pytest.mark.gpu
@needs_cuda
def test_resume_on_the_gpu(toy_dir: Path, tmp_path: Path) -> None:
    """A graphed run stopped after an epoch and resumed ends where an uninterrupted one does
    (cuDNN's backward kernels add in a varying order: close, not bit for bit)."""
    ds = load_dataset("fashion-mnist", toy_dir)
    engine = Engine.fast(torch.device("cuda"))
    config = replace(FULL, optimizer="adam", lr=1e-3, momentum=0.0, nesterov=False)
    whole = train(config, ds.train, ds.spec, engine=engine, run_dir=runfolder.new_run_dir(tmp_path / "whole", "x"),
                  data_record=data_record(ds))
    part = runfolder.new_run_dir(tmp_path / "part", "x")
    train(config, ds.train, ds.spec, engine=engine, run_dir=part, events=_StopAfter(1), data_record=data_record(ds))
    resumed = resume(part, engine=engine, data_dir=toy_dir)
    assert [r.epoch for r in resumed.history] == [1, 2, 3] and resumed.graphed
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert abs(a.loss - b.loss) < 5e-3, (a, b)


@pytest.mark.gpu
@needs_cuda
def test_train_predict_evaluate_bench_on_cuda(toy_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = convnet("train", "--device", "cuda", "--data-dir", str(toy_dir), "--epochs", "2", "--batch-size", "64",
                "--out", str(run), "--no-progress")
    assert p.returncode == 0, p.stderr
    config = json.loads((run / runfolder.CONFIG).read_text())
    assert config["engine"]["cuda_graphs"] and "NVIDIA" in config["engine"]["device"]
    assert config["train"]["model"] == "airnet"  # the gpu recipe
    p = convnet("evaluate", "--device", "cuda", str(run), "--json")
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert ev == json.loads((run / runfolder.METRICS).read_text())
    np_path = tmp_path / "x.npy"
    import numpy as np

    np.save(np_path, load_dataset("fashion-mnist", toy_dir).test.images[:5].numpy())
    p = convnet("predict", "--device", "cuda", str(run), str(np_path), "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)) == 5, p.stderr
    p = convnet("bench", "--device", "cuda", "--data-dir", str(toy_dir), "--train-images", "128", "--batch-size",
                "32", "--repeats", "1", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["train_speedup"] > 0 and out["predict_speedup"] > 0 and "NVIDIA" in out["device"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_with_nccl_matches_one_process(tmp_path: Path) -> None:
    from .conftest import make_dataset_dir

    data = make_dataset_dir(tmp_path / "data", n_train=512, n_test=64)
    common = ["train", "--device", "cuda", "--data-dir", str(data), "--recipe", "tutorial", "--model", "seed",
              "--optimizer", "adam", "--lr", "0.001", "--epochs", "2", "--batch-size", "64", "--faithful",
              "--no-progress"]
    single = convnet(*common, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                            "-m", "convnet", *common, "--out", str(tmp_path / "multi")],
                           capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr
    assert runfolder.read_json(tmp_path / "multi" / runfolder.CONFIG)["engine"]["processes"] == 2
    a, b = (runfolder.load_tensors(tmp_path / side / runfolder.WEIGHTS) for side in ("single", "multi"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
