"""convnet: train, evaluate and use convolutional image classifiers, Fashion-MNIST first.

The pipeline, one module per stage::

    data      load_dataset, read_idx       -> uint8 images (N, 1, 28, 28), int64 labels
    models    create_model, list_models    -> nn.Module returning logits
    engine    Engine, resolve_device       -> device, precision, memory format
    train     TrainConfig, train, resume   -> the one training loop, run folders
    predict   infer, predict, load_model   -> logits, labels, probabilities
    evaluate  evaluate, evaluate_run       -> accuracy, report, confusion matrix
"""

__version__ = "0.1.0"

from convnet.data import DATASETS, Dataset, Split, load_dataset, read_idx, to_float
from convnet.engine import Engine, resolve_device
from convnet.errors import ConvnetError, DataError, InputError, RunError, TrainingDiverged
from convnet.evaluate import Evaluation, evaluate, evaluate_run
from convnet.metrics import accuracy, classification_report, confusion_matrix
from convnet.models import count_parameters, create_model, list_models, register_model
from convnet.predict import Prediction, images_from_array, infer, load_image, load_inputs, load_model, predict
from convnet.train import TrainConfig, TrainEvents, TrainResult, resume, train

__all__ = [
    "DATASETS", "ConvnetError", "DataError", "Dataset", "Engine", "Evaluation", "InputError", "Prediction",
    "RunError", "Split", "TrainConfig", "TrainEvents", "TrainResult", "TrainingDiverged", "__version__",
    "accuracy", "classification_report", "confusion_matrix", "count_parameters", "create_model", "evaluate",
    "evaluate_run", "images_from_array", "infer", "list_models", "load_dataset", "load_image", "load_inputs",
    "load_model", "predict", "read_idx", "register_model", "resolve_device", "resume", "to_float", "train",
]
