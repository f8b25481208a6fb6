"""End to end through the command line, on the toy data set: train -> files -> evaluate
-> predict on PNG and on NCHW/NHWC .npy; and the errors users meet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.data.named import load_dataset


def convnet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convnet", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from .conftest import make_dataset_dir

    base = tmp_path_factory.mktemp("cli")
    data = make_dataset_dir(base / "data")
    run = base / "run"
    p = convnet("train", "--device", "cpu",
                "--data-dir", str(data), "--model", "seed", "--epochs", "3", "--batch-size", "32",
                "--subset", "200", "--out", str(run))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Categorical Cross Entropy : ") == 3
    assert "Test  Accuracy : " in p.stdout and "Traceback" not in p.stderr
    return data, run


def test_train_writes_a_complete_run_folder(trained: tuple[Path, Path]) -> None:
    _, run = trained
    for name in (runfolder.CONFIG, runfolder.HISTORY, runfolder.WEIGHTS, runfolder.CHECKPOINT, runfolder.METRICS):
        assert (run / name).is_file(), name
    config = json.loads((run / runfolder.CONFIG).read_text())
    assert config["train"]["model"] == "seed" and config["data"]["subset"] == 200
    history = json.loads((run / runfolder.HISTORY).read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["images_per_s"] > 0 for h in history)


def test_evaluate_json(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, run = trained
    p = convnet("evaluate", "--device", "cpu", str(run), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert 0 <= out["train"]["accuracy"] <= 1 and 0 <= out["test"]["accuracy"] <= 1
    report = out["test"]["report"]
    assert report["accuracy"] == pytest.approx(out["test"]["accuracy"])
    assert set(report) >= {"T-shirt/top", "Ankle boot", "macro avg", "weighted avg"}
    cm = np.array(out["test"]["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == len(load_dataset("fashion-mnist", data).test)
    capsys.readouterr()
    assert main(["evaluate", "--device", "cpu", str(run)]) == 0
    text = capsys.readouterr().out
    assert "Classification Report" in text and "Ankle boot" in text


def test_predict_png_and_both_layouts(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    ds = load_dataset("fashion-mnist", data)
    first = ds.test.images[:6].numpy()  # (6, 1, 28, 28)
    np.save(tmp_path / "nchw.npy", first)
    np.save(tmp_path / "nhwc.npy", first.transpose(0, 2, 3, 1))
    Image.fromarray(first[0, 0], "L").save(tmp_path / "one.png")
    p = convnet("predict", "--device", "cpu", str(run), str(tmp_path / "nchw.npy"), str(tmp_path / "nhwc.npy"),
                str(tmp_path / "one.png"), "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == 13
    assert all({"input", "label", "class", "probability"} <= set(r) for r in rows)
    assert [r["label"] for r in rows[:6]] == [r["label"] for r in rows[6:12]]
    assert rows[12]["input"].endswith("one.png") and rows[12]["label"] == rows[0]["label"]
    assert all(0 <= r["probability"] <= 1 for r in rows)
    plain = convnet("predict", "--device", "cpu", str(run), str(tmp_path / "one.png"), "--top-k", "2")
    assert plain.returncode == 0 and "one.png" in plain.stdout
    second = rows[12]["top"][1]  # the text shows the --top-k classes too, in the JSON's order
    assert plain.stdout.rstrip().endswith(f"{second['class']} {second['probability']:.3f}"), plain.stdout
    single = convnet("predict", "--device", "cpu", str(run), str(tmp_path / "one.png"), "--top-k", "1")
    assert len(re.findall(r"\b[01]\.\d{3}\b", single.stdout)) == 1, single.stdout


def test_predict_bad_input_is_named_and_others_still_predicted(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    Image.new("L", (28, 28)).save(tmp_path / "good.png")
    p = convnet("predict", "--device", "cpu", str(run), str(tmp_path / "bad.png"), str(tmp_path / "good.png"), "--json")
    assert p.returncode == 1
    assert "bad.png" in p.stderr and "Traceback" not in p.stderr
    assert [r["input"] for r in json.loads(p.stdout)] == [str(tmp_path / "good.png")]


def test_resume_from_cli(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    p = convnet("train", "--device", "cpu", "--resume", str(run), "--data-dir", str(data))
    # already complete: nothing to add, said in one line that gives the whole command to train on from its
    # weights, on its data; the folder is as it was
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert f"{run} is complete (3 of 3 epochs" in p.stderr, p.stderr
    assert p.stderr.rstrip().endswith(f"convnet train --dataset fashion-mnist --subset 200 --init-from {run}")
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--device", "cpu", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--device", "cpu", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "--device", "cpu", "--data-dir", "/nonexistent-folder"], "no such folder"),
        (["evaluate", "--device", "cpu", "/nonexistent-run"], "no such run folder"),
        (["predict", "--device", "cpu", "/nonexistent-run", "x.png"], "no such run folder"),
    ],
)
def test_user_errors_are_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("convnet: error: ")


@pytest.mark.parametrize(("args", "message"), [
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_a_bad_flag_is_one_line_and_exit_1(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """As every user error: one line naming the flag, the value and what is accepted; the usage block is --help's."""
    assert main(["train", "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convnet: error: ") and message in err, err
    assert "--help`)" in err


def test_out_folder_not_empty_is_refused(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, run = trained
    assert main(["train", "--device", "cpu", "--data-dir", str(data), "--out", str(run)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_weights_that_do_not_fit(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    _, run = trained
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    config = json.loads((broken / runfolder.CONFIG).read_text())
    config["train"]["model"] = "fastnet"
    (broken / runfolder.CONFIG).write_text(json.dumps(config))
    p = convnet("evaluate", "--device", "cpu", str(broken))
    assert p.returncode == 1 and "do not fit" in p.stderr and "Traceback" not in p.stderr


def test_pickle_where_weights_belong_is_refused_unrun(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import pickle
    import shutil

    _, run = trained
    evil = tmp_path / "evil"
    shutil.copytree(run, evil)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    (evil / runfolder.WEIGHTS).write_bytes(pickle.dumps(Payload()))
    p = convnet("predict", "--device", "cpu", str(evil), str(tmp_path))
    assert p.returncode == 1 and "safetensors" in p.stderr
    assert not marker.exists(), "loading the weights ran code from the file"


def test_a_faithful_run_is_scored_with_the_tutorials_arithmetic(tmp_path: Path, toy_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate, predict and report read the run's engine (fp32, NCHW) from its config,
    never the fast one."""
    import importlib

    from convnet.models.engine import Engine

    predict_module, evaluate_module = (importlib.import_module(f"convnet.{m}") for m in ("loadrun", "evaluation"))

    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--faithful", "--data-dir", str(toy_dir), "--epochs", "1",
                 "--subset", "64", "--out", str(run), "--no-progress"]) == 0
    engines = []
    real = predict_module.infer

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        engines.append(kwargs.get("engine"))
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "infer", spy)
    monkeypatch.setattr(evaluate_module, "infer", spy)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert main(["evaluate", "--device", "cpu", str(run)]) == 0
    assert main(["predict", "--device", "cpu", str(run), str(png)]) == 0
    (run / runfolder.METRICS).unlink()  # so that report scores the run again
    assert main(["report", "--device", "cpu", str(run), "--html", str(tmp_path / "r.html")]) == 0
    assert len(engines) >= 5, engines  # both splits twice (evaluate, report) and the image
    assert all(e == Engine.faithful() for e in engines), engines


def test_resume_refuses_settings_it_would_ignore(trained: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", "--device", "cpu", "--resume", str(run), "--epochs", "9", "--lr", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leave out --lr, --epochs" in err, err
    assert main(["train", "--device", "cpu", "--resume", str(run), "--data", str(run), "--memory-budget", "9"]) == 1
    assert "leave out --data, --memory-budget" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_target_accuracy_watches_validation_and_the_test_split_is_scored_once(
        tmp_path: Path, toy_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--target-accuracy stops on the validation accuracy; the test images reach a model once, at the end."""
    import convnet.training.events
    import convnet.trust.evaluation
    import convnet.use.loadrun

    test_images = load_dataset("fashion-mnist", toy_dir).test.images
    scored_on, real = [], convnet.trust.evaluation.infer

    def counting(model, images, **kwargs):  # type: ignore[no-untyped-def]
        scored_on.append(len(images) == len(test_images) and bool(torch.equal(images, test_images)))
        return real(model, images, **kwargs)

    for module in (convnet.trust.evaluation, convnet.training.events, convnet.use.loadrun):  # every forward pass
        monkeypatch.setattr(module, "infer", counting)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy_dir), "--recipe", "tutorial", "--model", "fastnet",
                 "--lr", "0.003", "--epochs", "30", "--batch-size", "32", "--target-accuracy", "0.5", "--out", str(run),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    history = json.loads((run / runfolder.HISTORY).read_text())
    assert history[-1]["val_accuracy"] >= 0.5 and len(history) < 30 and "reached --target-accuracy 0.5" in out, out
    assert all(h["test_accuracy"] is None for h in history)
    assert scored_on.count(True) == 1 and len(scored_on) > len(history)  # the test split once; validation per epoch
    metrics = json.loads((run / runfolder.METRICS).read_text())
    assert 0 < metrics["train"]["accuracy"] <= 1 and 0 < metrics["test"]["accuracy"] <= 1


def test_a_small_data_set_is_trained_sized_and_says_so(tmp_path: Path, toy_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import convnet.training.recipes

    monkeypatch.setattr(convnet.training.recipes, "SIZED_IMAGES", 1_000)  # small, so that the test is quick
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy_dir), "--subset", "100", "--model", "seed",
                 "--recipe", "cpu", "--out", str(run), "--no-progress"]) == 0  # 24 epochs on any CPU
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "passes over" in line)
    assert line.startswith("24 epochs of 10 passes over 100 images (192 steps of 128): sized to the data"), line
    assert "no validation: 10 held-out images (--val-split 0.1 of 100) could not tell" in out, out
    history = json.loads((run / runfolder.HISTORY).read_text())
    assert len(history) == 24 and history[0]["images_per_s"] > 0
    config = json.loads((run / runfolder.CONFIG).read_text())["train"]
    assert config["repeats"] == 10 and config["epochs"] == 24  # recorded: --resume goes on the same way
    assert main(["train", "--device", "cpu", "--data-dir", str(toy_dir), "--subset", "100", "--model", "seed",
                 "--epochs", "2", "--out", str(tmp_path / "given"), "--no-progress"]) == 0
    assert "passes over" not in capsys.readouterr().out
    assert json.loads((tmp_path / "given" / runfolder.CONFIG).read_text())["train"]["repeats"] == 1


def test_models_lists_every_model_with_its_size_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    """The listing knows each model's size without building it (tests/test_models.py checks the counts);
    --speed builds and times them."""
    from convnet.models.networks import list_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "parameters"] and "images/s" not in lines[0]
    assert {line.split()[0] for line in lines[1:]} == set(list_models())
    assert main(["models", "--speed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "parameters", "images/s"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(list_models()) and all(float(cells[2].replace(",", "")) > 0 for cells in rows.values())


def test_imbalanced_classes_are_named_in_one_line_with_both_remedies(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    for name, n in (("common", 30), ("middle", 12), ("rare", 5)):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(folder / name / f"{i}.png")
    args = ["train", "--device", "cpu", "--data", str(folder), "--model", "seed", "--epochs", "1", "--no-progress",
            "--test-split", "0.2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("convnet: imbalanced")]
    assert warnings == ["convnet: imbalanced classes: 'common' has 24 training images, 'rare' 4 (6x); "
                        "--class-weight balanced or --sampler balanced gives the small classes more weight"]
    for remedy in (["--class-weight", "balanced"], ["--sampler", "balanced"]):
        assert main([*args, *remedy, "--out", str(tmp_path / remedy[0].strip("-"))]) == 0
        assert "convnet: imbalanced" not in capsys.readouterr().out
        config = json.loads((tmp_path / remedy[0].strip("-") / runfolder.CONFIG).read_text())["train"]
        assert config[remedy[0].strip("-").replace("-", "_")] == "balanced"
