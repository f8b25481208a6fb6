"""Data-parallel training under torchrun: 2 CPU processes (gloo) give the same model
as one process with the same seed and global batch size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from convnet.core import durable, runfolder

from .conftest import make_dataset_dir

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One process trains the reference run; returns its folder and the training flags."""
    base = tmp_path_factory.mktemp("single")
    data = make_dataset_dir(base / "data", n_train=512, n_test=64)
    # The tutorial's Adam: it learns in these 24 steps without the chaotic swings that SGD with a large
    # momentum shows at the seed model's start, where a different summation order (two processes, one
    # thread each) grows into differences of 1e-2.
    common = ["train", "--device", "cpu",
              "--data-dir", str(data), "--recipe", "tutorial", "--model", "seed", "--optimizer", "adam",
              "--lr", "0.001", "--epochs", "3", "--batch-size", "64", "--faithful",
              "--device", "cpu", "--no-progress"]
    p = _run([sys.executable, "-m", "convnet", *common, "--out", str(base / "single")], base)
    assert p.returncode == 0, p.stderr
    return base / "single", common


@pytest.mark.parametrize("resume", [False, True])
def test_two_processes_match_one(tmp_path: Path, resume: bool, single: tuple[Path, list[str]]) -> None:
    reference, common = single
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "-m", "convnet"]
    work = tmp_path / "work"
    work.mkdir()
    if resume:  # stop after the first epoch, then continue under torchrun
        first = _run([*torchrun, *[c if c != "3" else "1" for c in common], "--out", str(tmp_path / "multi")], work)
        assert first.returncode == 0, first.stderr
        config = runfolder.read_json(tmp_path / "multi" / runfolder.CONFIG)
        config["train"]["epochs"] = 3
        durable.write_json(tmp_path / "multi" / runfolder.CONFIG, config)
        multi = _run([*torchrun, "train", "--resume", str(tmp_path / "multi"), "--device", "cpu", "--no-progress"],
                     work)
    else:
        multi = _run([*torchrun, *common, "--out", str(tmp_path / "multi")], work)
    assert multi.returncode == 0, multi.stderr
    a = runfolder.load_tensors(reference / runfolder.WEIGHTS)
    b = runfolder.load_tensors(tmp_path / "multi" / runfolder.WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # one process printed, one wrote
    assert multi.stdout.count("Test  Accuracy") == 1
    assert multi.stdout.count("Categorical Cross Entropy") == (2 if resume else 3)
    assert not list(work.iterdir()), "a second process wrote files"
    assert len(runfolder.read_json(tmp_path / "multi" / runfolder.HISTORY)) == 3
    assert runfolder.read_json(tmp_path / "multi" / runfolder.CONFIG)["engine"]["processes"] == 2
