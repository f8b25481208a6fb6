"""The command line: argparse sub-commands, each parsed and handed to its function in
:mod:`convnet.cli.commands` (one library call each).

Only these two modules know argparse. User errors (:class:`ConvnetError`) become one line on
stderr and exit status 1; bad flags exit 2 (argparse's own convention); Ctrl-C exits 130.
The library is imported inside each command, so ``convnet --help`` and ``--version``
start without loading PyTorch.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from convnet.cli.commands import COMMANDS
from convnet.core.errors import ConvnetError
from convnet.core.options import BENCH, TRAIN, TUNE, TUTORIAL, taken_by
from convnet.core.version import __version__
from convnet.data.options import LAYOUTS, DataOptions
from convnet.training.config import TrainConfig, TrainRequest

DECLARED = (TrainConfig, DataOptions, TrainRequest)  # the classes whose fields declare the options of a run


class UsageError(ConvnetError):
    """A flag argparse refuses: one line naming it, exit status 1, as every user error."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not the usage block (that is for --help)
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_options(p: argparse.ArgumentParser, interface: str, *, skip: tuple[str, ...] = ()) -> None:
    """The flags of the declared options ``interface`` takes (see :mod:`convnet.core.options`),
    each stored under its option's name, None when not given. Their values are checked by
    the library, not here, so that a wrong one gets the same message from the command line
    and from Python."""
    for o in taken_by(interface, *DECLARED):
        if o.name in skip:
            continue
        kind, extra = o.base_type, {}
        # the choices are shown, and checked by the library (the same message from every interface)
        choices = "{" + ",".join(map(str, o.choices)) + "}" if o.choices else None
        if o.flag_name.startswith("--no-"):  # a switch that is on unless turned off
            extra = {"action": "store_false", "default": True}
        elif kind is bool and (o.default is None or "recipe" in o.takes):
            extra = {"action": argparse.BooleanOptionalAction}
        elif kind is bool:
            extra = {"action": "store_true"}
        elif typing.get_args(kind)[-1:] == (Ellipsis,):  # a flag given once per value
            extra = {"action": "append", "metavar": choices}
        else:
            extra = {"type": str if o.parse else kind, "metavar": o.metavar or choices}
        p.add_argument(o.flag_name, dest=o.name, help=o.help_text(), **{"default": None, **extra})


