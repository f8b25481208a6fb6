"""Tracking: a run's epochs, scores, pictures and files in TensorBoard or MLflow
(``convnet train --log tensorboard`` / ``--log mlflow``, and the estimator's ``log=``).

* **TensorBoard**: event files in ``RUN/tensorboard/`` (``tensorboard --logdir runs``
  finds every run's): per epoch the loss, the accuracies, the learning rate and the
  throughput; at the end the final scores and the confusion matrix and mistakes grid as
  images. Written by PyTorch's ``SummaryWriter``.
* **MLflow**: a run in the experiment ``convnet`` (the command line takes another from
  ``MLFLOW_EXPERIMENT_NAME``), on ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else
  MLflow's own default (a local store's path made absolute): the resolved config and the
  data as parameters, the same per-epoch metrics, the final scores, the run folder as
  artifacts (and later the ``.onnx`` file that ``convnet export`` writes). A run that fails
  or is interrupted is marked so; a server that stops answering is named once and left out.

The run folder records which (:data:`RECORD`), so ``--resume`` continues the same
TensorBoard folder (dropping any point after the checkpoint it resumes from) and the same
MLflow run. Both libraries are extras (``pip install 'convnet-toolkit[tracking]'``), imported only
when asked for; without them ``--log`` says in one line what to install.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from convnet.core import runfolder
from convnet.core.durable import write_json
from convnet.core.errors import ConvnetError
from convnet.core.version import install_hint
from convnet.training.config import TRACKERS, TrainConfig
from convnet.training.events import TrainEvents
from convnet.training.state import TrainState

RECORD, TENSORBOARD = runfolder.TRACKING, runfolder.TENSORBOARD  # in the run folder: which trackers; the event files
EXPERIMENT = "convnet"  # the MLflow experiment when MLFLOW_EXPERIMENT_NAME names none
INSTALL = install_hint("tracking")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def check_log(names: Sequence[str], mlflow_uri: str | None = None) -> tuple[str, ...]:
    """The trackers asked for, each once, checked before anything is read or written.

    Raises:
        ConvnetError: an unknown tracker, one whose library is not installed (naming the
            install command), or ``mlflow_uri`` without MLflow.
    """
    for name in names:
        if name not in TRACKERS:
            raise ConvnetError(f"--log {name!r}: not a tracker; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConvnetError(f"--log {name} needs the {PACKAGES[name]} package, which is not installed: "
                               f"{INSTALL}")
    if mlflow_uri is not None and "mlflow" not in names:
        raise ConvnetError("--mlflow-uri says where MLflow keeps runs: give it with --log mlflow")
    return tuple(dict.fromkeys(names))


def epoch_metrics(state: TrainState) -> dict[str, float]:
    """The last epoch's numbers by name (those measured: validation only with a split)."""
    r = state.history[-1]
    found = {"loss/train": r.loss, "accuracy/train": r.accuracy, "loss/val": r.val_loss,
             "accuracy/val": r.val_accuracy, "accuracy/test": r.test_accuracy, "learning_rate": r.lr,
             "images_per_s": r.images_per_s}
    return {k: float(v) for k, v in found.items() if v is not None}


def final_metrics(scores: Mapping[str, Any]) -> dict[str, float]:
    """The final scores (``metrics.json``'s shape) by name: accuracies and macro F1."""
    found = {"final/test_accuracy": scores.get("test", {}).get("accuracy"),
             "final/train_accuracy": scores.get("train", {}).get("accuracy"),
             "final/test_macro_f1": scores.get("test", {}).get("report", {}).get("macro avg", {}).get("f1-score")}
    return {k: float(v) for k, v in found.items() if v is not None}


def parameters(config: TrainConfig, data: Mapping[str, Any]) -> dict[str, str]:
    """The resolved settings and what the data was, as MLflow parameters."""
    found = {**asdict(config), **{f"data.{k}": v for k, v in data.items() if not isinstance(v, dict | list)}}
    return {k: str(v)[:6000] for k, v in found.items()}  # MLflow's limit on a value


