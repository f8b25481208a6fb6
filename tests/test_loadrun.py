"""Opening a trained model, one way: a run folder comes back with its own engine, its
trained weights and its data; a run folder or an .onnx file is told apart once; both
answer the same questions with the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convnet.core import runfolder
from convnet.core.errors import RunError
from convnet.data.named import load_dataset
from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.training.config import TrainConfig
from convnet.training.loop import train
from convnet.training.run import data_record
from convnet.use.export import MAX_PROBABILITY_DIFFERENCE, export_run
from convnet.use.loadrun import LoadedRun, load_model, load_run, open_model
from convnet.use.onnxfile import OnnxModel

from .conftest import make_dataset_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    base = tmp_path_factory.mktemp("loadrun")
    data = load_dataset("fashion-mnist", make_dataset_dir(base / "toy", n_train=64, n_test=48))
    config = TrainConfig(model="seed", epochs=1, batch_size=32, faithful=True)
    run_dir = runfolder.new_run_dir(base / "run", "seed-adam")
    result = train(config, data.train, data.spec, run_dir=run_dir, data_record=data_record(data))
    return run_dir, result.model


def test_a_run_comes_back_with_its_engine_weights_and_data(trained: tuple[Path, torch.nn.Module]) -> None:
    run_dir, model = trained
    loaded = load_run(run_dir, device="cpu")
    assert loaded.engine == Engine.faithful()  # a faithful run predicts with the tutorial's arithmetic
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the trained weights, bit for bit
    assert loaded.train_config.faithful and loaded.spec.classes[9] == "Ankle boot"
    assert list(loaded.labels) == list(loaded.spec.classes)  # not an estimator's run: the class names
    data = loaded.dataset(progress=False)
    assert len(data.train) == 64 and len(data.test) == 48
    images = data.test.images[:5]
    expected = infer(model, images, engine=Engine.faithful()).softmax(1).numpy()
    np.testing.assert_array_equal(loaded.probabilities(images), expected)
    same_model, run = load_model(run_dir)
    assert run.path == loaded.path and torch.equal(next(same_model.parameters()), next(model.parameters()))


def test_a_run_or_an_onnx_file_is_told_apart_once(trained: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    run_dir, _ = trained
    onnx_path = export_run(run_dir, tmp_path / "m.onnx", progress=False).path
    as_run, as_file = open_model(run_dir, device="cpu"), open_model(onnx_path)
    assert isinstance(as_run, LoadedRun) and isinstance(as_file, OnnxModel)
    assert as_run.spec == as_file.spec and as_run.tta == as_file.tta
    images = as_run.dataset(progress=False).test.images
    assert torch.equal(as_file.dataset(progress=False).test.images, images)
    np.testing.assert_allclose(as_file.probabilities(images), as_run.probabilities(images),
                               atol=MAX_PROBABILITY_DIFFERENCE)


def test_a_missing_or_broken_run_is_named(trained: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no such run folder"):
        load_run(tmp_path / "absent")
    with pytest.raises(RunError, match="no such file"):
        open_model(tmp_path / "absent.onnx")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (runfolder.CONFIG, runfolder.HISTORY):
        (broken / name).write_bytes((trained[0] / name).read_bytes())
    with pytest.raises(RunError, match=f"{runfolder.WEIGHTS}: missing"):
        load_run(broken)