def _device_flag(p: argparse.ArgumentParser) -> None:
    """``--device``, as the training run declares it."""
    (device,) = [o for o in taken_by(TRAIN, TrainRequest) if o.name == "device"]
    p.add_argument(device.flag_name, default=device.default, choices=device.choices, help=device.help_text())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="convnet", description="Train, evaluate and use CNN image classifiers.")
    parser.add_argument("--version", action="version", version=f"convnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model; writes a run folder",
                       description="Train a model. Settings come from a recipe (see `convnet recipes`); "
                                   "each flag given overrides the recipe's value.")
    add_options(p, TRAIN)

    p = sub.add_parser("evaluate", help="accuracy, classification report and confusion matrix of a run",
                       description="Score a run (or its .onnx file) on its own test split, or on a labelled folder "
                                   "of new images with --data, e.g. `convnet evaluate RUN --data new-photos/`.")
    p.add_argument("run", type=Path, help="run folder, or an .onnx file from `convnet export` (ONNX Runtime)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="score on this labelled folder instead: class folders, or the test/ split of train/ "
                        "val/ test/; classes matched by name (default: the run's own test split)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the run's data is now, if it moved (default: where it was trained)")
    _device_flag(p)

    p = sub.add_parser("predict", help="classify image files, .npy arrays or IDX files with a trained run")
    p.add_argument("run", type=Path, help="run folder, or an .onnx file from `convnet export` (ONNX Runtime)")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="PNG/JPEG/... images, folders of them (sorted, recursive), .npy arrays, IDX files")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="layout of 4-d arrays: channels first or last (default: detect)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects (default: text)")
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
                                   "for `convnet train --recipe FILE`. A setting's flag fixes it for every trial "
                                   "(as --param NAME=VALUE does). Needs pip install 'convnet[tune]'.")
    p.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                   help="search a setting as LOW:HIGH, LOW:HIGH:log or A,B,C, or fix it to one value; repeatable "
                        "(default: the space around the recipe: lr, weight_decay, epochs, label_smoothing, batch_size, "
                        "model)")
    p.add_argument("--space", type=Path, default=None, metavar="FILE",
                   help="a TOML file of NAME = SPEC lines, like --param (which overrides it) (default: none)")
    p.add_argument("--trials", type=int, default=20,
                   help="the study's total of finished trials; each process stops there (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop this process's search after this long (default: none)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="keep the study in a database that other convnet tune processes join, e.g. "
                        "sqlite:///tune.db (default: in memory, this process only)")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="the study's name in --storage (default: the data's name and the recipe's)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="folder for best.toml and report.html (default: tune/STUDY)")
    p.add_argument("--report", action="store_true",
                   help="also write an HTML page of the study: trials, optimisation history, importances "
                        "(default: off)")
    add_options(p, TUNE)

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
    p.add_argument("--quick", action="store_true", help="a first look: 12,000 images, 5 SGD + 3 Adam epochs "
                                                        "(default: off)")
    p.add_argument("--out", type=Path, default=None, help="folder for the two runs (default: runs/tutorial-TIME)")
    add_options(p, TUTORIAL)

    p = sub.add_parser("bench", help="images/s of convnet vs the tutorial's loop, side by side")
    p.add_argument("--model", default="seed", help="model to time (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--train-images", type=int, default=12_800, help="images per timed epoch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats; the median is reported (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.add_argument("--target", type=float, default=None,
                   help="instead: seconds of training to this test accuracy, per seed, for --recipe (default: off, "
                        "images/s instead)")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help="with --target: a named recipe or a recipe file (default: the device's default recipe)")
    p.add_argument("--seeds", type=int, default=3, help="with --target: runs, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true",
                   help="with --target: skip the tutorial's Adam-15 reference run (default: run it)")
    add_options(p, BENCH)

    p = sub.add_parser("suggest", help="the unlabelled images whose labels would help a run most, ranked",
                       description="Rank a pool of unlabelled images by how much their labels would help the run: "
                                   "the ones it is least sure of, spread over the data. Label them (move each file "
                                   "into its class folder under the training folder) and train again, with "
                                   "`--unlabeled POOL` for the rest. Images the run trained on are never suggested.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("pool", metavar="POOL", help="a folder of unlabelled images (any layout), or rest: the training "
                                                "images the run's --subset left out (by index on a named data set)")
    p.add_argument("--n", type=int, default=100, metavar="K", help="how many to suggest (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write the ranking as path,predicted,probability,score (default: no file)")
    p.add_argument("--html", type=Path, default=None, metavar="FILE",
                   help="write a contact sheet of the suggested images with the model's guess (default: no file)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the run's data is now, if it moved (default: where it was trained)")
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
                        "run's epochs, predict each image (kept in RUN/inspect/) (default: the test split only)")
    p.add_argument("--calibrate", action="store_true",
                   help="with --train-folds: fit the run's temperature on the out-of-fold probabilities and keep it "
                        "in the run (default: off)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write every likely label error to FILE (default: no file)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the run's data is now (default: as trained)")
    _device_flag(p)

    p = sub.add_parser("compare", help="runs side by side in the terminal: accuracies, losses, f1 per class")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--data-dir", type=Path, default=None, help="where the runs' data is now (default: as trained)")
    _device_flag(p)

    p = sub.add_parser("models", help="list the registered models and their sizes")
    p.add_argument("--speed", action="store_true",
                   help="also build each model and time its predictions on this machine's CPU (default: off)")
    p = sub.add_parser("recipes", help="list the named training recipes and their settings, or a recipe file's")
    p.add_argument("file", nargs="?", type=Path, default=None, help="a recipe file to show (default: the named ones)")
    sub.add_parser("datasets", help="list the named data sets: image size, channels, classes, where each is found")
    return parser


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the system.

    Every training step frees and reallocates the same activation buffers (12.8 MB each
    for the seed model at batch 128). With glibc's adaptive defaults these sizes can
    land on mmap/munmap or heap trimming, so each step pays page faults: on 2 cores half
    the CPU time went to the kernel and an epoch took 14 s instead of 8. Raising the mmap
    and trim thresholds keeps the buffers in the heap. A no-op (returning False) where
    the C library is not glibc. Called once by the command line, at start (a Python caller may call it too).
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    one_gib = 1 << 30
    return bool(libc.mallopt(m_mmap_threshold, one_gib)) and bool(libc.mallopt(m_trim_threshold, 2 * one_gib))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"convnet: error: {e}", file=sys.stderr)
        return 1
    try:
        keep_freed_memory()  # steady step times on glibc
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
