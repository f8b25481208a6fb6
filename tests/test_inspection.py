"""Inspecting a run: the calibration error and its interval, confident learning's flags,
per-class scores, out-of-fold probabilities kept in the run, and `convnet inspect`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convnet.cli.parser import main
from convnet.training.config import TrainConfig
from convnet.trust.inspection import (
    calibration,
    calibration_bins,
    expected_calibration_error,
    find_label_issues,
    fold_config,
    per_class,
)


def test_the_expected_calibration_error_by_hand() -> None:
    # 4 images: two at confidence 0.95 (one right), two at 0.55 (both right)
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    bins = calibration_bins(probs, labels, bins=10)
    assert [b["images"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.95)
    # half the images off by 0.45, half by 0.45 the other way: ECE 0.45
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    one = np.array([[1.0, 0.0]])
    assert calibration_bins(one, np.array([0]), bins=15)[-1]["images"] == 1  # confidence 1.0 falls in the last bin


def test_a_calibrated_model_has_a_small_error_and_an_interval_around_it() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, 20_000)
    labels = (rng.uniform(size=20_000) > confidence).astype(int)  # right (label 0) with probability = confidence
    probs = np.stack([confidence, 1 - confidence], 1)
    good = calibration(probs, labels, resamples=200)
    assert good.ece < 0.015 and good.low <= good.ece <= good.high and good.high - good.low < 0.02
    sharp = np.stack([np.full(20_000, 0.999), np.full(20_000, 0.001)], 1)  # overconfident: 0.999 for 75 % right
    bad = calibration(sharp, labels, resamples=200)
    assert bad.ece == pytest.approx(0.999 - (labels == 0).mean(), abs=1e-9) and bad.low > 0.2


def test_confident_learning_finds_planted_label_errors() -> None:
    rng = np.random.default_rng(1)
    n, k = 3000, 5
    truth = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), truth] += 4  # a good model: most probability on the true class
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = truth.copy()
    planted = rng.choice(n, 90, replace=False)
    labels[planted] = (truth[planted] + rng.integers(1, k, 90)) % k  # another class
    flagged = find_label_issues(probs, labels)
    hits = np.isin(flagged, planted).sum()
    from cleanlab.count import num_label_issues

    assert len(flagged) == num_label_issues(labels, probs)  # as many as confident learning estimates: 61 here
    assert hits / len(flagged) >= 0.95 and hits / len(planted) >= 0.6, (hits, len(flagged))  # 61 of 61, of 90
    assert probs[flagged[0], labels[flagged[0]]] <= probs[flagged[-1], labels[flagged[-1]]]  # least likely first


def test_per_class_scores_and_the_most_confused_pairs() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 1, 0])
    probs = np.eye(3)[predicted]
    reports, pairs = per_class(probs, labels, ("a", "b", "c"))
    assert [(r.name, r.support, r.precision, r.recall) for r in reports] == [
        ("a", 3, 0.5, round(1 / 3, 4)), ("b", 2, 0.5, 1.0), ("c", 1, 0.0, 0.0)]
    assert pairs == [("a", "b", 2), ("c", "a", 1)]


def test_each_fold_trains_for_half_the_runs_epochs_from_fresh_weights() -> None:
    config = fold_config(TrainConfig(epochs=24, warmup_epochs=1.0, val_split=0.1, freeze_epochs=3, body_lr=0.1,
                                     repeats=5))
    assert (config.epochs, config.warmup_epochs, config.val_split, config.freeze_epochs, config.body_lr,
            config.repeats) == (12, 1.0, 0.0, 0, 1.0, 5)
    assert fold_config(TrainConfig(epochs=1, warmup_epochs=1.0)).epochs == 1


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .conftest import make_dataset_dir

    base = tmp_path_factory.mktemp("inspect")
    toy = make_dataset_dir(base / "toy", n_train=200, n_test=100)
    run = base / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy), "--model", "seed", "--epochs", "4",
                 "--val-split", "0.1", "--out", str(run), "--no-progress"]) == 0  # 20 held out, as asked
    return run


def test_inspect_a_run_in_the_terminal_as_json_as_csv_and_in_the_report(
        trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    table = tmp_path / "issues.csv"
    assert main(["inspect", str(trained_run), "--device", "cpu", "--train-folds", "2", "--csv", str(table)]) == 0
    out = capsys.readouterr().out
    assert "training labels checked by 2 models of 2 epochs, each predicting the fold it did not train on" in out
    assert "calibration on the test split, no temperature (train with --calibrate" in out
    assert "expected calibration error" in out and "most confused:" in out
    kept = list((trained_run / "inspect").glob("train-folds-2-*.safetensors"))
    from convnet.core import runfolder

    # the training split's 180 images (20 of the 200 are the validation split)
    assert len(kept) == 1 and runfolder.load_tensors(kept[0])["probabilities"].shape == (180, 10)
    assert (trained_run / "plots" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert (trained_run / "plots" / "mistakes_explained.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["inspect", str(trained_run), "--device", "cpu", "--train-folds", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout, and no training this time
    assert found["train_folds"]["reused"] is True and found["test_images"] == 100
    assert {i["split"] for i in found["label_issues"]} <= {"train", "test"}
    c = found["calibration"]
    assert 0 <= c["low"] <= c["ece"] <= c["high"] <= 1 and len(c["bins"]) == 15
    assert sum(b["images"] for b in c["bins"]) == 100
    assert [r["support"] for r in found["per_class"]] == np.bincount(
        [r for r in _test_labels(trained_run)], minlength=10).tolist()
    rows = list(csv.reader(table.open(newline="")))
    assert rows[0] == ["rank", "split", "index", "path", "given_class", "suggested_class", "confidence",
                       "given_probability"]
    assert len(rows) - 1 == len(found["label_issues"])

    assert main(["report", str(trained_run), "--html", str(tmp_path / "r.html"), "--device", "cpu"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Can I trust it?" in page and "expected calibration error" in page and "reliability diagram" in page
    assert found["label_issues"] and 'alt="likely label errors"' in page  # an untrained model: labels disagree
    with Image.open(trained_run / "plots" / "label_issues.png") as grid:
        assert grid.format == "PNG" and grid.height >= 200


def _test_labels(run: Path) -> list[int]:
    from convnet.use.loadrun import load_run

    return load_run(run, device="cpu").dataset(progress=False).test.labels.tolist()


@pytest.mark.parametrize(("args", "message"), [
    (["--train-folds", "1"], "--train-folds must be at least 2, got 1"),
    (["--train-folds", "500"], "--train-folds 500: the smallest class has"),
])
def test_inspect_refuses_what_it_cannot_do_in_one_line(args: list[str], message: str, trained_run: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["inspect", str(trained_run), "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_fitted_temperature_is_the_one_that_made_the_labels() -> None:
    import torch

    from convnet.training.events import fit_temperature

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=g) * 3
    labels = torch.multinomial((logits / 2.0).softmax(1), 1, generator=g).flatten()  # drawn at temperature 2
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


def test_a_calibrated_run_answers_with_its_temperature_everywhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from convnet.estimator import ConvNetClassifier
    from convnet.models.inference import infer
    from convnet.models.networks import Calibrated, uncalibrated
    from convnet.use.loadrun import load_run

    from .conftest import make_dataset_dir

    toy = make_dataset_dir(tmp_path / "toy", n_train=300, n_test=100)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy), "--model", "seed", "--epochs", "6",
                 "--calibrate", "--out", str(run), "--no-progress"]) == 0
    found = json.loads((run / "calibration.json").read_text())
    assert found["fitted_on"] == "validation split" and found["images"] == 30  # 0.1 of 300, held out
    assert found["nll_after"] <= found["nll_before"] and found["temperature"] > 0
    assert json.loads((run / "config.json").read_text())["train"]["val_split"] == 0.1
    loaded = load_run(run, device="cpu")
    assert isinstance(loaded.model, Calibrated) and loaded.model.temperature == found["temperature"]
    x = loaded.dataset(progress=False).test.images
    raw = infer(uncalibrated(loaded.model)[0], x, engine=loaded.engine, tta=loaded.tta).softmax(1).numpy()
    scaled = loaded.probabilities(x)
    assert np.abs(scaled - raw).max() > 1e-3 and (scaled.argmax(1) == raw.argmax(1)).all()  # same classes
    np.testing.assert_allclose(scaled, (torch.from_numpy(np.log(raw)) / found["temperature"]).softmax(1).numpy(),
                               atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == float((raw.argmax(1) == loaded.dataset(progress=False).test.labels.numpy())
                                                .mean())
    # the ONNX file carries it in its graph (the parity gate compared it with the run), the estimator too
    assert main(["export", str(run)]) == 0
    from convnet.use.onnxfile import open_onnx

    onnx = open_onnx(run / "model.onnx")
    assert onnx.describe()["temperature"] == found["temperature"]
    np.testing.assert_allclose(onnx.probabilities(x), scaled, atol=1e-4)
    clf = ConvNetClassifier.load(run, device="cpu")
    np.testing.assert_allclose(clf.predict_proba(x.numpy()), scaled, atol=1e-4)
    import pickle

    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(x.numpy()), scaled, atol=1e-4)
    saved = clf.save(tmp_path / "saved")
    assert json.loads((saved / "calibration.json").read_text())["temperature"] == found["temperature"]

    (run / "calibration.json").write_text('{"temperature": -1}')
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "calibration.json: no positive temperature in it" in err and err.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--calibrate", "--val-split", "0"], "--calibrate fits a temperature on held-out training images"),
    (["--calibrate", "--faithful"], "cannot be combined with --calibrate True"),
])
def test_calibrate_refuses_what_leaves_nothing_to_fit_on(args: list[str], message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from .conftest import make_dataset_dir

    toy = make_dataset_dir(tmp_path / "toy", n_train=50, n_test=20)
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--data-dir", str(toy), "--out", str(tmp_path / "run"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_inspect_fits_the_temperature_on_out_of_fold_probabilities(
        trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = trained_run.parent / "to-calibrate"
    shutil.copytree(trained_run, run)
    assert main(["inspect", str(run), "--device", "cpu", "--calibrate"]) == 1
    assert "--calibrate fits the temperature on out-of-fold probabilities" in capsys.readouterr().err
    assert main(["inspect", str(run), "--device", "cpu", "--train-folds", "2", "--calibrate", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    kept = json.loads((run / "calibration.json").read_text())
    assert kept["fitted_on"] == "out-of-fold probabilities of 2 folds" and kept["images"] == 180
    assert found["temperature"] == kept["temperature"] and found["train_folds"]["folds"] == 2
