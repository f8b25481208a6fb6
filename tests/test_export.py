"""ONNX export: every registered model checked in ONNX Runtime against PyTorch, its
metadata, a failing model not written, colour folder runs, and `convnet predict` /
`convnet evaluate` on the .onnx file giving the run's own answers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import main
from convnet.core import durable, runfolder
from convnet.data.named import load_dataset
from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.models.networks import create_model, list_models
from convnet.use.export import MAX_PROBABILITY_DIFFERENCE, export_run, parity_path
from convnet.use.loadrun import load_model
from convnet.use.onnxfile import open_onnx

from .conftest import make_dataset_dir

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("export") / "toy", n_train=64, n_test=96)


def untrained_run(folder: Path, model_name: str, data: Path, *, tta: bool) -> Path:
    """A run folder holding a freshly initialised model (batch-norm statistics made
    non-trivial) for the toy data, recorded the way `convnet train` records a run."""
    folder.mkdir(parents=True)
    model = create_model(model_name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # what training leaves: statistics far from (0, 1)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    spec = {"channels": 1, "height": 28, "width": 28, "classes": CLASSES, "dark_background": True, "hflip": True,
            "scale": 1 / 255}
    durable.write_json(folder / runfolder.CONFIG, {
        "train": {"model": model_name, "tta": tta, "faithful": False}, "input": spec,
        "data": {"name": "fashion-mnist", "source": str(data), "subset": None, "kind": "named", "classes": CLASSES,
                 "image_shape": [1, 28, 28]}})
    runfolder.save_tensors(folder / runfolder.WEIGHTS, model.state_dict())
    return folder


@pytest.mark.parametrize("model_name", list(list_models()))
def test_every_registered_model_exports_with_parity(model_name: str, toy: Path, tmp_path: Path) -> None:
    tta = model_name != "seed"  # both kinds of graph: with and without test-time flips
    run = untrained_run(tmp_path / "run", model_name, toy, tta=tta)
    result = export_run(run, progress=False)
    assert result.path == run / "model.onnx" and result.path.is_file()
    p = result.parity
    assert p.passed and p.images == 96 and p.label_agreement >= 0.999
    assert p.max_probability_difference <= MAX_PROBABILITY_DIFFERENCE
    figures = json.loads(parity_path(result.path).read_text())
    assert figures["passed"] is True and figures["images"] == 96 and figures["opset"] == result.opset

    onnx = open_onnx(result.path)
    assert onnx.spec.shape == (1, 28, 28) and list(onnx.spec.classes) == CLASSES and onnx.tta == tta
    assert onnx.metadata["convnet.model"] == model_name and json.loads(onnx.metadata["convnet.parity"])["passed"]
    assert onnx.session.get_inputs()[0].type == "tensor(uint8)"
    model, _ = load_model(run, Engine.faithful())
    for n in (1, 5, 130):  # the batch axis is dynamic
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
        expected = infer(model, images, engine=Engine.faithful(), tta=tta).softmax(dim=1).numpy()
        got = onnx.probabilities(images)
        assert got.shape == (n, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=MAX_PROBABILITY_DIFFERENCE)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_a_model_that_fails_parity_is_not_written(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import convnet.use.export as export

    run = untrained_run(tmp_path / "run", "seed", toy, tta=False)
    original = export.export_model

    def drifted(model: torch.nn.Module, spec, *, tta: bool):  # type: ignore[no-untyped-def]
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.seq[-1].bias[3] += 2.0  # another model than the run's: the check must see it
        return original(other, spec, tta=tta)

    monkeypatch.setattr(export, "export_model", drifted)
    out = tmp_path / "m.onnx"
    assert main(["export", str(run), "--onnx", str(out)]) == 1
    err = capsys.readouterr().err
    assert "fails the parity check" in err and "not written" in err and err.count("\n") == 1
    assert not out.exists() and not parity_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary file left either


@pytest.mark.parametrize(("args", "message"), [
    (["export", "RUN", "--onnx", "model.txt"], "must end in .onnx"),
    (["export", "RUN", "--onnx", "missing/model.onnx"], "does not exist"),
    (["export", "RUN", "--onnx", "."], "must end in .onnx"),
    (["export", "nowhere"], "no such run folder"),
    (["predict", "nowhere.onnx", "x.png"], "no such file"),
    (["evaluate", "notes.onnx"], "not a valid ONNX model"),
    (["export", "RUN", "--onnx", "taken.onnx"], "taken.parity.json, which is a folder"),
])
def test_export_errors_are_one_line(args: list[str], message: str, toy: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    untrained_run(tmp_path / "RUN", "seed", toy, tta=False)
    (tmp_path / "notes.onnx").write_text("not a model")
    (tmp_path / "taken.parity.json").mkdir()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("convnet: error: ")
    assert not (tmp_path / "RUN" / "model.onnx").exists()


@pytest.mark.parametrize(("metrics", "found"), [
    ([0.9, 0.8], "found an array"), (0.9, "found a number"), ({"test": 0.9}, 'found "test" holding a number'),
    ({"test": None}, 'found "test" holding null'),
])
def test_scores_that_are_not_an_object_stop_the_export_naming_the_file(
        metrics: object, found: str, toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A metrics.json edited into another shape is named, with how to rewrite it, before
    anything is exported (as a metrics.json that is not JSON at all)."""
    run = untrained_run(tmp_path / "run", "seed", toy, tta=False)
    durable.write_json(run / runfolder.METRICS, metrics)
    assert main(["export", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"convnet: error: {run / runfolder.METRICS}: not the scores `convnet evaluate` writes")
    assert found in err and f"run `convnet evaluate {run}` again" in err and err.count("\n") == 1
    assert not (run / "model.onnx").exists()


def test_a_recorded_accuracy_is_used_only_when_it_is_one(toy: Path, tmp_path: Path) -> None:
    from convnet.use.export import recorded_accuracy

    run = untrained_run(tmp_path / "run", "seed", toy, tta=False)
    assert recorded_accuracy(runfolder.open_run(run)) is None  # no metrics.json: the accuracy measured at export
    for test, expected in (({"accuracy": 0.75}, 0.75), ({"accuracy": 1}, 1.0), ({"accuracy": float("nan")}, None),
                           ({"accuracy": 7.5}, None), ({"accuracy": True}, None), ({"accuracy": "0.9"}, None),
                           ({}, None)):
        durable.write_json(run / runfolder.METRICS, {"test": test})
        assert recorded_accuracy(runfolder.open_run(run)) == expected, test


def tiny_onnx(path: Path, *, input_shape: tuple = ("N", 1, 2, 1), reshape: tuple = (-1, 2),
              output_shape: tuple = ("N", 2), output_type: str = "FLOAT", input_name: str = "images",
              metadata: dict[str, str] | None = None) -> Path:
    """A small .onnx file shaped like convnet's (uint8 images (N, 1, 2, 1) in, probabilities
    of 2 classes out), with what each argument changes."""
    import onnx
    from onnx import TensorProto, helper

    out_type = getattr(TensorProto, output_type)
    nodes = [helper.make_node("Cast", [input_name], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["pixels", "shape"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
             helper.make_node("Cast", ["p"], ["probabilities"], to=out_type)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(input_name, TensorProto.UINT8, list(input_shape))],
        [helper.make_tensor_value_info("probabilities", out_type, list(output_shape))],
        [helper.make_tensor("shape", TensorProto.INT64, [len(reshape)], list(reshape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    spec = {"channels": 1, "height": 2, "width": 1, "classes": ["a", "b"]}
    helper.set_model_props(model, {"convnet.input": json.dumps(spec), **(metadata or {})})
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"input_name": "x"}, "its input (x tensor(uint8)"),
    ({"input_shape": (1, 1, 2, 1), "reshape": (1, 2), "output_shape": (1, 2)}, "any N"),
    ({"output_type": "UINT8"}, "is not the probabilities of its 2 classes"),
    ({"reshape": (-1,), "output_shape": (2,)}, "is not the probabilities of its 2 classes"),
    ({"metadata": {"convnet.parity": "NaN"}}, "metadata convnet.parity is not valid JSON (NaN"),
    ({"metadata": {"convnet.test_accuracy": "1e999"}}, "metadata convnet.test_accuracy is not valid JSON"),
    ({"metadata": {"convnet.data": "[" * 100_000}}, "metadata convnet.data is not valid JSON (nested too deeply)"),
    ({"metadata": {"convnet.split": "9" * 5000}}, "metadata convnet.split is not valid JSON"),
    ({"metadata": {"convnet.parity": '"\\ud800"'}}, "metadata convnet.parity is not valid JSON"),
    ({"metadata": {"convnet.input": "{"}}, "metadata convnet.input is not valid JSON"),
])
def test_a_damaged_onnx_file_is_refused_in_one_line(changes: dict, message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """What an .onnx file says of itself (inputs, outputs, metadata) is checked when it is
    opened, so that nothing it holds can fail later, in `convnet serve` above all."""
    path = tiny_onnx(tmp_path / "m.onnx")
    assert open_onnx(path).probabilities(np.zeros((3, 1, 2, 1), np.uint8)).shape == (3, 2)  # as made: accepted
    path = tiny_onnx(tmp_path / "m.onnx", **changes)
    Image.new("L", (1, 2)).save(tmp_path / "x.png")
    assert main(["predict", str(path), str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"convnet: error: {path}: ") and message in err and err.count("\n") == 1, err
    assert "export the run again" in err


def test_onnx_metadata_that_is_not_utf8_and_a_model_failing_at_run_time(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.core.errors import RunError

    path = tiny_onnx(tmp_path / "m.onnx", metadata={"convnet.model": "QQQQQQQQ"})
    path.write_bytes(path.read_bytes().replace(b"QQQQQQQQ", b"\xff\xfe\xfd\xfcQQQQ"))
    with pytest.raises(RunError, match="its metadata is not UTF-8 text"):
        open_onnx(path)
    path = tiny_onnx(tmp_path / "m.onnx", reshape=(1, 2))  # loads, but fails on a batch of more than one image
    model = open_onnx(path)
    assert model.probabilities(np.zeros((1, 1, 2, 1), np.uint8)).shape == (1, 2)
    with pytest.raises(RunError, match=r"ONNX Runtime failed on this model \(The input tensor cannot be reshaped"):
        model.probabilities(np.zeros((3, 1, 2, 1), np.uint8))
    assert capsys.readouterr().err == ""  # ONNX Runtime's own log stays quiet: the error says it all


def test_an_onnx_file_not_from_convnet_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "other.onnx")
    assert main(["predict", str(tmp_path / "other.onnx"), str(tmp_path / "x.png")]) == 1
    assert "not written by `convnet export`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy), "--model", "seed", "--epochs", "2",
                 "--batch-size", "16", "--faithful", "--out", str(run), "--no-progress"]) == 0
    return run


def test_predict_and_evaluate_accept_the_onnx_file(trained_run: Path, toy: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deployed.onnx"
    assert main(["export", str(trained_run), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "labels agree on" in printed and str(out) in printed and (tmp_path / "deployed.parity.json").is_file()
    images = load_dataset("fashion-mnist", toy).test.images[:8].numpy()
    np.save(tmp_path / "a.npy", images)
    for i in range(3):
        Image.fromarray(images[i, 0], "L").save(tmp_path / f"{i}.png")
    inputs = [str(tmp_path / "a.npy"), *(str(tmp_path / f"{i}.png") for i in range(3))]

    def rows(model: Path) -> list[dict]:
        assert main(["predict", "--device", "cpu", str(model), *inputs, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    from_run, from_onnx = rows(trained_run), rows(out)
    assert len(from_onnx) == 11
    assert [r["label"] for r in from_onnx] == [r["label"] for r in from_run]
    assert [r["input"] for r in from_onnx] == [r["input"] for r in from_run]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(from_onnx, from_run, strict=True)) < 1e-4

    def scores(model: Path) -> dict:
        assert main(["evaluate", "--device", "cpu", str(model), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    run_scores, onnx_scores = scores(trained_run), scores(out)
    assert onnx_scores["test"]["accuracy"] == pytest.approx(run_scores["test"]["accuracy"], abs=0.011)
    assert onnx_scores["train"]["accuracy"] == pytest.approx(run_scores["train"]["accuracy"], abs=0.02)
    assert np.array(onnx_scores["test"]["confusion_matrix"]).sum() == 96
    assert main(["evaluate", str(out)]) == 0
    assert "Plots in" not in capsys.readouterr().out  # an .onnx file has no run folder to draw into


def test_colour_folder_run_exports_and_evaluates_from_its_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A run on folders of colour images: the .onnx file takes RGB images and finds the
    run's split again from its own metadata, without the run folder's split.json."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for name, rgb in {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}.items():
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(10):
            img = np.clip(np.array(rgb) + rng.integers(-30, 31, (14, 18, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img, "RGB").save(tmp_path / "d" / name / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data", str(tmp_path / "d"), "--model", "fastnet", "--epochs", "2",
                 "--batch-size", "8", "--faithful", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--device", "cpu", str(run), "--json"]) == 0
    run_scores = json.loads(capsys.readouterr().out)
    out = tmp_path / "colour.onnx"
    assert main(["export", str(run), "--onnx", str(out)]) == 0
    capsys.readouterr()
    onnx = open_onnx(out)
    assert onnx.spec.channels == 3 and (onnx.spec.height, onnx.spec.width) == (14, 18)
    assert json.loads(onnx.metadata["convnet.split"]).keys() == {"train", "test"}
    (run / runfolder.SPLIT).rename(tmp_path / "split-moved.json")  # the file must not need its run folder
    assert main(["evaluate", str(out), "--json"]) == 0
    onnx_scores = json.loads(capsys.readouterr().out)
    assert onnx_scores["test"]["accuracy"] == pytest.approx(run_scores["test"]["accuracy"], abs=1e-9)
    assert onnx_scores["classes"] == ["blue", "green", "red"]
