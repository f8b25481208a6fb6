"""convnet: train, evaluate and use convolutional image classifiers, Fashion-MNIST first.

The public API, by the module that holds it (docs/ARCHITECTURE.md lists
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
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from convnet.core.version import __version__

_EXPORTS = {
    "ConvnetError": "core.errors", "DataError": "core.errors", "InputError": "core.errors", "RunError": "core.errors",
    "TrainingDiverged": "core.errors",
    "InputSpec": "core.inputspec", "Split": "data.dataset", "Dataset": "data.dataset", "to_float": "data.dataset",
    "DATASETS": "data.catalog", "DataOptions": "data.options", "load_dataset": "data.named", "load_data": "data.load",
    "read_idx": "data.arrayfiles",
    "Engine": "models.engine", "make_engine": "models.engine", "resolve_device": "models.engine",
    "TrainConfig": "training.config", "RECIPES": "training.recipes",
    "TrainEvents": "training.events", "StopAtAccuracy": "training.events", "ConsolePrinter": "training.events",
    "TrainResult": "training.loop", "train": "training.loop", "resume": "training.run",
    "count_parameters": "models.networks", "create_model": "models.networks", "list_models": "models.networks",
    "register_model": "models.networks",
    "images_from_array": "data.arrays", "load_image": "data.arrays", "load_inputs": "data.inputfiles",
    "Prediction": "models.inference", "infer": "models.inference", "predict": "models.inference",
    "load_model": "use.loadrun",
    "Predictor": "use.prediction", "load": "use.prediction", "ConvNetClassifier": "estimator",
    "Evaluation": "trust.evaluation", "evaluate": "trust.evaluation", "evaluate_run": "trust.scoring",
    "accuracy": "trust.metrics", "classification_report": "trust.metrics", "confusion_matrix": "trust.metrics",
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


# Where the modules of versions before the packages went: `import convnet.config` still finds its module, and so
# does a pickle made then, which names convnet.config.TrainConfig and convnet.datatypes.InputSpec.
_MOVED = {"config": "training.config", "datatypes": "data.dataset", "runs": "core.runfolder", "errors": "core.errors",
          "catalog": "data.catalog", "engine": "models.engine", "inference": "models.inference",
          "prediction": "use.prediction", "loadrun": "use.loadrun", "evaluation": "trust.evaluation",
          "scoring": "trust.scoring", "metrics": "trust.metrics", "events": "training.events"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``convnet.OLD`` as the module it became (after every real module: asked last)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix("convnet.")
        return importlib.util.spec_from_loader(fullname, self) if fullname != old and old in _MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        module = importlib.import_module("convnet." + _MOVED[spec.name.removeprefix("convnet.")])
        self.own_spec = module.__spec__  # the import machinery puts the old name's spec on it: put back below
        return module

    def exec_module(self, module: Any) -> None:  # the module it became has run already
        module.__spec__ = self.own_spec


sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"convnet.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from convnet.core.errors import ConvnetError, DataError, InputError, RunError, TrainingDiverged
    from convnet.core.inputspec import InputSpec
    from convnet.data.arrayfiles import read_idx
    from convnet.data.arrays import images_from_array, load_image
    from convnet.data.catalog import DATASETS
    from convnet.data.dataset import Dataset, Split, to_float
    from convnet.data.inputfiles import load_inputs
    from convnet.data.load import load_data
    from convnet.data.named import load_dataset
    from convnet.data.options import DataOptions
    from convnet.estimator import ConvNetClassifier
    from convnet.models.engine import Engine, make_engine, resolve_device
    from convnet.models.inference import Prediction, infer, predict
    from convnet.models.networks import count_parameters, create_model, list_models, register_model
    from convnet.training.config import TrainConfig
    from convnet.training.events import ConsolePrinter, StopAtAccuracy, TrainEvents
    from convnet.training.loop import TrainResult, train
    from convnet.training.recipes import RECIPES
    from convnet.training.run import resume
    from convnet.trust.evaluation import Evaluation, evaluate
    from convnet.trust.metrics import accuracy, classification_report, confusion_matrix
    from convnet.trust.scoring import evaluate_run
    from convnet.use.loadrun import load_model
    from convnet.use.prediction import Predictor, load
