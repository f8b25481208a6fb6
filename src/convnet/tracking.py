"""Tracking: a run's epochs, scores, pictures and files in TensorBoard or MLflow
(``convnet train --log tensorboard`` / ``--log mlflow``, and the estimator's ``log=``).

* **TensorBoard**: event files in ``RUN/tensorboard/`` (``tensorboard --logdir runs``
  finds every run's): per epoch the loss, the accuracies, the learning rate and the
  throughput; at the end the final scores and the confusion matrix and mistakes grid as
  images. Written by PyTorch's ``SummaryWriter``.
* **MLflow**: a run in the experiment named by ``MLFLOW_EXPERIMENT_NAME`` (else
  ``convnet``), on ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own
  default: the resolved config and the data as parameters, the same per-epoch metrics,
  the final scores, the run folder as artifacts (and later the ``.onnx`` file that
  ``convnet export`` writes). A run that fails or is interrupted is marked so.

The run folder records which (:data:`RECORD`), so ``--resume`` continues the same
TensorBoard folder (dropping any point after the checkpoint it resumes from) and the same
MLflow run. Both libraries are extras (``pip install 'convnet[tracking]'``), imported only
when asked for; without them ``--log`` says in one line what to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from convnet.config import TrainConfig
from convnet.durable import write_json
from convnet.errors import ConvnetError
from convnet.events import TrainEvents
from convnet.trainstate import TrainState

TRACKERS = ("tensorboard", "mlflow")
RECORD = "tracking.json"  # in the run folder: which trackers, the TensorBoard folder, the MLflow run
TENSORBOARD = "tensorboard"  # the run folder's subfolder of event files
EXPERIMENT = "convnet"  # the MLflow experiment when MLFLOW_EXPERIMENT_NAME names none
INSTALL = "pip install 'convnet[tracking]'"
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
    return {k: str(v)[:500] for k, v in found.items()}  # MLflow's limit on a value


class Tracker(TrainEvents):
    """Sends each epoch to the trackers during training (a loop event), then the final
    scores, pictures and files (:meth:`finish`), or how it ended (:meth:`fail`)."""

    def __init__(self, folder: Path | None, record: dict[str, Any], *, resumed_at: int = 0) -> None:
        self.folder, self.record = folder, record
        self.step = resumed_at
        self.writer: Any = None
        self.client: Any = None
        if "tensorboard" in record["trackers"]:
            from torch.utils.tensorboard import SummaryWriter  # needs tensorboard: only when asked for

            self.writer = SummaryWriter(log_dir=str(self._tensorboard_dir()), purge_step=resumed_at + 1
                                        if resumed_at else None)
        if "mlflow" in record["trackers"]:
            self.client = _client(record["mlflow"]["tracking_uri"])
            if resumed_at:
                self.client.update_run(record["mlflow"]["run_id"], status="RUNNING")

    def _tensorboard_dir(self) -> Path:
        return Path(self.record["tensorboard"]) if self.folder is None else self.folder / self.record["tensorboard"]

    def on_epoch_end(self, state: TrainState) -> None:
        self.step = state.history[-1].epoch
        self.log(epoch_metrics(state))

    def log(self, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, self.step)
            self.writer.flush()
        if self.client is not None:
            from mlflow.entities import Metric  # needs mlflow: only when asked for

            now = int(time.time() * 1000)
            self.client.log_batch(self.record["mlflow"]["run_id"], metrics=[
                Metric(name.replace("/", "_"), value, now, self.step) for name, value in metrics.items()])

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
        if self.client is not None:
            run_id = self.record["mlflow"]["run_id"]
            if artifacts is not None:
                self.client.log_artifacts(run_id, str(artifacts))
            self.client.set_terminated(run_id, "FINISHED")

    def fail(self, interrupted: bool) -> None:
        """Close the trackers after an error (``FAILED``) or Ctrl-C (``KILLED``)."""
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.set_terminated(self.record["mlflow"]["run_id"], "KILLED" if interrupted else "FAILED")


def _client(uri: str | None) -> Any:
    from mlflow import MlflowClient  # needs mlflow: only when asked for

    return MlflowClient(tracking_uri=uri)


def connect(names: Sequence[str], mlflow_uri: str | None = None) -> dict[str, Any]:
    """Before any data is read: MLflow's store reached and its experiment found or made
    (``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default).

    Raises:
        ConvnetError: the store cannot be reached, named with MLflow's reason.
    """
    found: dict[str, Any] = {"trackers": list(names)}
    if "mlflow" not in names:
        return found
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    try:
        client = _client(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    except Exception as e:  # MLflow raises its own, requests' and SQLAlchemy's errors: all mean "not reached"
        where = uri or "MLflow's default store"
        raise ConvnetError(f"--log mlflow: cannot use {where}: {str(e).splitlines()[0][:300]}") from None
    found["mlflow"] = {"tracking_uri": client.tracking_uri, "experiment_id": experiment_id, "experiment": name}
    return found


def start(connection: dict[str, Any], folder: Path | None, name: str, config: TrainConfig,
          data: Mapping[str, Any], *, tensorboard_dir: Path | None = None) -> Tracker:
    """A new tracked run named ``name``: the MLflow run made with the parameters, the
    TensorBoard folder (``folder/tensorboard``, or ``tensorboard_dir`` without a run
    folder), and, in a run folder, :data:`RECORD` written for ``--resume``."""
    record = dict(connection)
    if "tensorboard" in record["trackers"]:
        record["tensorboard"] = TENSORBOARD if tensorboard_dir is None else str(tensorboard_dir)
    if "mlflow" in record["trackers"]:
        m = record["mlflow"] = dict(record["mlflow"])
        client = _client(m["tracking_uri"])
        tags = {"convnet.run_folder": str(folder.resolve())} if folder is not None else {}
        m["run_id"] = client.create_run(m["experiment_id"], run_name=name, tags=tags).info.run_id
        from mlflow.entities import Param  # needs mlflow: only when asked for

        params = [Param(k, v) for k, v in parameters(config, data).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            client.log_batch(m["run_id"], params=params[i:i + 100])
    if folder is not None:
        write_json(folder / RECORD, record)
    return Tracker(folder, record)


def resume_tracking(folder: Path, epochs_done: int) -> Tracker | None:
    """The trackers a run folder recorded, continued after ``epochs_done`` epochs; None
    when it has none.

    Raises:
        ConvnetError: a recorded tracker whose library is no longer installed.
    """
    path = folder / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    check_log(record.get("trackers", []))
    return Tracker(folder, record, resumed_at=epochs_done)


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
    _client(m["tracking_uri"]).log_artifact(m["run_id"], str(file))
    return str(m["run_id"])
