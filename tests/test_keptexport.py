"""On the CPU a run predicts in ONNX Runtime on its kept export (RUN/model.onnx): made once,
the first time it is asked for many images, written whole, used only while it matches the
weights, and giving the answers PyTorch gives (labels identical, probabilities within 1e-4).
A folder that cannot be written in, the estimator and a faithful run each take their path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from convnet.core import durable, runfolder
from convnet.data.dataset import Dataset, Split
from convnet.estimator import ConvNetClassifier
from convnet.models.networks import create_model
from convnet.trust.scoring import score_run
from convnet.use import loadrun
from convnet.use.export import MAX_PROBABILITY_DIFFERENCE, export_in_memory, export_run
from convnet.use.loadrun import load_run
from convnet.use.onnxgraph import WEIGHTS_KEY, weights_digest
from convnet.use.prediction import load

from .test_agreement import decisive_run
from .test_export import toy  # noqa: F401  (the module's data fixture)

EXPORT_FROM = 40  # lowered from 20,000 so that a test's few images make an export


@pytest.fixture(autouse=True)
def few_images_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadrun, "EXPORT_FROM", EXPORT_FROM)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_many_images_make_the_export_once_and_answer_as_pytorch(toy: Path, tmp_path: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = decisive_run(tmp_path / "run", "fastnet", toy, tta=True)
    loaded = load_run(run, device="cpu")
    few = images(EXPORT_FROM - 1)
    loaded.probabilities(few)
    assert not (run / runfolder.ONNX).exists()  # a few images: PyTorch, nothing exported
    many = images(3 * EXPORT_FROM, seed=1)
    got = loaded.probabilities(many)
    kept = run / runfolder.ONNX
    assert kept.is_file() and not list(run.glob(".*.tmp"))
    expected = loaded.torch_probabilities(many)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() <= MAX_PROBABILITY_DIFFERENCE
    assert not np.array_equal(got, expected)  # it really is another engine's arithmetic
    # from now on every call of the run uses it, a new process's too, and nothing exports again
    monkeypatch.setattr(loadrun, "export_model", lambda *a, **k: pytest.fail("exported twice"))
    again = load_run(run, device="cpu")
    small = again.probabilities(few)
    np.testing.assert_array_equal(small, loaded.probabilities(few))
    assert np.abs(small - again.torch_probabilities(few)).max() <= MAX_PROBABILITY_DIFFERENCE
    np.testing.assert_array_equal(load(run, device="cpu").predict_proba(few.numpy()).argmax(1), small.argmax(1))
    assert again.onnx is not None and again.onnx.kept() is not None


def test_an_export_of_other_weights_is_never_used(toy: Path, tmp_path: Path) -> None:  # noqa: F811
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    load_run(run, device="cpu").probabilities(images(EXPORT_FROM))
    before = (run / runfolder.ONNX).read_bytes()
    model = create_model("seed")  # the run's weights replaced: the export is stale
    runfolder.save_tensors(run / runfolder.WEIGHTS, model.state_dict())
    loaded = load_run(run, device="cpu")
    assert loaded.onnx is not None and loaded.onnx.kept() is None
    few = images(5)
    np.testing.assert_array_equal(loaded.probabilities(few), loaded.torch_probabilities(few))  # PyTorch, not it
    got = loaded.probabilities(images(EXPORT_FROM, seed=2))  # made again from the new weights
    assert (run / runfolder.ONNX).read_bytes() != before and loaded.onnx.kept() is not None
    assert np.abs(got - loaded.torch_probabilities(images(EXPORT_FROM, seed=2))).max() <= MAX_PROBABILITY_DIFFERENCE


def test_a_calibrated_run_exports_its_temperature(toy: Path, tmp_path: Path) -> None:  # noqa: F811
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    durable.write_json(run / runfolder.CALIBRATION, {"temperature": 2.5})
    loaded = load_run(run, device="cpu")
    many = images(EXPORT_FROM)
    got = loaded.probabilities(many)
    assert (run / runfolder.ONNX).is_file()
    assert np.abs(got - loaded.torch_probabilities(many)).max() <= MAX_PROBABILITY_DIFFERENCE
    durable.write_json(run / runfolder.CALIBRATION, {"temperature": 1.5})  # calibrated again: the export is stale
    assert load_run(run, device="cpu").onnx.kept() is None  # type: ignore[union-attr]


def test_a_write_that_fails_leaves_nothing_and_still_answers(toy: Path, tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    files = sorted(p.name for p in run.iterdir())

    def full_disk(path: Path, write: object) -> None:
        raise durable.RunError(f"{path}: no space left on device")

    monkeypatch.setattr(loadrun, "atomic_write", full_disk)
    loaded = load_run(run, device="cpu")
    many = images(EXPORT_FROM)
    got = loaded.probabilities(many)
    assert sorted(p.name for p in run.iterdir()) == files
    assert np.abs(got - loaded.torch_probabilities(many)).max() <= MAX_PROBABILITY_DIFFERENCE


def test_an_export_that_disagrees_is_not_used(toy: Path, tmp_path: Path,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    original = loadrun.export_model

    def drifted(model: torch.nn.Module, spec, *, tta: bool):  # type: ignore[no-untyped-def]
        import copy

        other = copy.deepcopy(model)
        with torch.no_grad():
            other.seq[-1].bias[3] += 2.0
        return original(other, spec, tta=tta)

    monkeypatch.setattr(loadrun, "export_model", drifted)
    loaded = load_run(run, device="cpu")
    many = images(EXPORT_FROM)
    np.testing.assert_array_equal(loaded.probabilities(many), loaded.torch_probabilities(many))
    assert not (run / runfolder.ONNX).exists()


def test_faithful_runs_and_gpus_stay_on_pytorch(toy: Path, tmp_path: Path) -> None:  # noqa: F811
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    config = runfolder.read_json(run / runfolder.CONFIG)
    config["train"]["faithful"] = True
    durable.write_json(run / runfolder.CONFIG, config)
    loaded = load_run(run, device="cpu")
    assert loaded.onnx is None
    loaded.probabilities(images(EXPORT_FROM))
    assert not (run / runfolder.ONNX).exists()


def test_convnet_export_writes_the_kept_export_and_serve_uses_it(toy: Path, tmp_path: Path,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    result = export_run(run, progress=False)
    assert result.path == run / runfolder.ONNX
    loaded = load_run(run, device="cpu")
    kept = loaded.onnx.kept() if loaded.onnx is not None else None
    assert kept is not None and kept.metadata[WEIGHTS_KEY] == weights_digest(run)
    monkeypatch.setattr("convnet.use.export.export_model", lambda *a, **k: pytest.fail("exported again to serve"))
    blob = export_in_memory(loaded)
    assert blob  # the kept file, its metadata brought up to date
    import onnx

    props = {p.key: p.value for p in onnx.load_model_from_string(blob).metadata_props}
    assert props[WEIGHTS_KEY] == weights_digest(run) and "convnet.parity" in props


def test_the_estimator_exports_in_memory_and_pickles_without_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (60, 8, 8)).astype(np.uint8)
    y = np.arange(60) % 3
    X[y == 1, :4] = 255  # learnable: bright top, bright bottom, dark
    X[y == 2, 4:] = 255
    clf = ConvNetClassifier(model="seed", epochs=1, batch_size=16, validation_fraction=0.0, device="cpu",
                            random_state=0, verbose=0).fit(X, y)
    torch_probs = clf.predict_proba(X[:5])  # fewer than EXPORT_FROM: PyTorch
    big = np.concatenate([X] * 2)
    fast = clf.predict_proba(big)  # exported in memory
    assert clf._onnx is not None and clf._onnx._session is not None
    assert np.abs(fast[:5] - torch_probs).max() <= MAX_PROBABILITY_DIFFERENCE
    np.testing.assert_allclose(fast.sum(1), 1.0, atol=1e-12)
    copy = pickle.loads(pickle.dumps(clf))
    assert getattr(copy, "_onnx", None) is None
    np.testing.assert_array_equal(copy.predict(big), clf.predict(big))
    assert not list(tmp_path.iterdir())  # no folder: nothing written anywhere here


def test_serving_a_run_keeps_the_export_it_makes(toy: Path, tmp_path: Path) -> None:  # noqa: F811
    run = decisive_run(tmp_path / "run", "seed", toy, tta=True)
    loaded = load_run(run, device="cpu")
    assert loaded.onnx is not None and loaded.onnx.kept() is None
    export_in_memory(loaded)  # what `convnet serve RUN` does at its start
    again = load_run(run, device="cpu")
    assert again.onnx is not None and again.onnx.kept() is not None  # the run's predictions use it from now on
    few = images(3)
    assert np.abs(again.probabilities(few) - again.torch_probabilities(few)).max() <= MAX_PROBABILITY_DIFFERENCE


def test_known_test_logits_are_reused_unless_the_run_predicts_in_onnx_runtime(toy: Path,  # noqa: F811
                                                                                 tmp_path: Path) -> None:
    run = decisive_run(tmp_path / "run", "seed", toy, tta=False)
    test = images(EXPORT_FROM - 1, seed=3)  # too few to make an export
    labels = torch.zeros(len(test), dtype=torch.int64)
    loaded = load_run(run, device="cpu")
    dataset = Dataset("arrays", loaded.spec, Split(test[:0], labels[:0]), Split(test, labels), "")
    said = torch.zeros(len(test), loaded.spec.num_classes)
    said[:, 0] = 9.0  # logits that a --target-accuracy run measured: class 0 for every image, all right
    assert score_run(loaded, dataset, test_logits=said, score_train=False).test.accuracy == 1.0  # reused
    truth = float((loaded.torch_probabilities(test).argmax(1) == 0).mean())
    assert truth < 1.0  # what the run itself predicts differs from what was said
    load_run(run, device="cpu").probabilities(images(EXPORT_FROM))  # the run now keeps an export
    again = load_run(run, device="cpu")
    assert score_run(again, dataset, test_logits=said, score_train=False).test.accuracy == pytest.approx(truth)
