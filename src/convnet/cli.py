"""The command line: argparse sub-commands, each parsed and handed to its function in
:mod:`convnet.commands` (one library call each).

Only these two modules know argparse. User errors (:class:`ConvnetError`) become one line on
stderr and exit status 1; bad flags exit 2 (argparse's own convention); Ctrl-C exits 130.
The library is imported inside each command, so ``convnet --help`` and ``--version``
start without loading PyTorch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from convnet.commands import COMMANDS
from convnet.config import (
    AUGMENTS,
    CLASS_WEIGHTS,
    DEVICES,
    LAYOUTS,
    OPTIMIZERS,
    RECIPES,
    SAMPLERS,
    SCHEDULES,
    TrainConfig,
)
from convnet.errors import ConvnetError
from convnet.version import __version__

D = TrainConfig()  # defaults, shown in --help
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10")  # checked against the registry by the library


def _named_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, choices=DATASET_NAMES,
                   help="named data set, see `convnet datasets` (default: fashion-mnist)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the named data set's files (default: cache, then system copy, then download)")


def _folder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="a folder of images, one subfolder per class (or train/ and test/ of them) "
                        "(default: the named --dataset)")
    p.add_argument("--image-size", default=None, metavar="N|HxW",
                   help="with --data: size images are converted to (default: the most common, at most 64)")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="with --data: 1 grey or 3 colour (default: 3 when any image has colour)")
    p.add_argument("--test-split", type=float, default=0.2,
                   help="with --data and no test/ folder: share held out for testing (default: %(default)s)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded, listed in the run folder (default: stop)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                   help="whether a mirrored image keeps its class, for flip augmentation and --tta "
                        "(default: the data set's: yes, but no for mnist)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="MB",
                   help="a folder's images larger than this are read from the cache a batch at a time "
                        "(default: half the memory available)")


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to compute (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnet", description="Train, evaluate and use CNN image classifiers.")
    parser.add_argument("--version", action="version", version=f"convnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model; writes a run folder",
                       description="Train a model. Settings come from a recipe (see `convnet recipes`); "
                                   "each flag given overrides the recipe's value.")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help=f"named settings ({', '.join(RECIPES)}) or a recipe file, e.g. one `convnet tune` wrote "
                        "(default: cpu on a CPU, gpu on a GPU; tutorial with --faithful)")
    p.add_argument("--model", help="registered model (default: the recipe's; see `convnet models`)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="(default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--epochs", type=int,
                   help="(default: the recipe's, each epoch repeating a small data set to about 10,000 images)")
    p.add_argument("--batch-size", type=int, help="(default: the recipe's)")
    p.add_argument("--seed", type=int, help=f"initial weights, shuffle order, augmentation (default: {D.seed})")
    p.add_argument("--momentum", type=float, help="SGD momentum (default: the recipe's)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction,
                   help="Nesterov momentum (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, help="(default: the recipe's)")
    p.add_argument("--label-smoothing", type=float, help="(default: the recipe's)")
    p.add_argument("--augment", choices=AUGMENTS, help="batched augmentation (default: the recipe's)")
    p.add_argument("--translate-px", type=int, help="largest random shift (default: the recipe's)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (default: the recipe's)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up length (default: the recipe's)")
    p.add_argument("--val-split", type=float, help="share of training images held out for validation (default: 0)")
    p.add_argument("--target-accuracy", type=float,
                   help="stop when the test accuracy, checked every epoch, reaches this (default: off)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help="predict with the mean of each image and its mirror (default: the recipe's)")
    p.add_argument("--ema", type=float,
                   help="keep and evaluate a moving average of the weights, decay per step (default: the recipe's)")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction,
                   help="a new order every epoch (default: on, off with --faithful)")
    p.add_argument("--class-weight", choices=CLASS_WEIGHTS,
                   help="balanced: weigh each class's loss inversely to its images, for imbalanced classes "
                        "(default: none)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="balanced: draw every class equally often, with replacement (default: passes, every image "
                        "once per pass)")
    p.add_argument("--calibrate", action="store_true", default=None,
                   help="after training, fit a temperature on held-out images (--val-split, 0.1 if not given) so that "
                        "probabilities match accuracy; every way of predicting uses it (default: off)")
    p.add_argument("--faithful", action="store_true",
                   help="the tutorial's exact arithmetic: fp32, no shuffling, its float32 learning rate")
    p.add_argument("--init-from", default=None, metavar="SOURCE",
                   help="start from trained weights: a run folder, a .safetensors file, or hf:REPO from the "
                        "Hugging Face hub, e.g. hf:timm/resnet18.a1_in1k (default: fresh weights)")
    p.add_argument("--freeze-epochs", type=int, default=None,
                   help="with --init-from: epochs that train the classifier head alone (default: an eighth, 3 of 24)")
    p.add_argument("--body-lr", type=float, default=None,
                   help="with --init-from: learning rate of all but the head, as a fraction of --lr (default: 0.1)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/MODEL-OPTIMIZER-TIME)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                   help="continue RUN from its last complete epoch, with its own config")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (default: bar in a terminal)")
    p.add_argument("--log", action="append", default=[], choices=["tensorboard", "mlflow"],
                   help="also send the epochs, scores and pictures to TensorBoard (RUN/tensorboard/) or MLflow; "
                        "repeat for both; needs pip install 'convnet[tracking]' (default: the run folder only)")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="with --log mlflow: the tracking server or store (default: MLFLOW_TRACKING_URI, else "
                        "MLflow's own default)")
    _named_data_flags(p)
    _folder_flags(p)
    _device_flag(p)

    p = sub.add_parser("evaluate", help="accuracy, classification report and confusion matrix of a run")
    p.add_argument("run", type=Path, help="run folder, or an .onnx file from `convnet export` (ONNX Runtime)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the run's data is now, if it moved (default: where it was trained)")
    _device_flag(p)

    p = sub.add_parser("predict", help="classify image files, .npy arrays or IDX files with a trained run")
    p.add_argument("run", type=Path, help="run folder, or an .onnx file from `convnet export` (ONNX Runtime)")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="PNG/JPEG/... images, folders of them (sorted, recursive), .npy arrays, IDX files")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="layout of 4-d arrays: channels first or last (default: detect)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write a row per image to FILE (path, top classes and probabilities, error) and print a "
                        "summary instead of the rows (default: no file)")
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="classes each CSV and JSON row carries (default: %(default)s)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="answer \"unsure\" (label null) where the most probable class is below P, keeping the "
                        "probabilities (default: always the most probable class)")
    p.add_argument("--explain", type=Path, default=None, metavar="DIR",
                   help="also write each image with a heat map of the evidence for its predicted class (integrated "
                        "gradients) "
                        "into DIR, as PNG files; run folders only (default: none)")
    _device_flag(p)

    p = sub.add_parser("tune", help="search for better settings on a validation split (Optuna); writes a recipe",
                       description="Search training settings with Optuna, each trial scored on --val-split of the "
                                   "training images (never the test split), and write the best as a recipe file "
                                   "for `convnet train --recipe FILE`. Needs pip install 'convnet[tune]'.")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help="the base the trials' values are laid over (default: cpu on a CPU, gpu on a GPU)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                   help="search a setting as LOW:HIGH, LOW:HIGH:log or A,B,C, or fix it to one value; repeatable "
                        "(default space: lr, weight_decay, epochs, label_smoothing, batch_size, model)")
    p.add_argument("--space", type=Path, default=None, metavar="FILE",
                   help="a TOML file of NAME = SPEC lines, like --param (which overrides it)")
    p.add_argument("--trials", type=int, default=20,
                   help="the study's total of finished trials; each process stops there (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop this process's search after this long (default: none)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="keep the study in a database that other convnet tune processes join, e.g. "
                        "sqlite:///tune.db (default: in memory, this process only)")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="the study's name in --storage (default: the data's name and the recipe's)")
    p.add_argument("--val-split", type=float, default=0.1,
                   help="share of the training images each trial is scored on (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="every trial's seed; the sampler's without --storage "
                                                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for best.toml and report.html (default: tune/STUDY)")
    p.add_argument("--report", action="store_true",
                   help="also write an HTML page of the study: trials, optimisation history, importances")
    p.add_argument("--subset", type=int, default=None, help="search on the first N training images only")
    _named_data_flags(p)
    _folder_flags(p)
    _device_flag(p)

    p = sub.add_parser("export", help="the run's model as an ONNX file, checked in ONNX Runtime",
                       description="Export a run's model to ONNX (uint8 images in, class probabilities out) and "
                                   "check it in ONNX Runtime against PyTorch on the run's test images; a model "
                                   "that fails the check is not written.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("-o", "--out", type=Path, default=None, help="the .onnx file (default: RUN/model.onnx)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the run's data is now, if it moved (default: where it was trained)")

    p = sub.add_parser("serve", help="an HTTP prediction service and web page for a run or an .onnx file",
                       description="Serve predictions over HTTP: POST /predict, GET /health, GET /ready, "
                                   "GET /model, GET /metrics (Prometheus), API docs at /docs and a page at / to "
                                   "try images.")
    p.add_argument("model", type=Path, metavar="RUN|FILE.onnx", help="run folder or .onnx file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000,
                   help="0 picks a free port, printed at start (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=10.0,
                   help="largest request body accepted, in MB (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=256,
                   help="most images in one request (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most images the server predicts in one batch (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests once one arrives; requests that come while "
                        "the model runs are batched anyway (default: %(default)s)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="answer \"unsure\" (label null) where the most probable class is below P "
                        "(default: always the most probable class)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes answering on the one port, each with its own ONNX Runtime session; a run "
                        "folder is exported once (default: %(default)s)")

    p = sub.add_parser("tutorial", help="the tutorial's whole story: SGD vs Adam, reports, channels first/last")
    p.add_argument("--quick", action="store_true", help="a first look: 12,000 images, 5 SGD + 3 Adam epochs")
    p.add_argument("--faithful", action="store_true", help="the tutorial's exact arithmetic and numbers")
    p.add_argument("--out", type=Path, default=None, help="folder for the two runs (default: runs/tutorial-TIME)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _named_data_flags(p)
    _device_flag(p)

    p = sub.add_parser("bench", help="images/s of convnet vs the tutorial's loop, side by side")
    p.add_argument("--model", default="seed", help="model to time (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--train-images", type=int, default=12_800, help="images per timed epoch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats; the median is reported (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--target", type=float, default=None,
                   help="instead: seconds of training to this test accuracy, per seed, for --recipe")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help="with --target: a named recipe or a recipe file (default: the device's default recipe)")
    p.add_argument("--seeds", type=int, default=3, help="with --target: runs, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true",
                   help="with --target: skip the tutorial's Adam-15 reference run")
    _named_data_flags(p)
    _device_flag(p)

    p = sub.add_parser("report", help="one self-contained HTML report of runs: scores, plots, comparison")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders; several are compared first")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="HTML file or folder (default: report.html in the runs' common folder)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the runs' data is now (default: as trained)")
    _device_flag(p)

    p = sub.add_parser("inspect", help="can I trust it? likely label errors, calibration, per-class scores",
                       description="Inspect a run: likely label errors (confident learning) on the test split, and "
                                   "with --train-folds on the training split; the expected calibration error with "
                                   "a 95 % interval and a reliability diagram; support, precision and recall per "
                                   "class and the most confused pairs. Kept in RUN/inspect.json for `convnet "
                                   "report`.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--train-folds", type=int, default=None, metavar="K",
                   help="also check the training labels: K models, each trained on the other folds for half the "
                        "run's epochs, predict each image (kept in RUN/inspect/; default: test split only)")
    p.add_argument("--calibrate", action="store_true",
                   help="with --train-folds: fit the run's temperature on the out-of-fold probabilities and keep it "
                        "in the run (default: off)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write every likely label error to FILE (default: no file)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the run's data is now (default: as trained)")
    _device_flag(p)

    p = sub.add_parser("compare", help="runs side by side in the terminal: accuracies, losses, f1 per class")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--data-dir", type=Path, default=None, help="where the runs' data is now (default: as trained)")
    _device_flag(p)

    sub.add_parser("models", help="list the registered models")
    p = sub.add_parser("recipes", help="list the named training recipes and their settings, or a recipe file's")
    p.add_argument("file", nargs="?", type=Path, default=None, help="a recipe file to show (default: the named ones)")
    sub.add_parser("datasets", help="list the named data sets: image size, channels, classes, where each is found")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from convnet.engine import keep_freed_memory

        keep_freed_memory()  # steady step times on glibc (see engine.keep_freed_memory)
        return COMMANDS[args.command](args)
    except ConvnetError as e:
        print(f"convnet: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `convnet recipes | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        hint = " (resume with `convnet train --resume RUN`)" if args.command == "train" else ""
        print(f"convnet: interrupted{hint}", file=sys.stderr)
        return 130
