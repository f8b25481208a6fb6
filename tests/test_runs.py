"""The run folder: made new (never over another run), read back with every field the rest
of convnet relies on checked once, weights saved and loaded bit for bit, and nothing in it
ever unpickled."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from convnet.core import durable, runfolder
from convnet.core.errors import RunError
from convnet.data.dataset import InputSpec
from convnet.models.networks import create_model, load_weights


def _write_run(folder: Path, **data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    section = {"name": "fashion-mnist", "classes": ["a", "b"], "image_shape": [1, 28, 28], "subset": None, **data}
    durable.write_json(folder / runfolder.CONFIG, {"train": {"model": "seed", "tta": True}, "data": section})
    return folder


def test_weights_go_out_and_come_back_bit_for_bit(tmp_path: Path) -> None:
    model = create_model("fastnet", 3, 3, (16, 20))
    runfolder.save_tensors(tmp_path / runfolder.WEIGHTS, model.state_dict(), {"model": "fastnet"})
    again = create_model("fastnet", 3, 3, (16, 20))
    load_weights(again, tmp_path / runfolder.WEIGHTS)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_weights_of_another_model_are_refused_by_name(tmp_path: Path) -> None:
    runfolder.save_tensors(tmp_path / runfolder.WEIGHTS, create_model("seed", 10).state_dict())
    with pytest.raises(RunError, match=r"weights do not fit the model: .*wrong shape for"):
        load_weights(create_model("seed", 5), tmp_path / runfolder.WEIGHTS)


def test_a_pickle_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / runfolder.WEIGHTS
    path.write_bytes(pickle.dumps({"w": torch.zeros(2)}))
    with pytest.raises(RunError, match="not a valid safetensors file.*only as safetensors"):
        runfolder.load_tensors(path)


def test_a_run_folder_reads_back_with_its_spec(tmp_path: Path) -> None:
    run = runfolder.open_run(_write_run(tmp_path / "old"))
    assert run.model_name == "seed" and run.tta and not run.faithful and run.history == []
    # a run older than the input spec: derived from its data section (Fashion-MNIST: light on black)
    assert run.spec == InputSpec(1, 28, 28, ("a", "b"), dark_background=True, hflip=True)


@pytest.mark.parametrize(("change", "message"), [
    ({"classes": ["only"]}, r"data.classes \(\['only'\]\)"),
    ({"image_shape": [1, 28]}, "data.image_shape"),
    ({"subset": 0}, "data.subset"),
])
def test_a_damaged_config_is_named(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(RunError, match=f"missing or malformed {message}.*damaged"):
        runfolder.open_run(_write_run(tmp_path / "bad", **change))


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no such run folder"):
        runfolder.open_run(tmp_path / "absent")
    with pytest.raises(RunError, match="not a run folder"):
        runfolder.open_run(tmp_path)
    (tmp_path / runfolder.CONFIG).write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        runfolder.open_run(tmp_path)


def test_a_new_run_folder_never_takes_another_runs_place(tmp_path: Path) -> None:
    first = runfolder.new_run_dir(None, "seed-adam", root=tmp_path)
    second = runfolder.new_run_dir(None, "seed-adam", root=tmp_path)  # the same second: a suffix
    assert first != second and first.is_dir() and second.is_dir()
    (first / "x").write_text("1")
    with pytest.raises(RunError, match="already exists and is not empty; choose a new folder or use --resume"):
        runfolder.new_run_dir(first, "seed-adam")
    assert runfolder.new_run_dir(tmp_path / "empty", "x") == tmp_path / "empty"
