"""A scikit-learn estimator: fit, predict and score a convnet on the arrays a notebook holds.

:class:`ConvNetClassifier` keeps scikit-learn's contract: the constructor only stores its
parameters (the training settings, by the names ``convnet train`` uses), ``fit`` returns
``self``, what is learned ends in ``_``. It trains with the one loop in
:mod:`convnet.training.loop`, predicts with :func:`~convnet.models.inference.infer`, and saves a normal run
folder. ``X`` is images: arrays or tensors ``(N, H, W)``, ``(N, C, H, W)``, ``(N, H, W, C)``
or flattened ``(N, H*W)``, a list of PIL images or of image files (see
:func:`convnet.data.arrays.as_images`); ``y`` any labels scikit-learn accepts.

scikit-learn's own estimator checks that fit on tabular data (a few numbers per row,
often negative) cannot pass: such rows are not images. ``docs/ESTIMATOR.md`` lists them.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
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

from convnet.core import runfolder
from convnet.core.errors import InputError, RunError
from convnet.core.options import ESTIMATOR, RECIPE, Option, option, taken_by
from convnet.data.arrays import as_images, spec_of
from convnet.data.dataset import Dataset, InputSpec, Split
from convnet.data.options import LAYOUTS, DataOptions
from convnet.models.engine import make_engine
from convnet.models.networks import Calibrated, count_parameters, create_model, uncalibrated
from convnet.training.config import TrainConfig, TrainRequest
from convnet.training.run import train_run
from convnet.trust.evaluation import SplitScores, score_splits
from convnet.trust.report import write_plots
from convnet.use.loadrun import OnnxPath, load_run
from convnet.use.prediction import Predictor


@dataclass
class EstimatorOptions:
    """The estimator's own parameters (those of a training run are declared with its
    settings, data and request); each field is the one declaration of its option."""

    warm_start: bool = option(False, "a second fit continues from the weights learned so far (a fresh optimizer "
                              "and schedule over epochs more epochs) instead of starting anew", takes={ESTIMATOR})
    layout: str = option("auto", "how to read a 4-d array whose shape fits both layouts: nchw or nhwc",
                         choices=LAYOUTS, takes={ESTIMATOR})
    verbose: int = option(1, "0 prints nothing; 1 a line per epoch, with a live bar in a terminal or notebook",
                          takes={ESTIMATOR})
    log_dir: str | None = option(None, "with log tensorboard: the folder of TensorBoard runs, one per fit",
                                 takes={ESTIMATOR}, shown="tensorboard")


CONFIG_FIELDS = frozenset(f.name for f in fields(TrainConfig))
PARAMS = taken_by(ESTIMATOR, TrainConfig, DataOptions, TrainRequest, EstimatorOptions)  # in this order


def _param_default(o: Option) -> Any:
    """A parameter's default: None (the recipe's value, or convnet's default) for every
    training setting but the switches that are off; the declared one otherwise."""
    if o.name in CONFIG_FIELDS and not (isinstance(o.default, bool) and RECIPE not in o.takes):
        return None
    return None if o.default == () else o.default


DEFAULTS = {o.param_name: _param_default(o) for o in PARAMS}


def unlabelled_rows(y: np.ndarray) -> np.ndarray:
    """Where ``y`` is -1, scikit-learn's mark of an unlabelled sample (``sklearn.semi_supervised``)."""
    if y.dtype.kind in "iu" or y.dtype.kind == "f":
        return y == -1
    return np.array([isinstance(v, int | np.integer) and not isinstance(v, bool) and v == -1 for v in y.tolist()])


