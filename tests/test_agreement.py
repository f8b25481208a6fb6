"""One run, one answer: `convnet predict RUN`, `convnet predict RUN.onnx`, the estimator
and a served request give the same labels and probabilities (within 1e-4) for every
registered model, with and without test-time flips, even where the engine trains in
bfloat16. The CPU's capability is mocked, so the fault these tests guard against (bf16
arithmetic leaking into prediction) shows on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from convnet.cli.parser import main
from convnet.core import durable, runfolder
from convnet.estimator import ConvNetClassifier
from convnet.models import engine
from convnet.models.engine import Engine, make_engine
from convnet.models.inference import infer
from convnet.models.networks import create_model, head_name, list_models, load_weights
from convnet.use.export import MAX_PROBABILITY_DIFFERENCE, export_run
from convnet.use.loadrun import load_run
from convnet.use.prediction import TOP_K
from convnet.use.serve import ServeOptions, create_app, load_for_serving

from .conftest import make_dataset_dir
from .test_export import CLASSES, untrained_run

TOLERANCE = 1e-4  # the bound every way of predicting keeps to: the export's parity bound
assert TOLERANCE == MAX_PROBABILITY_DIFFERENCE


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("agree") / "toy", n_train=64, n_test=64)


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with native bfloat16, as an AVX512-BF16 server reports it: the fast engine trains in bf16."""
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    assert make_engine("cpu").autocast == torch.bfloat16


def decisive_run(folder: Path, model_name: str, data: Path, *, tta: bool) -> Path:
    """A run folder of a freshly built model made decisive: batch-norm statistics far from
    (0, 1) (:func:`untrained_run`) and a classifier head scaled so that the logits of
    :func:`images` spread by about 3 (probabilities far from uniform, not saturated, where
    bf16 rounding would move them by much more than the tolerance)."""
    torch.manual_seed(1)
    untrained_run(folder, model_name, data, tta=tta)
    model = create_model(model_name)
    load_weights(model, folder / runfolder.WEIGHTS)
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        spread = model.eval()(torch.from_numpy(images())[:, None].float() / 255).std()
        head.weight.mul_(3 / spread)
        if head.bias is not None:
            head.bias.mul_(3 / spread)
    runfolder.save_tensors(folder / runfolder.WEIGHTS, model.state_dict())
    return folder


def images(n: int = 24) -> np.ndarray:
    """Clothes-like uint8 images (N, 28, 28): smooth blobs on a dark background, and noise."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:28, 0:28]
    out = []
    for i in range(n):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 10)
        blob = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out.append(np.clip(blob + rng.normal(0, 20 if i % 2 else 60, (28, 28)), 0, 255))
    return np.stack(out).astype(np.uint8)


def cli_probabilities(target: Path, npy: Path, capsys: pytest.CaptureFixture[str]) -> np.ndarray:
    capsys.readouterr()
    assert main(["predict", str(target), str(npy), "--json", "--top-k", "10", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    out = np.zeros((len(rows), len(CLASSES)))
    for i, row in enumerate(rows):
        for entry in row["top"]:
            out[i, entry["label"]] = entry["probability"]
    return out


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
@pytest.mark.parametrize("model_name", list(list_models()))
def test_every_way_of_predicting_gives_the_same_answer(model_name: str, tta: bool, toy: Path, tmp_path: Path,
                                                       bf16_cpu: None, capsys: pytest.CaptureFixture[str]) -> None:
    run = decisive_run(tmp_path / "run", model_name, toy, tta=tta)
    x = images()
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    loaded = load_run(run, device="cpu")
    assert loaded.engine.autocast == torch.bfloat16  # the run trains in bf16 on this CPU ...

    # ... which would move its answers by far more than the tolerance, were bf16 used to predict
    reference = infer(loaded.model, torch.from_numpy(x)[:, None], engine=Engine.faithful(), tta=tta).softmax(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loaded.model(torch.from_numpy(x)[:, None].float() / 255).float().softmax(1)
    if not tta:
        assert (plain - reference).abs().max() > 10 * TOLERANCE
    assert reference.max(1).values.mean() > 0.25  # far from the uniform answer (0.1)

    answers = {"predict RUN": cli_probabilities(run, npy, capsys)}
    onnx = export_run(run, progress=False).path
    answers["predict RUN.onnx"] = cli_probabilities(onnx, npy, capsys)
    answers["estimator"] = ConvNetClassifier.load(run, device="cpu").predict_proba(x)

    from fastapi.testclient import TestClient

    with TestClient(create_app(load_for_serving(onnx), ServeOptions())) as client:  # a run folder: test_serve
        r = client.post("/predict", json={"images": x.tolist()})
    assert r.status_code == 200, r.text
    served = np.full((len(x), len(CLASSES)), np.nan)
    for i, row in enumerate(r.json()["predictions"]):
        for entry in row["top"]:
            served[i, entry["label"]] = entry["probability"]

    expected = reference.numpy()
    for name, got in answers.items():
        assert (got.argmax(1) == expected.argmax(1)).all(), name
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE, err_msg=name)
    assert (np.nanargmax(served, 1) == expected.argmax(1)).all()
    shown = ~np.isnan(served)
    assert shown.sum() == TOP_K * len(x)  # the service answers the top 3 of each image, as predict does
    np.testing.assert_allclose(served[shown], expected[shown], rtol=0, atol=TOLERANCE, err_msg="served")


def test_a_run_trained_in_bf16_records_the_scores_every_way_of_predicting_gives(
        toy: Path, tmp_path: Path, bf16_cpu: None, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(toy), "--model", "fastnet", "--epochs", "2", "--device", "cpu",
                 "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / runfolder.CONFIG).read_text())["engine"]["autocast"] == "bfloat16"  # it trained in bf16
    recorded = json.loads((run / runfolder.METRICS).read_text())
    assert recorded["inference"] == "fp32"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    again = json.loads(out.out)
    assert again["test"]["accuracy"] == recorded["test"]["accuracy"] and "note" not in out.err
    assert again["test"]["confusion_matrix"] == recorded["test"]["confusion_matrix"]
    assert main(["export", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["confusion_matrix"] == recorded["test"]["confusion_matrix"]


def test_evaluate_says_in_one_line_when_an_older_runs_recorded_accuracy_changes(
        toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(toy), "--model", "seed", "--epochs", "1", "--device", "cpu",
                 "--out", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / runfolder.METRICS).read_text())
    accuracy = metrics["test"]["accuracy"]
    del metrics["inference"]  # as a run scored before predictions were always fp32 recorded it
    metrics["test"]["accuracy"] = accuracy - 1 / 64  # one image predicted otherwise in bf16
    durable.write_json(run / runfolder.METRICS, metrics)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: the test accuracy recorded before, {accuracy - 1 / 64:.4f}, was predicted in the "
                     f"precision the run trained in; every prediction is fp32 now, which gives {accuracy:.4f} "
                     "(metrics.json updated)"]
    assert json.loads((run / runfolder.METRICS).read_text())["inference"] == "fp32"
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0  # the file is current now: nothing to say
    assert "note:" not in capsys.readouterr().out
