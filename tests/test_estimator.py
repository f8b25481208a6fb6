"""The scikit-learn estimator and the functional API on plain arrays: every kind of X,
labels of any kind, scikit-learn's tools and its own estimator checks, saving, pickling.

Everything trains the seed model on scikit-learn's 8x8 digits (bundled with it, no
download) for a few epochs on the CPU, one thread: a tiny model runs faster on one.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import DataConversionWarning, NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

import convnet
from convnet.core import runfolder
from convnet.core.errors import ConvnetError, InputError
from convnet.estimator import ConvNetClassifier
from convnet.models.engine import make_engine
from convnet.training.recipes import DEFAULT_RECIPE

FAST = dict(model="seed", recipe="tutorial", epochs=3, batch_size=32, hflip=False, device="cpu", verbose=0,
            random_state=0)
DOCS = Path(__file__).parent.parent / "docs" / "ESTIMATOR.md"


def cpu_recipe() -> convnet.TrainConfig:
    """The default recipe on this CPU: ``cpu``, or ``cpu-fp32`` where it has no bfloat16."""
    return convnet.RECIPES[DEFAULT_RECIPE[make_engine("cpu").recipe_kind]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as images: (1797, 8, 8) float in [0, 1], labels 0..9."""
    X, y = load_digits(return_X_y=True)
    return (X / 16.0).reshape(-1, 8, 8), y


@pytest.fixture(scope="module")
def fitted(digits: tuple[np.ndarray, np.ndarray]) -> ConvNetClassifier:
    """Fitted on 600 digits whose labels are strings."""
    X, y = digits
    return ConvNetClassifier(**FAST).fit(X[:600], np.array([f"digit {v}" for v in y[:600]]))


def test_fit_predict_score_and_every_kind_of_x(fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray],
                                               tmp_path: Path) -> None:
    X, y = digits
    names = np.array([f"digit {v}" for v in y])
    assert fitted.score(X[600:900], names[600:900]) > 0.6  # chance is 0.1
    assert fitted.input_spec_.shape == (1, 8, 8) and fitted.input_spec_.dark_background
    assert fitted.classes_.tolist() == sorted(set(names[:600]))
    proba = fitted.predict_proba(X[900:940])
    assert proba.shape == (40, 10) and np.allclose(proba.sum(axis=1), 1.0)
    attributes = {k: id(v) for k, v in vars(fitted).items()}
    expected = fitted.predict(X[900:940])
    assert np.array_equal(fitted.classes_[proba.argmax(axis=1)], expected)
    pixels = np.rint(X[900:940] * 255).astype(np.uint8)  # (N, 8, 8), as floats in [0, 1] are read
    for path in range(3):
        Image.fromarray(pixels[path]).save(tmp_path / f"{path}.png")
    kinds: dict[str, Any] = {
        "uint8 (N, H, W)": pixels, "channels first": pixels[:, None], "channels last": pixels[..., None],
        "flattened (N, H*W)": pixels.reshape(40, 64), "float32 tensor": torch.from_numpy(X[900:940]).float(),
        "uint8 tensor channels first": torch.from_numpy(pixels[:, None]), "nested lists": pixels.tolist(),
        "colour channels last": np.repeat(pixels[..., None], 3, axis=3),
        "read-only memmap": _memmap(tmp_path / "x.npy", pixels), "Fortran order": np.asfortranarray(pixels),
        "int64": pixels.astype(np.int64),
    }
    for kind, x in kinds.items():
        assert np.array_equal(fitted.predict(x), expected), kind
    assert np.array_equal(fitted.predict([Image.fromarray(p) for p in pixels]), expected)
    assert np.array_equal(fitted.predict([tmp_path / f"{i}.png" for i in range(3)]), expected[:3])
    assert np.array_equal(fitted.predict(X[900:940][::-1]), expected[::-1])  # order and subsets do not matter
    assert np.array_equal(fitted.predict(X[910:915]), expected[10:15])
    assert {k: id(v) for k, v in vars(fitted).items()} == attributes  # predicting changes nothing


