"""convnet: train, evaluate and use convolutional image classifiers, Fashion-MNIST first.

The pipeline, one module per stage::

    formats    IDX, CIFAR binary, image files, .npy  -> uint8 arrays
    datasets   InputSpec, Split, Dataset              -> uint8 images (N, C, H, W), int64 labels
    sources    load_dataset, DATASETS                 -> named data sets: lookup, download, verification
    folders    (via data.load_data)                   -> folders of images, decoded once into imagecache
    data       DataOptions, load_data, run_data       -> the data a command or a run uses
    models     create_model, list_models              -> nn.Module returning logits
    engine     Engine, make_engine                    -> device, precision, memory format, CUDA graphs
    config     TrainConfig, RECIPES                   -> what to train
    train      train, resume, train_step              -> the one training loop, run folders
    inputs     images_from_array, load_image          -> files and arrays in a run's input spec
    predict    infer, predict, load_model, load       -> logits, labels, probabilities; a loaded Predictor
    evaluate   evaluate, evaluate_run                 -> accuracy, report, confusion matrix
    estimator  ConvNetClassifier                      -> scikit-learn's fit / predict / score on arrays

Names are imported on first use, so ``import convnet`` (and the command line's start)
stays fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "ConvnetError": "errors", "DataError": "errors", "InputError": "errors", "RunError": "errors",
    "TrainingDiverged": "errors",
    "InputSpec": "datasets", "Split": "datasets", "Dataset": "datasets", "to_float": "datasets",
    "DATASETS": "sources", "DataOptions": "data", "load_dataset": "sources", "load_data": "data",
    "read_idx": "formats",
    "Engine": "engine", "make_engine": "engine", "resolve_device": "engine",
    "TrainConfig": "config", "RECIPES": "config",
    "TrainEvents": "events", "StopAtAccuracy": "events", "ConsolePrinter": "events",
    "TrainResult": "train", "train": "train", "resume": "train",
    "count_parameters": "models", "create_model": "models", "list_models": "models", "register_model": "models",
    "images_from_array": "inputs", "load_image": "inputs", "load_inputs": "inputs",
    "Prediction": "predict", "infer": "predict", "load_model": "predict", "predict": "predict",
    "Predictor": "predict", "load": "predict", "ConvNetClassifier": "estimator",
    "Evaluation": "evaluate", "evaluate": "evaluate", "evaluate_run": "evaluate",
    "accuracy": "metrics", "classification_report": "metrics", "confusion_matrix": "metrics",
}

__all__ = [
    "DATASETS", "RECIPES", "ConsolePrinter", "ConvNetClassifier", "ConvnetError", "DataError", "DataOptions",
    "Dataset", "Engine",
    "Evaluation", "InputError", "InputSpec", "Prediction", "Predictor", "RunError", "Split", "StopAtAccuracy",
    "TrainConfig", "TrainEvents", "TrainResult", "TrainingDiverged", "__version__", "accuracy",
    "classification_report", "confusion_matrix", "count_parameters", "create_model", "evaluate", "evaluate_run",
    "images_from_array", "infer", "list_models", "load", "load_data", "load_dataset", "load_image", "load_inputs",
    "load_model", "make_engine", "predict", "read_idx", "register_model", "resolve_device", "resume", "to_float",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"convnet.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """Importing the module ``convnet.train`` (or ``predict``, ``evaluate``) binds it on
    the package under its own name, which would hide the function of that name from
    then on (``convnet.train(...)``: "'module' object is not callable"): the function is
    kept instead. The modules stay in ``sys.modules`` (``from convnet.train import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from convnet.config import RECIPES, TrainConfig
    from convnet.data import DataOptions, load_data
    from convnet.datasets import Dataset, InputSpec, Split, to_float
    from convnet.engine import Engine, make_engine, resolve_device
    from convnet.errors import ConvnetError, DataError, InputError, RunError, TrainingDiverged
    from convnet.estimator import ConvNetClassifier
    from convnet.evaluate import Evaluation, evaluate, evaluate_run
    from convnet.events import ConsolePrinter, StopAtAccuracy, TrainEvents
    from convnet.formats import read_idx
    from convnet.inputs import images_from_array, load_image, load_inputs
    from convnet.metrics import accuracy, classification_report, confusion_matrix
    from convnet.models import count_parameters, create_model, list_models, register_model
    from convnet.predict import Prediction, Predictor, infer, load, load_model, predict
    from convnet.sources import DATASETS, load_dataset
    from convnet.train import TrainResult, resume, train
