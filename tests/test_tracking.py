"""`convnet train --log tensorboard --log mlflow`: the real libraries, read back with their own
readers (TensorBoard's event accumulator; an MLflow tracking server started here on 127.0.0.1
with a SQLite store), through a crash and `--resume`, `convnet export`, and the estimator."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.estimator import ConvNetClassifier
from convnet.training import events, tracking

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite store, artifacts served) on a free local port."""
    base = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                               "--artifacts-destination", str(base / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=open(base / "server.log", "w"))  # noqa: SIM115
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not start: {(base / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def _train(data: Path, *extra: str) -> int:
    return main(["train", "--device", "cpu", "--data-dir", str(data), "--model", "seed", "--epochs", "3",
                 "--batch-size", "32", "--subset", "200", "--no-progress", *extra])


def test_a_tracked_run_survives_a_crash_and_resume(toy_dir: Path, tmp_path: Path, mlflow_server: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    keep = events.save_checkpoint

    def crash_in_epoch_2(path: Path, state: events.TrainState) -> None:
        if state.epoch == 2:  # the worst moment: epoch 2 sent to the trackers and in history.json, no checkpoint
            raise KeyboardInterrupt
        keep(path, state)

    with monkeypatch.context() as m:
        m.setattr(events, "save_checkpoint", crash_in_epoch_2)
        assert _train(toy_dir, "--out", str(run), "--log", "tensorboard", "--log", "mlflow",
                      "--mlflow-uri", mlflow_server) == 130
    assert len(json.loads((run / runfolder.HISTORY).read_text())) == 2  # one epoch more than the checkpoint holds
    record = json.loads((run / tracking.RECORD).read_text())
    run_id = record["mlflow"]["run_id"]
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "KILLED"

    assert main(["train", "--device", "cpu", "--resume", str(run), "--data-dir", str(toy_dir), "--no-progress"]) == 0
    history = json.loads((run / runfolder.HISTORY).read_text())
    scores = json.loads((run / runfolder.METRICS).read_text())

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    losses = board.Scalars("loss/train")
    assert [e.step for e in losses] == [1, 2, 3]  # one point per epoch: the lost epoch 2's is dropped
    np.testing.assert_allclose([e.value for e in losses], [h["loss"] for h in history], rtol=1e-6)
    assert [e.step for e in board.Scalars("learning_rate")] == [1, 2, 3]
    assert board.Scalars("final/test_accuracy")[0].value == pytest.approx(scores["test"]["accuracy"])
    assert {"confusion_matrix", "mistakes"} <= set(board.Tags()["images"])

    found = client.get_run(run_id)
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["lr"] == str(json.loads((run / runfolder.CONFIG).read_text())["train"]["lr"])
    assert found.data.params["model"] == "seed" and found.data.params["data.name"] == "fashion-mnist"
    steps = client.get_metric_history(run_id, "loss_train")  # MLflow keeps every point: the lost epoch's too
    assert sorted(m.step for m in steps) == [1, 2, 2, 3]
    latest = {m.step: m.value for m in sorted(steps, key=lambda m: m.timestamp)}  # what its charts show last
    np.testing.assert_allclose([latest[k] for k in (1, 2, 3)], [h["loss"] for h in history], rtol=1e-6)
    assert found.data.metrics["final_test_accuracy"] == pytest.approx(scores["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.safetensors", "config.json", "metrics.json", "plots"} <= artifacts

    assert main(["export", str(run)]) == 0  # the export joins the run's artifacts
    assert "model.onnx" in {a.path for a in client.list_artifacts(run_id)}


def test_the_estimator_logs_each_fit(tmp_path: Path, mlflow_server: str) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), np.arange(60) % 3
    clf = ConvNetClassifier(model="seed", epochs=2, batch_size=16, device="cpu", random_state=0, verbose=0,
                            log=["tensorboard", "mlflow"], log_dir=tmp_path / "tb", mlflow_uri=mlflow_server)
    clf.fit(X, y)
    (folder,) = (tmp_path / "tb").iterdir()
    board = EventAccumulator(str(folder))
    board.Reload()
    np.testing.assert_allclose([e.value for e in board.Scalars("loss/train")], [h["loss"] for h in clf.history_],
                               rtol=1e-6)
    client = MlflowClient(mlflow_server)
    (found,) = client.search_runs([client.get_experiment_by_name("convnet").experiment_id],
                                  filter_string=f"attributes.run_name = '{folder.name}'")
    assert found.info.status == "FINISHED" and found.data.params["epochs"] == "2"
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "loss_train")) == [1, 2]


@pytest.mark.parametrize(("args", "message"), [
    (["--log", "mlflow", "--mlflow-uri", "sqlite:///{tmp}/x.db", "--resume", "{tmp}/run"],
     "leave out --log, --mlflow-uri"),
    (["--mlflow-uri", "http://127.0.0.1:9"], "--mlflow-uri says where MLflow keeps runs: give it with --log mlflow"),
    (["--log", "mlflow", "--mlflow-uri", "nosuchscheme://x"], "--log mlflow: cannot use nosuchscheme://x"),
    (["--log", "mlflow", "--mlflow-uri", "http://127.0.0.1:9"], "--log mlflow: cannot reach http://127.0.0.1:9"),
])
def test_tracking_flags_are_checked_before_anything_is_written(toy_dir: Path, tmp_path: Path, args: list[str],
                                                               message: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--resume" in args else ["--out", str(tmp_path / "new")]
    assert main(["train", "--device", "cpu", "--data-dir", str(toy_dir), *out, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists() and not (tmp_path / "x.db").exists()


def test_a_missing_library_names_the_install(toy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real(name, *a))
    assert _train(toy_dir, "--out", str(tmp_path / "run"), "--log", "tensorboard") == 1
    err = capsys.readouterr().err
    assert "--log tensorboard needs the tensorboard package" in err and "pip install 'convnet-toolkit[tracking]'" in err
    assert not (tmp_path / "run").exists()
