"""An .onnx file read back: a convnet file opens with its input spec, predicts the same in
any batch size, and finds its run's data again through its metadata; any other file, or a
damaged one, is refused with a line saying why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from convnet.use.export import export_run
from convnet.use.loadrun import load_run
from convnet.use.onnxfile import is_onnx, open_onnx

from .conftest import make_dataset_dir
from .test_export import CLASSES, untrained_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("onnxfile")
    data = make_dataset_dir(base / "toy", n_train=32, n_test=40)
    run = untrained_run(base / "run", "fastnet", data, tta=True)
    return run, export_run(run, progress=False).path


def test_a_convnet_file_opens_with_its_spec_and_its_runs_data(exported: tuple[Path, Path]) -> None:
    run, path = exported
    model = open_onnx(path, threads=1)
    assert is_onnx(path) and not is_onnx(run)
    assert model.spec == load_run(run).spec and list(model.spec.classes) == CLASSES and model.tta
    data, own = model.dataset(progress=False), load_run(run).dataset(progress=False)  # found again, from metadata
    assert torch.equal(data.test.images, own.test.images) and torch.equal(data.test.labels, own.test.labels)
    parity = model.describe()["parity"]
    assert parity["passed"] is True and model.test_accuracy == parity["torch_accuracy"]  # no metrics.json: measured


def test_predictions_do_not_depend_on_the_batch_size(exported: tuple[Path, Path]) -> None:
    model = open_onnx(exported[1])
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = model.probabilities(images)
    np.testing.assert_allclose(model.probabilities(images, batch_size=5), whole, atol=1e-6)
    np.testing.assert_allclose(model.probabilities(images.numpy()), whole, atol=1e-6)  # an array as well
    assert model.probabilities(images[:0]).shape == (0, 10)


def _foreign(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_files_that_are_not_convnet_models_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    for path, message in ((tmp_path / "absent.onnx", "no such file"), (tmp_path, "no such file; it is a folder"),
                          (tmp_path / "junk.onnx", "not a valid ONNX model"),
                          (_foreign(tmp_path / "other.onnx"), "not written by `convnet export`")):
        with pytest.raises(Exception, match=message) as e:
            open_onnx(path)
        assert type(e.value).__name__ == "RunError"


def test_damaged_metadata_is_refused_before_use(exported: tuple[Path, Path], tmp_path: Path) -> None:
    proto = onnx.load(str(exported[1]))
    helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, "convnet.tta": "NaN"})
    onnx.save(proto, tmp_path / "damaged.onnx")
    with pytest.raises(Exception, match="metadata convnet.tta is not valid JSON .*export the run again"):
        open_onnx(tmp_path / "damaged.onnx")
