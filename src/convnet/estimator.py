"""A scikit-learn estimator: fit, predict and score a convnet on the arrays a notebook holds.

:class:`ConvNetClassifier` keeps scikit-learn's contract: the constructor only stores its
parameters (the training settings, by the names ``convnet train`` uses), ``fit`` returns
``self``, what is learned ends in ``_``. It trains with the one loop in
:mod:`convnet.training`, predicts with :func:`~convnet.inference.infer`, and saves a normal run
folder. ``X`` is images: arrays or tensors ``(N, H, W)``, ``(N, C, H, W)``, ``(N, H, W, C)``
or flattened ``(N, H*W)``, a list of PIL images or of image files (see
:func:`convnet.arrays.as_images`); ``y`` any labels scikit-learn accepts.

scikit-learn's own estimator checks that fit on tabular data (a few numbers per row,
often negative) cannot pass: such rows are not images. ``docs/ESTIMATOR.md`` lists them.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from convnet import runs
from convnet.arrays import as_images, spec_of
from convnet.checkpoint import write_config
from convnet.config import TrainConfig
from convnet.datatypes import Dataset, InputSpec, Split
from convnet.durable import write_json
from convnet.engine import make_engine, resolve_device
from convnet.errors import InputError, RunError
from convnet.evaluation import SplitScores, evaluate
from convnet.events import ConsolePrinter
from convnet.experiment import run_config, tracked
from convnet.loadrun import load_run
from convnet.models import Calibrated, create_model, uncalibrated
from convnet.prediction import Predictor
from convnet.pretrained import Source, fit, open_source, spec_for
from convnet.report import write_plots
from convnet.tracking import check_log, connect, start
from convnet.training import train

# Parameters that are TrainConfig fields of the same name: None means "the recipe's value".
CONFIG_PARAMS = ("model", "optimizer", "lr", "epochs", "batch_size", "momentum", "nesterov", "weight_decay",
                 "label_smoothing", "augment", "translate_px", "schedule", "warmup_epochs", "ema", "tta", "shuffle",
                 "freeze_epochs", "body_lr", "class_weight", "sampler", "calibrate")


class ConvNetClassifier(ClassifierMixin, BaseEstimator):
    """A convolutional image classifier with scikit-learn's interface.

    Every training setting left at None takes the recipe's value (``convnet recipes``
    lists them; the default recipe is ``cpu`` on a CPU, ``gpu`` on a GPU).

    Args:
        model: a registered model (``convnet models``), e.g. ``seed`` (the tutorial's) or ``fastnet``.
        recipe: named settings (``tutorial``, ``cpu``, ``gpu``, ``best``); None: the device's.
        optimizer, lr, epochs, batch_size, momentum, nesterov, weight_decay, label_smoothing,
            augment, translate_px, schedule, warmup_epochs, ema, tta, shuffle: as
            ``convnet train --help`` describes them. ``epochs`` None: the recipe's, each
            epoch repeating a small data set to about 10,000 images, as ``convnet train`` does.
        faithful: the tutorial's exact arithmetic (fp32, no shuffling).
        init_from, freeze_epochs, body_lr: start from trained weights (a run folder or a
            ``.safetensors`` file), as ``convnet train --init-from`` does.
        class_weight, sampler: ``"balanced"`` for imbalanced classes, as ``convnet train
            --class-weight`` and ``--sampler`` (None: ``"none"`` and ``"passes"``).
        calibrate: fit a temperature on held-out images after training, as ``convnet train
            --calibrate`` (``validation_fraction``, 0.1 when it is 0); ``predict_proba`` uses it.
        validation_fraction: share of the training images held out, stratified, and scored
            after every epoch (``history_``'s ``val_loss`` and ``val_accuracy``); 0 = none.
        warm_start: a second ``fit`` continues from the weights learned so far (a fresh
            optimizer and schedule over ``epochs`` more epochs) instead of starting anew.
        hflip: whether a mirrored image keeps its class (False for digits and letters:
            then no flips in augmentation or test-time augmentation).
        layout: ``auto``, ``nchw`` or ``nhwc``: how to read a 4-d array whose shape fits both.
        device: ``auto``, ``cpu`` or ``cuda``.
        random_state: an int seeds the initial weights, the shuffle order, the augmentation
            and the validation split (the same model every time on a CPU); None draws a
            seed from numpy's global random state.
        log: ``"tensorboard"``, ``"mlflow"`` or both (a list), as ``convnet train --log``: the
            epochs and settings of each ``fit`` sent to TensorBoard (event files in
            ``log_dir/MODEL-OPTIMIZER-TIME/``) or to MLflow (``mlflow_uri``, else
            ``MLFLOW_TRACKING_URI``, else MLflow's default); needs ``pip install 'convnet[tracking]'``.
        log_dir: TensorBoard's folder (default ``tensorboard``: ``tensorboard --logdir tensorboard``).
        mlflow_uri: where MLflow keeps runs.
        verbose: 0 prints nothing; 1 prints a line per epoch, with a live bar in a terminal
            or notebook.

    Attributes:
        classes_: the labels seen in ``fit``, sorted (for a ``convnet train`` run loaded with
            :meth:`load`: its class names, in the model's order); ``predict_proba``'s columns
            follow them.
        model_: the trained network (a ``torch.nn.Module``).
        history_: one dict per epoch: loss, accuracy, seconds, images/s, learning rate and,
            with ``validation_fraction``, the held-out loss and accuracy.
        input_spec_: what the model takes (channels, size, class names), as a run records it.
        config_: the resolved training settings.
    """

    # learned in fit (declared for type checkers; set only by fit and load)
    classes_: np.ndarray
    model_: torch.nn.Module
    history_: list[dict[str, Any]]
    input_spec_: InputSpec
    config_: TrainConfig

    def __init__(self, *, model: str | None = None, recipe: str | None = None, optimizer: str | None = None,
                 lr: float | None = None, epochs: int | None = None, batch_size: int | None = None,
                 momentum: float | None = None, nesterov: bool | None = None, weight_decay: float | None = None,
                 label_smoothing: float | None = None, augment: str | None = None, translate_px: int | None = None,
                 schedule: str | None = None, warmup_epochs: float | None = None, ema: float | None = None,
                 tta: bool | None = None, shuffle: bool | None = None, faithful: bool = False,
                 init_from: str | os.PathLike[str] | None = None, freeze_epochs: int | None = None,
                 body_lr: float | None = None, class_weight: str | None = None, sampler: str | None = None,
                 calibrate: bool = False,
                 validation_fraction: float = 0.0, warm_start: bool = False, hflip: bool = True,
                 layout: str = "auto", device: str = "auto", random_state: int | np.random.RandomState | None = None,
                 log: str | list[str] | tuple[str, ...] | None = None, log_dir: str | os.PathLike[str] | None = None,
                 mlflow_uri: str | None = None, verbose: int = 1) -> None:
        self.model = model
        self.recipe = recipe
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.augment = augment
        self.translate_px = translate_px
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.ema = ema
        self.tta = tta
        self.shuffle = shuffle
        self.faithful = faithful
        self.init_from = init_from
        self.freeze_epochs = freeze_epochs
        self.body_lr = body_lr
        self.class_weight = class_weight
        self.sampler = sampler
        self.calibrate = calibrate
        self.validation_fraction = validation_fraction
        self.warm_start = warm_start
        self.hflip = hflip
        self.layout = layout
        self.device = device
        self.random_state = random_state
        self.log = log
        self.log_dir = log_dir
        self.mlflow_uri = mlflow_uri
        self.verbose = verbose

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True  # (N, H, W) images; 4-d ones too
        tags.input_tags.positive_only = True  # pixels: negative values are refused
        return tags

    # --- fitting

    def fit(self, X: Any, y: Any) -> ConvNetClassifier:
        """Train on images ``X`` with labels ``y`` (a fresh model, unless ``warm_start``).

        Raises:
            InputError (a ValueError): ``X`` is not images, ``y`` does not match it or holds one class.
            ConvnetError: a bad setting, named as ``convnet train`` names it.
        """
        warm = self.warm_start and hasattr(self, "model_")
        trackers = check_log((self.log,) if isinstance(self.log, str) else tuple(self.log or ()), self.mlflow_uri)
        y = column_or_1d(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y), warn=True)
        if len(y) == 0:
            raise InputError("y holds no labels (0 samples); give images of at least 2 classes")
        check_classification_targets(y)
        classes, labels = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise InputError(f"y holds one class ({classes[0]!r}); a classifier needs at least 2 classes")
        images = as_images(X, self.input_spec_ if warm else None, layout=self.layout, name="X")
        if len(images) != len(y):
            raise InputError(f"X holds {len(images)} images but y {len(y)} labels; give one label per image")
        if warm:  # the model's outputs stay in their order (a run's own order for a loaded convnet run)
            if sorted(classes.tolist()) != sorted(self.classes_.tolist()):
                raise InputError(f"warm_start: y's classes {classes.tolist()} differ from those fitted before "
                                 f"{self.classes_.tolist()}; set warm_start=False to start anew")
            classes, labels = self.classes_, self._encode(y, "y")
        spec = self.input_spec_ if warm else spec_of(images, [str(c) for c in classes], hflip=self.hflip)
        device = resolve_device(self.device)
        source = open_source(self.init_from) if self.init_from is not None and not warm else None
        if source is not None:  # the normalization the weights were trained with (a hub model's)
            spec = spec_for(source, spec)
        config = self._config(device.type, len(images), source)
        if warm and config.model != self.config_.model:
            raise InputError(f"warm_start continues model {self.config_.model!r}, not {config.model!r}; set "
                             "warm_start=False to train a new one")
        engine = make_engine(device, faithful=config.faithful)
        data = Split(images, torch.from_numpy(labels.astype(np.int64)))
        events = [ConsolePrinter(sys.stdout) if self.verbose else None]
        # warm: from the weights learned so far, with a fresh optimizer and schedule
        init = uncalibrated(self.model_)[0].state_dict() if warm else None
        if source is not None:
            init = fit(source, config.model, spec, config.seed)[0]
        tracker = None
        if trackers:  # a tracked run of its own per fit (several fits a second apart in a grid search too)
            name = f"{config.model}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            tracker = start(connect(trackers, self.mlflow_uri), None, name, config,
                            {"name": "arrays", "train_images": len(images)},
                            tensorboard_dir=Path(self.log_dir or "tensorboard") / name)
            events.append(tracker)
        result = tracked(tracker, lambda: train(config, data, spec, engine=engine, events=events, init=init))
        if tracker is not None:
            tracker.finish({"train": {"accuracy": result.history[-1].accuracy}})
        done = len(self.history_) if warm else 0
        history = [*(self.history_ if warm else []), *({**asdict(r), "epoch": done + r.epoch} for r in result.history)]
        self.classes_, self.input_spec_, self.config_ = classes, spec, config
        self.model_, self.history_ = result.model, history
        self._train_images = len(images)
        return self

    def _config(self, device_type: str, images: int, source: Source | None) -> TrainConfig:
        """The recipe with every parameter that is set laid over it, sized to ``images``
        when ``epochs`` is None, as ``convnet train`` does (:func:`~convnet.experiment.run_config`)."""
        seed = self.random_state if isinstance(self.random_state, int) and not isinstance(self.random_state, bool) \
            else int(check_random_state(self.random_state).randint(2**31 - 1))
        overrides = {name: getattr(self, name) for name in CONFIG_PARAMS}
        held_out = float(self.validation_fraction) if self.validation_fraction or not self.calibrate else None
        overrides.update(seed=seed, val_split=held_out)  # None: --calibrate's own share
        return run_config(self.recipe, overrides, device_type=device_type, faithful=self.faithful, hflip=self.hflip,
                          source=source, train_images=images)[0]

    # --- predicting

    def _predictor(self) -> Predictor:
        check_is_fitted(self)
        engine = make_engine(self.device, faithful=self.config_.faithful)
        return Predictor(engine.prepare_model(self.model_), self.input_spec_, self.classes_, engine,
                         tta=self.config_.tta, layout=self.layout)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(N, n_classes)``, columns in ``classes_`` order, rows summing to 1."""
        return self._predictor().predict_proba(X)

    def predict(self, X: Any) -> np.ndarray:
        """The label of each image, from ``classes_`` (the same kind as the ``y`` fitted on)."""
        return self._predictor().predict(X)

    # --- saving

    def save(self, path: str | os.PathLike[str], X_test: Any = None, y_test: Any = None) -> Path:
        """Write a run folder (a new or empty folder) that ``convnet predict``, ``serve``,
        ``evaluate``, ``report`` and ``export`` use like any other, and that :meth:`load`
        reads back.

        ``config.json`` records the settings, the input spec and this estimator's
        parameters and labels; ``history.json`` the epochs; ``model.safetensors`` the
        weights. The training images are not kept. Given held-out images ``X_test`` and
        labels ``y_test``, they are kept as ``test_data.safetensors`` (uint8 images and
        class indices, named in ``config.json``'s ``data`` record), the run's data for
        ``convnet evaluate`` and ``report`` and for ``export``'s parity check; their scores
        are written as ``metrics.json`` and ``plots/`` (the train accuracy there is the one
        measured on the training batches during the last epoch). Without them, those three
        commands say to pass ``X_test``, ``y_test`` here.

        Returns:
            The run folder.
        """
        check_is_fitted(self)
        test = self._held_out(X_test, y_test)
        run_dir = runs.new_run_dir(path, f"{self.config_.model}-{self.config_.optimizer}")
        data: dict[str, Any] = {"name": "arrays", "train_images": getattr(self, "_train_images", None)}
        if test is not None:  # written before config.json names it
            runs.save_tensors(run_dir / runs.TEST_DATA, {"images": test[0], "labels": test[1]})
            data.update(test_images=len(test[1]), test_data=runs.TEST_DATA)
        engine = make_engine(self.device, faithful=self.config_.faithful)
        model, temperature = uncalibrated(self.model_)
        write_config(run_dir, self.config_, self.input_spec_, engine, model, data)
        record = runs.read_json(run_dir / runs.CONFIG)
        record["estimator"] = {"params": self.get_params(), "classes": self.classes_.tolist()}
        write_json(run_dir / runs.CONFIG, json.loads(json.dumps(record, default=repr)))
        write_json(run_dir / runs.HISTORY, self.history_)
        runs.save_tensors(run_dir / runs.WEIGHTS, model.state_dict(), {"model": self.config_.model})
        if temperature is not None:
            write_json(run_dir / runs.CALIBRATION, {"temperature": temperature, "fitted_on": "validation split"})
        if test is not None:
            self._write_scores(run_dir, *test)
        return run_dir

    def _held_out(self, X: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if X is None and y is None:
            return None
        if X is None or y is None:
            raise InputError("save: give both X_test and y_test (held-out images and their labels), or neither")
        images = as_images(X, self.input_spec_, layout=self.layout, name="X_test")
        y = column_or_1d(np.asarray(y))
        if len(y) != len(images):
            raise InputError(f"y_test: {len(y)} labels for {len(images)} images; give one label per image")
        return images, torch.from_numpy(self._encode(y, "y_test"))

    def _encode(self, y: np.ndarray, name: str) -> np.ndarray:
        """Labels as class indices: positions in ``classes_``."""
        index = {c: i for i, c in enumerate(self.classes_.tolist())}
        unknown = sorted({v for v in y.tolist() if v not in index}, key=str)
        if unknown:
            raise InputError(f"{name}: labels not seen in fit: {unknown[:5]}; the classes are "
                             f"{self.classes_.tolist()}")
        return np.array([index[v] for v in y.tolist()], dtype=np.int64)

    def _write_scores(self, run_dir: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
        p = self._predictor()
        held_out = Dataset("arrays", self.input_spec_, Split(images[:0], labels[:0]), Split(images, labels), "")
        evaluation = evaluate(p.model, held_out, engine=p.engine, tta=p.tta)
        # no training images are kept: the train accuracy is the one measured while training
        evaluation = replace(evaluation, train=SplitScores.accuracy_only(float(self.history_[-1].get("accuracy")
                                                                                or 0.0)))
        record = evaluation.to_json()
        record["train"]["measured"] = "on the training batches during the last epoch (no training images are kept)"
        write_json(run_dir / runs.METRICS, record)
        write_plots(run_dir, evaluation, images, p.model)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | None = None) -> ConvNetClassifier:
        """A fitted classifier from a run folder: one :meth:`save` wrote (its parameters
        and labels come back), or any ``convnet train`` run (its settings become the
        parameters, its class names the labels).

        Raises:
            RunError: not a run folder, or its weights are missing or damaged.
        """
        run = runs.open_run(path)
        saved = run.config.get("estimator", {})
        names = cls._get_param_names()
        if isinstance(saved, dict) and isinstance(saved.get("params"), dict):
            params = {k: v for k, v in saved["params"].items() if k in names}
        else:
            params = {k: v for k, v in run.config["train"].items() if k in CONFIG_PARAMS}
            params.update(faithful=run.faithful, random_state=run.config["train"].get("seed"), hflip=run.spec.hflip)
        if not isinstance(params.get("random_state"), int | None):
            params["random_state"] = None  # a RandomState object was recorded as text
        if device is not None:
            params["device"] = device
        try:
            clf = cls(**params)
            clf.config_ = TrainConfig.from_dict(run.config["train"])
        except TypeError as e:
            raise RunError(f"{run.path / runs.CONFIG}: estimator parameters do not fit ({e}); the run folder is "
                           "damaged") from None
        loaded = load_run(run, engine=make_engine(clf.device, faithful=clf.config_.faithful))
        clf.model_, clf.input_spec_, clf.classes_ = loaded.model, loaded.spec, loaded.labels
        clf.history_ = run.history
        clf._train_images = run.config["data"].get("train_images")
        return clf

    # --- pickling: the weights travel as safetensors bytes, the network is built anew

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        if "model_" in state:
            model, temperature = uncalibrated(self.model_)
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            state["model_"] = {"safetensors": save_safetensors(weights), "model": self.config_.model,
                               "temperature": temperature}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.get("model_")
        if isinstance(saved, dict) and "safetensors" in saved:
            spec: InputSpec = state["input_spec_"]
            model = create_model(saved["model"], spec.num_classes, spec.channels, (spec.height, spec.width),
                                 mean=spec.mean, std=spec.std)
            model.load_state_dict(load_safetensors(saved["safetensors"]))
            temperature = saved.get("temperature")
            state = {**state, "model_": (Calibrated(model, temperature) if temperature else model).eval()}
        super().__setstate__(state)
