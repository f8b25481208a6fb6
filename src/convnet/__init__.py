"""convnet: train, evaluate and use convolutional image classifiers, Fashion-MNIST first.

The public API, by the module that holds it (README's "How the code is laid out" lists
every module, bottom to top)::

    datatypes   InputSpec, Split, Dataset                -> uint8 images (N, C, H, W), int64 labels
    catalog     load_dataset, DATASETS                   -> named data sets: lookup, download, verification
    data        DataOptions, load_data                   -> the data a command or a run uses
    arrays      images_from_array, load_image            -> arrays and images in a model's input spec
    models      create_model, list_models                -> nn.Module returning logits
    engine      Engine, make_engine                      -> device, precision, memory format, CUDA graphs
    config      TrainConfig, RECIPES                     -> what to train
    inference   infer, predict                           -> logits, labels, probabilities
    evaluation  evaluate                                 -> accuracy, report, confusion matrix
    training    train, resume                            -> the one training loop
    loadrun     load_model                               -> a trained run opened for use
    scoring     evaluate_run                             -> a run scored on its own data
    prediction  load, Predictor                          -> a loaded run predicting what a notebook holds
    estimator   ConvNetClassifier                        -> scikit-learn's fit / predict / score on arrays

Names are imported on first use, so ``import convnet`` (and the command line's start)
stays fast. No module is named like a function it exports (``training`` holds ``train``),
so ``convnet.train(...)`` is always the function.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from convnet.version import __version__

_EXPORTS = {
    "ConvnetError": "errors", "DataError": "errors", "InputError": "errors", "RunError": "errors",
    "TrainingDiverged": "errors",
    "InputSpec": "datatypes", "Split": "datatypes", "Dataset": "datatypes", "to_float": "datatypes",
    "DATASETS": "catalog", "DataOptions": "dataoptions", "load_dataset": "named", "load_data": "data",
    "read_idx": "arrayfiles",
    "Engine": "engine", "make_engine": "engine", "resolve_device": "engine",
    "TrainConfig": "config", "RECIPES": "recipes",
    "TrainEvents": "events", "StopAtAccuracy": "events", "ConsolePrinter": "events",
    "TrainResult": "training", "train": "training", "resume": "trainrun",
    "count_parameters": "models", "create_model": "models", "list_models": "models", "register_model": "models",
    "images_from_array": "arrays", "load_image": "arrays", "load_inputs": "inputfiles",
    "Prediction": "inference", "infer": "inference", "predict": "inference", "load_model": "loadrun",
    "Predictor": "prediction", "load": "prediction", "ConvNetClassifier": "estimator",
    "Evaluation": "evaluation", "evaluate": "evaluation", "evaluate_run": "scoring",
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


if TYPE_CHECKING:
    from convnet.arrayfiles import read_idx
    from convnet.arrays import images_from_array, load_image
    from convnet.catalog import DATASETS
    from convnet.config import TrainConfig
    from convnet.data import load_data
    from convnet.dataoptions import DataOptions
    from convnet.datatypes import Dataset, InputSpec, Split, to_float
    from convnet.engine import Engine, make_engine, resolve_device
    from convnet.errors import ConvnetError, DataError, InputError, RunError, TrainingDiverged
    from convnet.estimator import ConvNetClassifier
    from convnet.evaluation import Evaluation, evaluate
    from convnet.events import ConsolePrinter, StopAtAccuracy, TrainEvents
    from convnet.inference import Prediction, infer, predict
    from convnet.inputfiles import load_inputs
    from convnet.loadrun import load_model
    from convnet.metrics import accuracy, classification_report, confusion_matrix
    from convnet.models import count_parameters, create_model, list_models, register_model
    from convnet.named import load_dataset
    from convnet.prediction import Predictor, load
    from convnet.recipes import RECIPES
    from convnet.scoring import evaluate_run
    from convnet.training import TrainResult, train
    from convnet.trainrun import resume