class Tracker(TrainEvents):
    """Sends each epoch to the trackers during training (a loop event), then the final
    scores, pictures and files (:meth:`finish`), or how it ended (:meth:`fail`).

    The trackers open when training starts, after a resumed run's checkpoint is read:
    TensorBoard then drops any point after the epochs the checkpoint holds. A tracker that
    stops answering (an MLflow server gone) is named once on stderr and left out for the
    rest of the run: training goes on, and the run folder keeps everything."""

    def __init__(self, folder: Path | None, record: dict[str, Any]) -> None:
        self.folder, self.record = folder, record
        self.step = 0
        self.writer: Any = None
        self.client: Any = None
        self.opened = False

    def on_train_start(self, state: TrainState, num_images: int) -> None:
        self.step = state.epoch
        if "tensorboard" in self.record["trackers"]:
            from torch.utils.tensorboard import SummaryWriter  # needs tensorboard: only when asked for

            folder = Path(self.record["tensorboard"]) if self.folder is None else self.folder / self.record[
                "tensorboard"]
            self.writer = SummaryWriter(log_dir=str(folder), purge_step=state.epoch + 1 if state.epoch else None)
        if "mlflow" in self.record["trackers"]:
            self.client = _client(self.record["mlflow"]["tracking_uri"])
            if state.epoch:
                self._mlflow(lambda run_id: self.client.update_run(run_id, status="RUNNING"))
        self.opened = True

    def on_epoch_end(self, state: TrainState) -> None:
        self.step = state.history[-1].epoch
        self.log(epoch_metrics(state))

    def _mlflow(self, call: Any) -> None:
        """``call(run_id)`` on the MLflow run; on failure, one line and no more MLflow."""
        if self.client is None:
            return
        try:
            call(self.record["mlflow"]["run_id"])
        except Exception as e:  # MLflow's, requests' and the store's errors alike
            print(f"convnet: MLflow stopped answering ({str(e).splitlines()[0][:200]}); the rest of this run is "
                  "in the run folder only", file=sys.stderr, flush=True)
            self.client = None

    def log(self, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, self.step)
            self.writer.flush()
        if self.client is not None:
            from mlflow.entities import Metric  # needs mlflow: only when asked for

            now = int(time.time() * 1000)
            batch = [Metric(name.replace("/", "_"), value, now, self.step) for name, value in metrics.items()]
            self._mlflow(lambda run_id: self.client.log_batch(run_id, metrics=batch))

    def finish(self, scores: Mapping[str, Any] | None = None, pictures: Mapping[str, Path] | None = None,
               artifacts: Path | None = None) -> None:
        """The final scores (``metrics.json``'s shape), pictures (PNG files by name) and
        files (a folder, as MLflow artifacts); then the trackers are closed."""
        self.log(final_metrics(scores or {}))
        if self.writer is not None:
            from PIL import Image

            for name, path in (pictures or {}).items():
                with Image.open(path) as im:
                    self.writer.add_image(name, np.asarray(im.convert("RGB")), self.step, dataformats="HWC")
            self.writer.close()
            self.writer = None
        if artifacts is not None:
            self._mlflow(lambda run_id: self.client.log_artifacts(run_id, str(artifacts)))
        self._mlflow(lambda run_id: self.client.set_terminated(run_id, "FINISHED"))
        self.client = None

    def fail(self, interrupted: bool) -> None:
        """Close the trackers after an error (``FAILED``) or Ctrl-C (``KILLED``); never raises."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.client is None and "mlflow" in self.record["trackers"] and not self.opened:
            self.client = _client(self.record["mlflow"]["tracking_uri"])  # failed before training started
        self._mlflow(lambda run_id: self.client.set_terminated(run_id, "KILLED" if interrupted else "FAILED"))
        self.client = None


def _client(uri: str | None) -> Any:
    from mlflow import MlflowClient  # needs mlflow: only when asked for

    return MlflowClient(tracking_uri=uri)


def absolute_uri(uri: str) -> str:
    """A local store's URI with an absolute path (``sqlite:///mlflow.db``, ``./mlruns``,
    ``file:mlruns``), so that ``--resume`` and ``convnet export`` find it from any folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return Path(uri[len("file:"):].lstrip("/") or ".").resolve().as_uri()
    if "://" not in uri and ":" not in uri.split("/")[0]:  # a plain path
        return Path(uri).resolve().as_uri()
    return uri


