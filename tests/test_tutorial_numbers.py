"""The tutorial's full runs on the real Fashion-MNIST, through the command line: the
first acceptance test. Slow (about 6 minutes on 2 cores); `-m "not slow"` skips it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .test_training import TODAY_ADAM, TUTORIAL_SGD

# The tutorial's printed classification report for its SGD run (precision, recall, f1 per class).
TUTORIAL_SGD_REPORT = [
    (0.80, 0.83, 0.81), (0.98, 0.92, 0.95), (0.67, 0.79, 0.73), (0.75, 0.90, 0.82), (0.74, 0.69, 0.71),
    (0.96, 0.92, 0.94), (0.67, 0.48, 0.56), (0.89, 0.95, 0.92), (0.94, 0.94, 0.94), (0.95, 0.94, 0.94),
]


def _train(tmp_path: Path, optimizer: str, epochs: int) -> tuple[list[float], dict]:  # type: ignore[type-arg]
    out = tmp_path / optimizer
    p = subprocess.run([sys.executable, "-m", "convnet", "train", "--device", "cpu",
                        "--model", "seed", "--optimizer", optimizer,
                        "--lr", "0.001", "--epochs", str(epochs), "--batch-size", "128", "--seed", "42", "--faithful",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr
    losses = [float(x) for x in re.findall(r"^Categorical Cross Entropy : (\d\.\d{3})", p.stdout, re.M)]
    return losses, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_faithful_sgd_25_reproduces_the_tutorial(real_fashion: Path, tmp_path: Path) -> None:
    losses, metrics = _train(tmp_path, "sgd", 25)
    assert losses == TUTORIAL_SGD
    assert round(metrics["train"]["accuracy"], 3) == 0.848 and round(metrics["test"]["accuracy"], 3) == 0.836
    report = metrics["test"]["report"]
    got = [tuple(round(report[c][k], 2) for k in ("precision", "recall", "f1-score")) for c in metrics["classes"]]
    assert got == TUTORIAL_SGD_REPORT


@pytest.mark.slow
def test_faithful_adam_15_reproduces_todays_figures(real_fashion: Path, tmp_path: Path) -> None:
    losses, metrics = _train(tmp_path, "adam", 15)
    assert losses == TODAY_ADAM
    assert round(metrics["train"]["accuracy"], 3) == 0.948 and round(metrics["test"]["accuracy"], 3) == 0.896
