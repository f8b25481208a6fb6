"""`convnet tutorial --quick` tells the whole story and ends with a report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from convnet.core import runfolder


def test_tutorial_quick_end_to_end(toy_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tut"
    p = subprocess.run([sys.executable, "-m", "convnet", "tutorial", "--device", "cpu",
                        "--quick", "--data-dir", str(toy_dir),
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    text = p.stdout
    for section in ("== Load dataset", "== Create neural network", "== Train model (SGD optimizer)",
                    "== Train model (Adam optimizer)", "Classification Report", "== SGD vs Adam",
                    "== Channels first vs channels last"):
        assert section in text, section
    assert text.count("Categorical Cross Entropy : ") == 5 + 3
    assert "Linear(in_features=6272, out_features=10, bias=True)" in text
    assert "identical: True" in text
    assert (out / "report.html").is_file() and str(out / "report.html") in text
    for name in ("sgd", "adam"):
        assert (out / name / runfolder.WEIGHTS).is_file() and (out / name / runfolder.METRICS).is_file()
        assert len(runfolder.read_json(out / name / runfolder.HISTORY)) == (5 if name == "sgd" else 3)