class ConvNetClassifier(ClassifierMixin, BaseEstimator):
    """A convolutional image classifier with scikit-learn's interface.

    Its parameters are those of ``convnet train`` of the same name (``random_state`` is
    ``--seed``, ``validation_fraction`` is ``--val-split``), declared once with the command
    line's flags (:data:`PARAMS`; ``help(ConvNetClassifier)`` lists them with their defaults),
    plus its own: ``warm_start``, ``layout``, ``verbose``, ``log_dir``. Every training
    setting left at None takes the recipe's value (``convnet recipes`` lists them; the
    default recipe is ``cpu`` on a CPU that trains in bfloat16, ``cpu-fp32`` where it trains in fp32, ``gpu`` on a
    GPU), or convnet's default.
    ``random_state`` None draws a seed from numpy's global random state; an int trains the
    same model every time on a CPU. ``log`` takes ``"tensorboard"``, ``"mlflow"`` or both
    (a list): each ``fit`` is a tracked run of its own (TensorBoard's in
    ``log_dir/MODEL-OPTIMIZER-TIME/``).

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

    def __init__(self, **params: Any) -> None:  # its signature: the declared parameters, set below the class
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise TypeError(f"ConvNetClassifier got unexpected parameters {unknown}; it takes {', '.join(DEFAULTS)}")
        for name, default in DEFAULTS.items():  # the constructor only stores its parameters (scikit-learn's contract)
            setattr(self, name, params.get(name, default))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True  # (N, H, W) images; 4-d ones too
        tags.input_tags.positive_only = True  # pixels: negative values are refused
        return tags

    # --- fitting

    def fit(self, X: Any, y: Any) -> ConvNetClassifier:
        """Train on images ``X`` with labels ``y`` (a fresh model, unless ``warm_start``),
        through the one path every run trains by (:func:`convnet.training.run.train_run`);
        nothing is written to disk.

        ``y == -1`` marks an unlabelled image, as in ``sklearn.semi_supervised``: the
        labelled images train as usual and the unlabelled ones are the pool training also
        learns from (FixMatch, :mod:`convnet.training.semi`). -1 is therefore never a class.

        Raises:
            InputError (a ValueError): ``X`` is not images, ``y`` does not match it or holds
                fewer than 2 classes besides -1.
            ConvnetError: a bad setting, named as ``convnet train`` names it.
        """
        warm = self.warm_start and hasattr(self, "model_")
        y = column_or_1d(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y), warn=True)
        if len(y) == 0:
            raise InputError("y holds no labels (0 samples); give images of at least 2 classes")
        check_classification_targets(y)
        unlabelled = unlabelled_rows(y)
        classes, labels = np.unique(y[~unlabelled], return_inverse=True)
        if len(classes) < 2:
            besides = " besides -1 (unlabelled)" if unlabelled.any() else ""
            count = "no class" if len(classes) == 0 else "one class"
            raise InputError(f"y holds {count}{besides} ({', '.join(map(repr, classes.tolist()))}); a classifier "
                             "needs at least 2 classes")
        images = as_images(X, self.input_spec_ if warm else None, layout=self.layout, name="X")
        if len(images) != len(y):
            raise InputError(f"X holds {len(images)} images but y {len(y)} labels; give one label per image")
        pool = images[torch.from_numpy(np.flatnonzero(unlabelled))] if unlabelled.any() else None
        images, y = images[torch.from_numpy(np.flatnonzero(~unlabelled))], y[~unlabelled]
        if warm:  # the model's outputs stay in their order (a run's own order for a loaded convnet run)
            if sorted(classes.tolist()) != sorted(self.classes_.tolist()):
                raise InputError(f"warm_start: y's classes {classes.tolist()} differ from those fitted before "
                                 f"{self.classes_.tolist()}; set warm_start=False to start anew")
            if self.model is not None and self.model != self.config_.model:
                raise InputError(f"warm_start continues model {self.config_.model!r}, not {self.model!r}; set "
                                 "warm_start=False to train a new one")
            classes, labels = self.classes_, self._encode(y, "y")
        spec = self.input_spec_ if warm else spec_of(images, [str(c) for c in classes], hflip=self.hflip is not False)
        data = Split(images, torch.from_numpy(labels.astype(np.int64)))
        held_out = Split(images[:0], data.labels[:0])  # no test split: scoring is for score()
        request = self._request(Dataset("arrays", spec, data, held_out, "", pool=pool), warm)
        # warm: from the weights learned so far, with a fresh optimizer and schedule
        init = uncalibrated(self.model_)[0].state_dict() if warm else None
        trained = train_run(request, init=init, stream=sys.stdout if self.verbose else None,
                            tensorboard_root=Path(self.log_dir) if self.log_dir is not None else None)
        result = trained.result
        if trained.tracker is not None:
            trained.tracker.finish({"train": {"accuracy": result.history[-1].accuracy}})
        done = len(self.history_) if warm else 0
        history = [*(self.history_ if warm else []), *({**asdict(r), "epoch": done + r.epoch} for r in result.history)]
        self.classes_, self.input_spec_, self.config_ = classes, trained.dataset.spec, result.config
        self.model_, self.history_ = result.model, history
        self._train_images = len(images)
        return self

    def _request(self, dataset: Dataset, warm: bool) -> TrainRequest:
        """The training run the parameters ask for, as ``convnet train`` would make it."""
        seed = self.random_state if isinstance(self.random_state, int) and not isinstance(self.random_state, bool) \
            else int(check_random_state(self.random_state).randint(2**31 - 1))
        given = {o.name: getattr(self, o.param_name) for o in PARAMS if o.name in CONFIG_FIELDS}
        if warm:
            given["model"] = self.config_.model
        log = (self.log,) if isinstance(self.log, str) else tuple(self.log or ())
        return TrainRequest(settings={**given, "seed": seed}, data=dataset, recipe=self.recipe,
                            init_from=None if warm or self.init_from is None else str(self.init_from),
                            device=self.device, log=log, mlflow_uri=self.mlflow_uri, progress=bool(self.verbose))

    # --- predicting

    def _predictor(self) -> Predictor:
        check_is_fitted(self)
        engine = make_engine(self.device, faithful=self.config_.faithful)
        model = engine.prepare_model(self.model_)
        onnx = None
        if engine.device.type == "cpu" and not self.config_.faithful:  # exported in memory, once per fitted model
            kept = getattr(self, "_onnx", None)
            onnx = kept if kept is not None and kept.model is model else OnnxPath(model, self.input_spec_,
                                                                                 self.config_.tta)
            self._onnx = onnx
        return Predictor(model, self.input_spec_, self.classes_, engine, tta=self.config_.tta, layout=self.layout,
                         onnx=onnx)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities ``(N, n_classes)``, columns in ``classes_`` order, rows summing to 1."""
        return self._predictor().predict_proba(X)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """The accuracy on the images whose label is not -1: an unlabelled image (``y ==
        -1``, as in :meth:`fit`) has no truth to score against, so cross-validation on
        partly labelled data scores what can be scored (scikit-learn's own semi-supervised
        estimators count those rows as mistakes).

        Raises:
            InputError: every label is -1.
        """
        y = column_or_1d(y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
        labelled = ~unlabelled_rows(y)
        if not labelled.any():
            raise InputError("score: every label in y is -1 (unlabelled); give labelled images to score on")
        if labelled.all():
            return float(super().score(X, y, sample_weight))
        rows = np.flatnonzero(labelled)
        weights = None if sample_weight is None else np.asarray(sample_weight)[rows]
        return float(super().score(as_images(X, self.input_spec_, layout=self.layout, name="X")[
            torch.from_numpy(rows)], y[rows], weights))

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
        run_dir = runfolder.new_run_dir(path, f"{self.config_.model}-{self.config_.optimizer}")
        data: dict[str, Any] = {"name": "arrays", "train_images": getattr(self, "_train_images", None)}
        if test is not None:  # written before config.json names it
            data.update(test_images=len(test[1]), test_data=runfolder.write_test_data(run_dir, *test))
        engine = make_engine(self.device, faithful=self.config_.faithful)
        model, temperature = uncalibrated(self.model_)
        runfolder.write_config(run_dir, asdict(self.config_), self.input_spec_, engine.describe(),
                               count_parameters(model), data,
                               estimator={"params": self.get_params(), "classes": self.classes_.tolist()})
        runfolder.write_history(run_dir, self.history_)
        runfolder.write_weights(run_dir, model, self.config_.model)
        if temperature is not None:
            runfolder.write_calibration(run_dir, {"temperature": temperature, "fitted_on": "validation split"})
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
        evaluation = score_splits(lambda x: torch.from_numpy(p.predict_proba(x)).float(), held_out,
                                  score_train=False)  # as the estimator predicts
        # no training images are kept: the train accuracy is the one measured while training
        evaluation = replace(evaluation, train=SplitScores.accuracy_only(float(self.history_[-1].get("accuracy")
                                                                                or 0.0)))
        record = evaluation.to_json()
        record["train"]["measured"] = "on the training batches during the last epoch (no training images are kept)"
        runfolder.write_metrics(run_dir, record)
        write_plots(run_dir, evaluation, images, p.model)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | None = None) -> ConvNetClassifier:
        """A fitted classifier from a run folder: one :meth:`save` wrote (its parameters
        and labels come back), or any ``convnet train`` run (its settings become the
        parameters, its class names the labels).

        Raises:
            RunError: not a run folder, or its weights are missing or damaged.
        """
        run = runfolder.open_run(path)
        saved = run.config.get("estimator", {})
        names = cls._get_param_names()
        if isinstance(saved, dict) and isinstance(saved.get("params"), dict):
            params = {k: v for k, v in saved["params"].items() if k in names}
        else:  # a `convnet train` run: its settings become the parameters
            train = run.config["train"]
            params = {o.param_name: train[o.name] for o in PARAMS if o.name in CONFIG_FIELDS and o.name in train}
            params.update(hflip=run.spec.hflip)
        if not isinstance(params.get("random_state"), int | None):
            params["random_state"] = None  # a RandomState object was recorded as text
        if device is not None:
            params["device"] = device
        try:
            clf = cls(**params)
            clf.config_ = TrainConfig.from_dict(run.config["train"])
        except TypeError as e:
            raise RunError(f"{run.path / runfolder.CONFIG}: estimator parameters do not fit ({e}); the run folder is "
                           "damaged") from None
        loaded = load_run(run, engine=make_engine(clf.device, faithful=clf.config_.faithful))
        clf.model_, clf.input_spec_, clf.classes_ = loaded.model, loaded.spec, loaded.labels
        clf.history_ = run.history
        clf._train_images = run.config["data"].get("train_images")
        return clf

    # --- pickling: the weights travel as safetensors bytes, the network is built anew; the settings and the
    # input spec as plain data, so that a pickle names no class of convnet's but this one

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_onnx", None)  # an ONNX Runtime session: made again when it pays
        if "model_" in state:
            model, temperature = uncalibrated(self.model_)
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            state["model_"] = {"safetensors": save_safetensors(weights), "model": self.config_.model,
                               "temperature": temperature}
            state["config_"] = {"train": asdict(self.config_)}
            state["input_spec_"] = {"input": self.input_spec_.to_json()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("config_"), dict):
            state = {**state, "config_": TrainConfig.from_dict(state["config_"]["train"])}
        if isinstance(state.get("input_spec_"), dict):
            state = {**state, "input_spec_": InputSpec.from_json(state["input_spec_"]["input"], "a pickled estimator")}
        saved = state.get("model_")
        if isinstance(saved, dict) and "safetensors" in saved:
            spec: InputSpec = state["input_spec_"]
            model = create_model(saved["model"], spec.num_classes, spec.channels, (spec.height, spec.width),
                                 mean=spec.mean, std=spec.std)
            model.load_state_dict(load_safetensors(saved["safetensors"]))
            temperature = saved.get("temperature")
            state = {**state, "model_": (Calibrated(model, temperature) if temperature else model).eval()}
        super().__setstate__(state)


# scikit-learn reads an estimator's parameters from its constructor's signature: the declared ones
ConvNetClassifier.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d) for name, d in DEFAULTS.items()])
