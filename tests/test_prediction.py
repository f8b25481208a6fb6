"""Prediction: the predict command's output, the same whatever the size of the inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet import durable, runs
from convnet.inference import predict
from convnet.models import create_model


@pytest.fixture
def random_run(tmp_path: Path) -> Path:
    """A run folder with an untrained seed model: enough for the predict command."""
    run = tmp_path / "run"
    run.mkdir()
    durable.write_json(run / runs.CONFIG, {"train": {"model": "seed"}, "data": {
        "name": "fashion-mnist", "classes": [f"class {i}" for i in range(10)], "image_shape": [1, 28, 28]}})
    runs.save_tensors(run / runs.WEIGHTS, create_model("seed").state_dict())
    return run


def test_predict_command_output_is_unchanged_by_streaming(random_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.cli import main
    from convnet.loadrun import load_model

    arr = np.random.default_rng(0).integers(0, 256, (9000, 28, 28)).astype(np.uint8)  # three batches of 4096
    np.save(tmp_path / "a.npy", arr)
    Image.fromarray(arr[0], "L").save(tmp_path / "b.png")
    (tmp_path / "empty.npy").write_bytes(b"")
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "a.npy"), str(tmp_path / "empty.npy"),
                 str(tmp_path / "b.png"), "--json"]) == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert out == json.dumps(rows, indent=2) + "\n"  # what printing the whole list at once gave
    assert err.count("\n") == 2 and "empty.npy" in err and "1 of 3 inputs could not be read" in err
    model, _ = load_model(random_run)
    whole = predict(model, torch.from_numpy(arr[:, None]))
    assert [r["label"] for r in rows[:9000]] == whole.labels.tolist()
    assert [r["input"] for r in rows] == [f"{tmp_path / 'a.npy'}[{i}]" for i in range(9000)] + [str(tmp_path / "b.png")]
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "empty.npy"), "--json"]) == 1
    assert capsys.readouterr().out == "[]\n"
    assert main(["predict", "--device", "cpu", str(random_run), str(tmp_path / "b.png"), str(tmp_path / "a.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()
    label_column = {re.match(r"\S+ +", line).end() for line in lines}  # type: ignore[union-attr]
    assert len(lines) == 9001 and len(label_column) == 1  # one column width throughout