def reachable(uri: str, timeout: float = 5.0) -> None:
    """For an ``http(s)`` store: its host accepts a connection within ``timeout`` seconds
    (MLflow itself retries for minutes before it gives up).

    Raises:
        ConvnetError: it does not.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as e:
        raise ConvnetError(f"--log mlflow: cannot reach {uri} ({e.strerror or e}); start the tracking server "
                           "or give another --mlflow-uri") from None


def connect(names: Sequence[str], mlflow_uri: str | None = None, experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Before any data is read: MLflow's store reached and ``experiment`` found or made
    (``mlflow_uri``; None: MLflow's own default, which its ``MLFLOW_TRACKING_URI`` sets).

    Raises:
        ConvnetError: the store cannot be reached, named with MLflow's reason.
    """
    found: dict[str, Any] = {"trackers": list(names)}
    if "mlflow" not in names:
        return found
    if mlflow_uri is not None:
        reachable(mlflow_uri)
    try:
        client = _client(absolute_uri(mlflow_uri) if mlflow_uri is not None else None)
        uri = absolute_uri(client.tracking_uri)
        if uri != client.tracking_uri:
            client = _client(uri)
        got = client.get_experiment_by_name(experiment)
        experiment_id = got.experiment_id if got is not None else client.create_experiment(experiment)
    except ConvnetError:
        raise
    except Exception as e:  # MLflow raises its own, requests' and SQLAlchemy's errors: all mean "not reached"
        where = mlflow_uri or "MLflow's default store"
        raise ConvnetError(f"--log mlflow: cannot use {where}: {str(e).splitlines()[0][:300]}") from None
    found["mlflow"] = {"tracking_uri": uri, "experiment_id": experiment_id, "experiment": experiment}
    return found


def start(connection: dict[str, Any], folder: Path | None, name: str, config: TrainConfig,
          data: Mapping[str, Any], *, tensorboard_dir: Path | None = None) -> Tracker:
    """A new tracked run named ``name``: the MLflow run made with the parameters, the
    TensorBoard folder (``folder/tensorboard``, or ``tensorboard_dir`` without a run
    folder), and, in a run folder, :data:`RECORD` written for ``--resume``.

    Raises:
        ConvnetError: MLflow's store stopped answering since :func:`connect`.
    """
    record = dict(connection)
    if "tensorboard" in record["trackers"]:
        record["tensorboard"] = TENSORBOARD if tensorboard_dir is None else str(tensorboard_dir)
    if "mlflow" in record["trackers"]:
        m = record["mlflow"] = dict(record["mlflow"])
        try:
            client = _client(m["tracking_uri"])
            tags = {"convnet.run_folder": str(folder.resolve())} if folder is not None else {}
            m["run_id"] = client.create_run(m["experiment_id"], run_name=name, tags=tags).info.run_id
            from mlflow.entities import Param  # needs mlflow: only when asked for

            params = [Param(k, v) for k, v in parameters(config, data).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                client.log_batch(m["run_id"], params=params[i:i + 100])
        except Exception as e:
            raise ConvnetError(f"--log mlflow: cannot start a run in {m['tracking_uri']}: "
                               f"{str(e).splitlines()[0][:300]}") from None
    if folder is not None:
        write_json(folder / RECORD, record)
    return Tracker(folder, record)


def resume_tracking(folder: Path) -> Tracker | None:
    """The trackers a run folder recorded, to continue from its checkpoint; None when it
    has none.

    Raises:
        ConvnetError: a recorded tracker whose library is no longer installed.
    """
    path = folder / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    check_log(record.get("trackers", []))
    return Tracker(folder, record)


def log_file(folder: Path, file: Path) -> str | None:
    """A file made later from a tracked run (``convnet export``'s ``.onnx``) added to its
    MLflow run's artifacts; returns the run's id, or None when the run is not tracked in
    MLflow or MLflow is not installed."""
    path = folder / RECORD
    if not path.is_file() or importlib.util.find_spec("mlflow") is None:
        return None
    m = json.loads(path.read_text(encoding="utf-8")).get("mlflow")
    if not m:
        return None
    try:
        _client(m["tracking_uri"]).log_artifact(m["run_id"], str(file))
    except Exception as e:  # the file is written all the same: say why MLflow does not have it
        print(f"convnet: {file} not added to MLflow run {m['run_id']} ({str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return None
    return str(m["run_id"])