def _memmap(path: Path, a: np.ndarray) -> np.ndarray:
    np.save(path, a)
    return np.load(path, mmap_mode="r")


def test_labels_come_back_in_their_own_kind(digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    odd = y[:300] * 10 + 5  # ints that are not 0..k-1
    clf = ConvNetClassifier(**FAST).fit(X[:300], odd)
    assert clf.classes_.tolist() == list(range(5, 100, 10))
    pred = clf.predict(X[300:350])
    assert pred.dtype.kind == "i" and set(pred) <= set(odd)
    proba = clf.predict_proba(X[300:350])
    assert np.array_equal(clf.fit(X[:300], odd).predict_proba(X[300:350]), proba)  # fitted again: the same model
    with pytest.warns(DataConversionWarning):
        ConvNetClassifier(**FAST).fit(X[:300], odd[:, None])  # a column vector, as scikit-learn warns


def test_settings_are_the_recipe_with_the_parameters_laid_over_it(digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    clf = ConvNetClassifier(model="seed", epochs=1, batch_size=64, device="cpu", verbose=0, random_state=3,
                            hflip=False).fit(X[:200], y[:200])
    cpu = cpu_recipe()
    assert (clf.config_.optimizer, clf.config_.lr, clf.config_.ema) == (cpu.optimizer, cpu.lr, cpu.ema)
    assert (clf.config_.model, clf.config_.epochs, clf.config_.batch_size, clf.config_.seed) == ("seed", 1, 64, 3)
    assert clf.config_.augment == "translate" and not clf.config_.tta  # hflip=False: no mirrors
    assert (clf.config_.class_weight, clf.config_.sampler) == ("none", "passes")
    balanced = ConvNetClassifier(model="seed", epochs=1, device="cpu", verbose=0, hflip=False, class_weight="balanced",
                                 sampler="balanced").fit(X[:100], y[:100])
    assert (balanced.config_.class_weight, balanced.config_.sampler) == ("balanced", "balanced")
    with pytest.raises(ConvnetError, match="--optimizer"):
        ConvNetClassifier(**{**FAST, "optimizer": "lbfgs"}).fit(X[:50], y[:50])


@pytest.mark.parametrize("X, y, message", [
    ("images.png", [0, 1], "a str was given; expected a numpy array"),
    ({"a": 1}, [0, 1], "a dict was given; expected"),
    (np.zeros((30, 3)), np.arange(30) % 2, r"3 feature\(s\) .*tabular data is not images"),
    (np.zeros((30, 70)), np.arange(30) % 2, "70 values per row is not a flattened square image"),
    (np.full((4, 8, 8), np.nan), [0, 1, 0, 1], "NaN"),
    (np.full((4, 8, 8), -1.0), [0, 1, 0, 1], "Negative values"),
    (np.full((4, 8, 8), 300.0), [0, 1, 0, 1], r"values in \[300, 300\]; expected \[0, 1\] or \[0, 255\]"),
    (np.zeros((4, 8, 8)), [0, 1, 0], "X holds 4 images but y 3 labels"),
    (np.zeros((4, 8, 8)), [1, 1, 1, 1], "one class"),
    (np.zeros((4, 4, 4)), [0, 1, 0, 1], "4x4 pixels .* at least 8x8"),
    (np.zeros((4, 3, 8, 3)), [0, 1, 0, 1], "reads both as channels first .* layout='nchw'"),
    (np.zeros(64), [0] * 32 + [1] * 32, "is not a collection of images"),
])
def test_bad_inputs_name_what_was_given(X: Any, y: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ConvNetClassifier(**FAST).fit(X, y)


def test_predict_errors(fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(NotFittedError):
        ConvNetClassifier(**FAST).predict(digits[0][:3])
    with pytest.raises(InputError, match=r"shape \(3, 10, 10\); expected \(N, 8, 8\)"):
        fitted.predict(np.zeros((3, 10, 10)))
    with pytest.raises(InputError, match="sparse"):
        from scipy import sparse

        fitted.predict(sparse.csr_array(np.zeros((3, 64))))


def test_the_functional_api_takes_arrays(fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    images = torch.from_numpy(np.rint(X[:300, None] * 255).astype(np.uint8))  # (N, 1, 8, 8)
    spec = replace(fitted.input_spec_, classes=tuple(str(c) for c in range(10)))
    config = convnet.TrainConfig(model="seed", epochs=2, batch_size=32)
    as_tensors = convnet.train(config, convnet.Split(images, torch.from_numpy(y[:300])), spec)
    as_arrays = convnet.train(config, (X[:300, :, :, None], y[:300].tolist()), spec)  # channels last, a list
    for a, b in zip(as_tensors.model.state_dict().values(), as_arrays.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model = as_arrays.model
    pixels = torch.from_numpy(np.rint(X[300:400, None] * 255).astype(np.uint8))  # what the floats are read as
    assert torch.equal(convnet.predict(model, X[300:400]).labels, convnet.predict(model, pixels).labels)
    dataset = convnet.Dataset("arrays", spec, convnet.Split(X[:100], y[:100]), convnet.Split(X[300:400], y[300:400]),
                              source="memory")
    scores = convnet.evaluate(model, dataset)
    assert scores.test.accuracy == pytest.approx(float((scores.test.predictions.numpy() == y[300:400]).mean()))
    for call, given in ((lambda: convnet.predict(model, "x.png"), "a str was given"),
                        (lambda: convnet.predict(model, np.zeros((2, 28, 28))), r"\(1, 28, 28\) .* do not fit"),
                        (lambda: convnet.train(config, X[:10], spec), "a ndarray was given; expected a convnet.Split"),
                        (lambda: convnet.train(config, (X[:10], y[:9]), spec), r"shape \(9,\); expected \(10,\)"),
                        (lambda: convnet.train(config, (X[:10], y[:10] + 10), spec), r"expected integer class"),
                        (lambda: convnet.evaluate(model, (X, y)), "a tuple was given; expected a convnet.Dataset")):
        with pytest.raises(InputError, match=given):
            call()


def test_scikit_learn_tools(fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params() and not hasattr(copy, "model_")
    copy.set_params(lr=0.003, epochs=2)
    assert (copy.get_params()["lr"], copy.lr, copy.epochs) == (0.003, 0.003, 2)
    flat = X[:300].reshape(300, 64)  # as load_digits gives them: rows of 64 pixels
    pipe = make_pipeline(FunctionTransformer(np.sqrt), ConvNetClassifier(**FAST)).fit(flat, y[:300])
    assert pipe.score(X[300:500].reshape(200, 64), y[300:500]) > 0.3
    search = GridSearchCV(ConvNetClassifier(**FAST), {"lr": [1e-3, 3e-3]}, cv=2).fit(X[:300], y[:300])
    assert search.best_params_["lr"] in (1e-3, 3e-3) and np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.config_.lr == search.best_params_["lr"]
    pred = cross_val_predict(ConvNetClassifier(**FAST), X[:300], y[:300], cv=2)
    assert pred.shape == (300,) and (pred == y[:300]).mean() > 0.3
    scores = cross_val_score(ConvNetClassifier(**FAST), X[:300], y[:300], cv=2, n_jobs=2)  # pickled to 2 processes
    assert scores.shape == (2,) and (scores > 0.3).all(), scores


def test_validation_fraction_and_warm_start(digits: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = digits
    clf = ConvNetClassifier(**{**FAST, "epochs": 2, "validation_fraction": 0.25, "warm_start": True})
    clf.fit(X[:400], y[:400])
    first = clf.history_
    assert len(first) == 2 and all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in first)
    clf.fit(X[:400], y[:400])  # continues from the weights learned so far
    assert [r["epoch"] for r in clf.history_] == [1, 2, 3, 4] and clf.history_[:2] == first
    assert clf.history_[2]["loss"] < first[0]["loss"]  # a fresh start would begin near log(10) = 2.3
    with pytest.raises(InputError, match="warm_start: y's classes"):
        clf.fit(X[:400], y[:400] % 5)
    clf.set_params(warm_start=False).fit(X[:400], y[:400])
    assert [r["epoch"] for r in clf.history_] == [1, 2]


def test_verbose(digits: tuple[np.ndarray, np.ndarray], capsys: pytest.CaptureFixture[str]) -> None:
    X, y = digits
    ConvNetClassifier(**FAST).fit(X[:100], y[:100]).predict(X[:10])
    assert capsys.readouterr() == ("", "")
    ConvNetClassifier(**{**FAST, "verbose": 1}).fit(X[:100], y[:100])
    out = capsys.readouterr().out
    assert len(re.findall(r"Categorical Cross Entropy : \d\.\d{3}\s+epoch \d/3", out)) == 3, out


def test_pickle_keeps_the_weights_as_safetensors(fitted: ConvNetClassifier,
                                                 digits: tuple[np.ndarray, np.ndarray]) -> None:
    state = fitted.__getstate__()
    assert isinstance(state["model_"]["safetensors"], bytes) and state["model_"]["model"] == "seed"
    assert not any(isinstance(v, torch.nn.Module) for v in state.values())
    back = pickle.loads(pickle.dumps(fitted))
    assert isinstance(back.model_, torch.nn.Module)
    X = digits[0][900:1000]
    assert np.array_equal(back.predict_proba(X), fitted.predict_proba(X))
    assert np.array_equal(back.classes_, fitted.classes_)


def test_a_pickle_names_no_convnet_class_but_the_estimator_and_an_older_one_still_loads(
        fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray]) -> None:
    """The settings and input spec travel as plain data; a pickle made before the modules moved into packages (it
    names convnet.config.TrainConfig and convnet.datatypes.InputSpec) finds them where they went."""
    text = pickle.dumps(fitted, protocol=0)
    assert text.count(b"cconvnet.") == text.count(b"cconvnet.estimator\nConvNetClassifier") >= 1
    older = {**fitted.__getstate__(), "config_": fitted.config_, "input_spec_": fitted.input_spec_}
    blob = pickle.dumps(older, protocol=0)  # protocol 0 names classes as text: renamed as an older version named them
    for new, old in ((b"cconvnet.training.config\n", b"cconvnet.config\n"),
                     (b"cconvnet.core.inputspec\n", b"cconvnet.datatypes\n")):
        assert new in blob
        blob = blob.replace(new, old)
    back = ConvNetClassifier.__new__(ConvNetClassifier)
    back.__setstate__(pickle.loads(blob))
    assert back.config_ == fitted.config_ and back.input_spec_ == fitted.input_spec_
    X = digits[0][900:950]
    assert np.array_equal(back.predict_proba(X), fitted.predict_proba(X))


def test_save_load_and_the_command_line(digits: tuple[np.ndarray, np.ndarray], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Saved with held-out images: they are kept in the run folder, and every command uses them."""
    from convnet.cli.parser import main

    X, y = digits
    clf = ConvNetClassifier(**FAST).fit(X[:400], y[:400] + 3)  # labels 3..12
    run = clf.save(tmp_path / "run", X[400:600], y[400:600] + 3)
    config = runfolder.read_json(run / runfolder.CONFIG)
    assert config["input"] == clf.input_spec_.to_json() and config["data"]["name"] == "arrays"
    assert config["estimator"]["classes"] == list(range(3, 13)) and config["estimator"]["params"]["lr"] is None
    assert (config["data"]["train_images"], config["data"]["test_images"]) == (400, 200)
    assert config["data"]["test_data"] == runfolder.TEST_DATA
    kept = runfolder.load_tensors(run / runfolder.TEST_DATA)  # safetensors: reading it runs no code
    assert kept["images"].dtype == torch.uint8 and kept["images"].shape == (200, 1, 8, 8)
    assert kept["labels"].tolist() == y[400:600].tolist()  # class indices: labels 3..12 are 0..9
    metrics = runfolder.read_json(run / runfolder.METRICS)
    accuracy = clf.score(X[400:600], y[400:600] + 3)
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert all((run / "plots" / f"{name}.png").is_file() for name in ("history", "confusion_matrix", "mistakes"))

    back = ConvNetClassifier.load(run)
    assert back.get_params() == clf.get_params() and back.classes_.tolist() == list(range(3, 13))
    assert np.array_equal(back.predict(X[600:700]), clf.predict(X[600:700]))
    predictor = convnet.load(run, device="cpu")
    assert predictor.input_spec == clf.input_spec_ and predictor.classes.tolist() == list(range(3, 13))
    assert np.array_equal(predictor.predict(X[600:700, :, :, None]), clf.predict(X[600:700]))
    assert np.allclose(predictor.predict_proba(X[600:700]), clf.predict_proba(X[600:700]))

    np.save(tmp_path / "x.npy", np.rint(X[600:603] * 255).astype(np.uint8))
    capsys.readouterr()
    assert main(["predict", "--device", "cpu", str(run), str(tmp_path / "x.npy"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [int(r["class"]) for r in rows] == clf.predict(X[600:603]).tolist()
    assert main(["report", "--device", "cpu", str(run), "--html", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 10_000
    assert main(["compare", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--device", "cpu", "--json", str(run)]) == 0  # scored again on the kept images
    scored = json.loads(capsys.readouterr().out)
    assert scored["test"]["accuracy"] == pytest.approx(accuracy, abs=0.01)
    assert scored["train"]["accuracy"] is None  # no training images kept: not measured, not made up
    assert main(["evaluate", "--device", "cpu", str(run)]) == 0
    assert "Train Accuracy : not measured" in capsys.readouterr().out
    assert main(["compare", str(run)]) == 0  # a run without a train accuracy is still compared
    with pytest.raises(ConvnetError, match="not empty"):
        clf.save(run)


def test_export_checks_parity_on_the_kept_images(fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from convnet.cli.parser import main

    X, y = digits
    names = np.array([f"digit {v}" for v in y])
    run = fitted.save(tmp_path / "run", X[600:700], names[600:700])
    assert main(["export", str(run)]) == 0
    parity = runfolder.read_json(run / "model.parity.json")
    assert parity["images"] == 100 and parity["label_agreement"] == 1.0
    capsys.readouterr()
    assert main(["evaluate", "--json", str(run / "model.onnx")]) == 0  # the kept images beside the .onnx file
    accuracy = json.loads(capsys.readouterr().out)["test"]["accuracy"]
    assert accuracy == pytest.approx(fitted.score(X[600:700], names[600:700]), abs=0.01)

    runfolder.save_tensors(run / runfolder.TEST_DATA, {"images": torch.zeros(3, 1, 10, 10, dtype=torch.uint8),
                                             "labels": torch.zeros(3, dtype=torch.int64)})
    assert main(["export", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{runfolder.TEST_DATA}: not uint8 images (1, 8, 8)" in err and err.count("\n") == 1, err
    (run / runfolder.TEST_DATA).write_bytes(pickle.dumps({"images": X[:3]}))  # a pickle is refused unread
    assert main(["evaluate", "--device", "cpu", str(run)]) == 1
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_load_a_convnet_train_run(toy_dir: Path, tmp_path: Path) -> None:
    from convnet.training.run import data_record

    data = convnet.load_dataset("fashion-mnist", toy_dir)
    config = convnet.TrainConfig(model="seed", optimizer="adam", epochs=1, batch_size=64, seed=7)
    run = runfolder.new_run_dir(tmp_path / "run", "x")
    convnet.train(config, data.train, data.spec, run_dir=run, data_record=data_record(data))
    clf = ConvNetClassifier.load(run, device="cpu")
    assert (clf.model, clf.optimizer, clf.epochs, clf.random_state) == ("seed", "adam", 1, 7)
    assert clf.classes_.tolist() == list(data.classes)  # a run's class names are its labels
    X, y = data.test.images.numpy(), data.test.labels.numpy()
    names = clf.predict(X)
    assert np.array_equal(names, clf.classes_[convnet.predict(clf.model_, data.test.images).labels.numpy()])
    clf.set_params(warm_start=True, verbose=0).fit(X, clf.classes_[y])  # continues the run's model on new arrays
    assert [r["epoch"] for r in clf.history_] == [1, 2]


def test_serving_a_saved_estimator(fitted: ConvNetClassifier, digits: tuple[np.ndarray, np.ndarray],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Saved without held-out images: `convnet predict` and a real `convnet serve` on
    127.0.0.1 answer in the estimator's class names; the commands that score say to pass
    X_test, y_test to save()."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    from convnet.cli.parser import main
    from convnet.use.loadtest import multipart_body, start_server, stop_server

    from .test_serve import _post

    run = fitted.save(tmp_path / "run")
    assert "test_data" not in runfolder.read_json(run / runfolder.CONFIG)["data"]
    assert not (run / runfolder.TEST_DATA).exists()
    png = tmp_path / "digit.png"
    Image.fromarray(np.rint(digits[0][900] * 255).astype(np.uint8)).save(png)
    expected = fitted.predict([png])[0]
    capsys.readouterr()
    assert main(["predict", "--device", "cpu", str(run), str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class"] == expected
    for command in (["evaluate", "--device", "cpu", str(run)], ["export", str(run)],
                    ["report", "--device", "cpu", str(run), "--html", str(tmp_path / "r.html")]):
        assert main(command) == 1, command
        err = capsys.readouterr().err
        assert err.startswith("convnet: error: ") and err.count("\n") == 1, err  # one line, no traceback
        assert "pass X_test, y_test to save()" in err, err
    assert not (run / "model.onnx").exists() and not (tmp_path / "r.html").exists()

    proc, url = start_server(run)  # `convnet serve RUN --port 0`: exported in memory, on 127.0.0.1
    with proc:  # its pipes closed at the end
        try:
            assert url.startswith("http://127.0.0.1:")
            status, answer = _post(url + "predict", *multipart_body([png.read_bytes()]))
        finally:
            assert stop_server(proc) == 0
    assert status == 200, answer
    (prediction,) = answer["predictions"]
    assert prediction["class"] == expected and expected in fitted.classes_  # "digit 0" … "digit 9"
    assert {t["class"] for t in prediction["top"]} <= set(fitted.classes_.tolist())


def test_grid_search_in_two_processes(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """GridSearchCV(n_jobs=2) pickles the estimator to two worker processes: the same
    scores as in one process (the CPU trains the same model for the same random_state,
    given the same number of threads: one, here as in the workers)."""
    from joblib import parallel_config

    X, y = digits
    tiny = {**FAST, "epochs": 1}
    grid = {"lr": [1e-3, 3e-3]}
    with parallel_config(backend="loky", inner_max_num_threads=1):
        search = GridSearchCV(ConvNetClassifier(**tiny), grid, cv=2, n_jobs=2).fit(X[:200], y[:200])
    alone = GridSearchCV(ConvNetClassifier(**tiny), grid, cv=2).fit(X[:200], y[:200])
    scores, expected = search.cv_results_["mean_test_score"], alone.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all() and (scores > 0.1).any(), scores  # chance is 0.1
    assert np.allclose(scores, expected), (scores, expected)
    assert search.best_params_ == alone.best_params_ and search.best_estimator_.config_.lr == search.best_params_["lr"]
    assert np.array_equal(search.predict(X[200:260]), alone.predict(X[200:260]))  # refitted here, in this process


# --- scikit-learn's own estimator checks

TABULAR = ("fits on tabular data (2 to 10 numbers per row); rows that are not images of at least 8x8 pixels are "
           "refused, so the check cannot pass; tests/test_estimator.py tests the same property on images")
EXPECTED_FAILURES = {name: TABULAR for name in (
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_estimators_dtypes", "check_dtype_object", "check_pipeline_consistency", "check_estimators_nan_inf",
    "check_estimators_pickle", "check_f_contiguous_array_estimator", "check_classifier_data_not_an_array",
    "check_classifiers_classes", "check_classifiers_train", "check_supervised_y_2d",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_dict_unchanged",
    "check_fit_idempotent", "check_fit_check_is_fitted", "check_n_features_in", "check_fit2d_predict1d")}
# fits on standardized tabular data, whose negative values are refused before its shape is looked at
EXPECTED_FAILURES["check_class_weight_classifiers"] = "Negative values in data"


def _name(check: Any) -> str:
    while hasattr(check, "func") or hasattr(check, "__wrapped__"):
        check = getattr(check, "func", None) or check.__wrapped__
    return str(check.__name__)


@parametrize_with_checks([ConvNetClassifier(**FAST)])
def test_scikit_learn_estimator_checks(estimator: ConvNetClassifier, check: Any) -> None:
    """Every check passes, except those that fit on tabular data: they fail, and for that
    reason only (a check that starts passing must leave the list)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _name(check) in EXPECTED_FAILURES:
            why = EXPECTED_FAILURES[_name(check)]
            message = r"feature\(s\) .*tabular data is not images" if why == TABULAR else why
            with pytest.raises(InputError, match=message):
                check(estimator)
        else:
            check(estimator)


def test_docs_list_the_checks_that_cannot_pass() -> None:
    text = DOCS.read_text()
    listed = set(re.findall(r"^\| `(check_\w+)` \|", text, flags=re.MULTILINE))
    assert listed == set(EXPECTED_FAILURES)


def test_the_estimator_sizes_training_and_fine_tunes_as_the_command_line_does(
        digits: tuple[np.ndarray, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import convnet.training.recipes

    X, y = digits
    monkeypatch.setattr(convnet.training.recipes, "SIZED_IMAGES", 600)  # small, so that the test is quick
    clf = ConvNetClassifier(model="fastnet", hflip=False, device="cpu", verbose=0, random_state=0)
    clf.fit(X[:100], y[:100])
    # epochs not given: sized to the 100 images trained on (10 held out would be too few to validate on)
    assert clf.config_.repeats == round(600 / 100) and clf.config_.epochs == cpu_recipe().epochs
    run = clf.save(tmp_path / "source")
    odd = y[100:160] % 2  # new classes: 0 and 1
    tuned = ConvNetClassifier(model="fastnet", epochs=2, hflip=False, device="cpu", verbose=0, random_state=0,
                              init_from=run).fit(X[100:160], odd)
    assert tuned.config_.freeze_epochs == 1 and tuned.config_.body_lr == 0.1  # fine-tuning's defaults
    body = "features.2.0.weight"
    assert torch.equal(tuned.model_.state_dict()[body], clf.model_.state_dict()[body]) is False  # trained after
    assert list(tuned.classes_) == [0, 1] and tuned.predict_proba(X[:5]).shape == (5, 2)
    with pytest.raises(ConvnetError, match="holds a fastnet model; leave out --model seed"):
        ConvNetClassifier(model="seed", epochs=2, device="cpu", verbose=0, init_from=run).fit(X[:40], y[:40] % 2)
