"""The command line: argparse sub-commands, each parsed and handed to its function in
:mod:`convnet.cli.commands` (one library call each).

Only these two modules know argparse. User errors (:class:`ConvnetError`), a flag argparse
refuses among them, become one line on stderr and exit status 1; Ctrl-C exits 130.
The library is imported inside each command, so ``convnet --help`` and ``--version``
start without loading PyTorch.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convnet.cli.commands import COMMANDS
from convnet.core.errors import ConvnetError
from convnet.core.options import BENCH, TRAIN, TUNE, TUTORIAL, declared, taken_by
from convnet.core.version import __version__, install_hint
from convnet.data.options import LAYOUTS, DataOptions
from convnet.training.config import TrainConfig, TrainRequest

DECLARED = (TrainConfig, DataOptions, TrainRequest)  # the classes whose fields declare the options of a run


class UsageError(ConvnetError):
    """A flag argparse refuses: one line naming it, exit status 1, as every user error."""


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        # a flag is spelled out: an abbreviation would make a renamed flag (--target) mean its neighbour
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def parse_args(self, args: typing.Any = None, namespace: typing.Any = None) -> typing.Any:
        found, extras = self.parse_known_args(args, namespace)
        if extras:  # named against the subcommand given, whose --help lists what it takes
            command = getattr(found, "command", None)
            raise UsageError(f"unrecognized arguments: {' '.join(extras)} (see `{self.prog}"
                             f"{' ' + command if command else ''} --help`)")
        return found

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


def _declared(p: argparse.ArgumentParser, name: str) -> None:
    """A flag of the training run's declarations (``--device``, ``--no-progress``), as train has it."""
    (o,) = [o for o in declared(TrainRequest) if o.name == name]
    if o.flag_name.startswith("--no-"):
        p.add_argument(o.flag_name, dest=o.name, action="store_false", default=True, help=o.help_text())
    else:
        p.add_argument(o.flag_name, default=o.default, choices=o.choices, help=o.help_text())


# The flags several commands take, each defined once, so that a name means one thing everywhere.
def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of text (default: text)")


def _run(p: argparse.ArgumentParser, *, onnx: bool) -> None:
    p.add_argument("run", type=Path, metavar="RUN|FILE.onnx" if onnx else "RUN",
                   help="a run folder, or an .onnx file from `convnet export` (ONNX Runtime)" if onnx else
                   "a run folder (not an .onnx file: this command needs the model in PyTorch)")


def _run_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="the folder holding the run's data set's files, where they moved (default: where the run "
                        "read them)")


def _reads_a_run(p: argparse.ArgumentParser) -> None:
    """The flags of a command that scores or reads a run's data: where the data moved, JSON, the bar, the device."""
    _run_data_dir(p)
    _json(p)
    _declared(p, "progress")
    _declared(p, "device")


def _top_k(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="the most probable classes each answer carries (default: %(default)s)")


def _min_confidence(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="answer \"unsure\" (label null) where the most probable class is below P, keeping the "
                        "probabilities (default: always the most probable class)")


def _command(sub: Any, name: str, summary: str, description: str, *examples: str) -> argparse.ArgumentParser:
    """A subcommand with its one-line summary, its description and its examples (in ``--help``)."""
    return sub.add_parser(name, help=summary, description=description,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="convnet", description="Train, evaluate and use CNN image classifiers.")
    parser.add_argument("--version", action="version", version=f"convnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", "train a model; writes a run folder",
                 "Train a model. Settings come from a recipe (see `convnet recipes`); each flag given overrides the "
                 "recipe's value. A share of the training images is held out for validation and the best epoch's "
                 "weights are kept.",
                 "convnet train --data photos/", "convnet train --subset 1000 --unlabeled rest",
                 "convnet train --model seed --optimizer sgd --lr 0.001 --epochs 25 --faithful")
    add_options(p, TRAIN)
    _json(p)

    p = _command(sub, "evaluate", "accuracy, classification report and confusion matrix of a run",
                 "Score a run (or its .onnx file) on its own test split, or on a labelled folder of new images.",
                 "convnet evaluate runs/fastnet-sgd-20261206-120000",
                 "convnet evaluate runs/fastnet-sgd-20261206-120000 --data new-photos/")
    _run(p, onnx=True)
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="score on this labelled folder instead: class folders, or the test/ split of train/ "
                        "val/ test/; classes matched by name (default: the run's own test split)")
    _reads_a_run(p)

    p = _command(sub, "predict", "classify image files, folders, .npy arrays or IDX files with a trained run",
                 "Predict the class of every input the run's way (its input size and channels, its flips).",
                 "convnet predict RUN shirt.jpg boots.png images.npy", "convnet predict RUN photos/ --csv out.csv")
    _run(p, onnx=True)
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="PNG/JPEG/... images, folders of them (sorted, recursive), .npy arrays, IDX files")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="layout of 4-d arrays: channels first or last (default: detect)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write a row per image to FILE (path, top classes and probabilities, error) and print a "
                        "summary instead of the rows (default: no file)")
    _top_k(p)
    _min_confidence(p)
    p.add_argument("--explain", type=Path, default=None, metavar="DIR",
                   help="also write each image with a heat map of the evidence for its predicted class (integrated "
                        "gradients) into DIR, as PNG files; run folders only (default: none)")
    _json(p)
    _declared(p, "progress")
    _declared(p, "device")

    p = _command(sub, "tune", "search for better settings on a validation split (Optuna); writes a recipe",
                 "Search training settings with Optuna, each trial scored on --val-split of the training images "
                 "(never the test split), and write the best as a recipe file for `convnet train --recipe FILE`. A "
                 "setting's flag fixes it for every trial (as --param NAME=VALUE does). Needs the tune extra: "
                 f"{install_hint('tune')}.",
                 "convnet tune --data photos/ --trials 20", "convnet tune --subset 1000 --model seed --param "
                 "lr=0.01:0.5:log")
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
                   help="the folder it writes into: best.toml and report.html (default: tune/STUDY)")
    p.add_argument("--report", action="store_true",
                   help="also write an HTML page of the study: trials, optimisation history, importances "
                        "(default: off)")
    add_options(p, TUNE)
    _json(p)
    _declared(p, "progress")

    p = _command(sub, "export", "the run's model as an ONNX file, checked in ONNX Runtime",
                 "Export a run's model to ONNX (uint8 images in, class probabilities out) and check it in ONNX "
                 "Runtime against PyTorch on the run's test images; a model that fails the check is not written.",
                 "convnet export RUN", "convnet export RUN --onnx deploy/model.onnx")
    _run(p, onnx=False)
    p.add_argument("--onnx", type=Path, default=None, metavar="FILE", help="the .onnx file (default: RUN/model.onnx)")
    _run_data_dir(p)
    _json(p)
    _declared(p, "progress")

    p = _command(sub, "serve", "an HTTP prediction service and web page for a run or an .onnx file",
                 "Serve predictions over HTTP: POST /predict, GET /health, GET /ready, GET /model, GET /metrics "
                 "(Prometheus), API docs at /docs and a page at / to try images.",
                 "convnet serve RUN", "convnet serve RUN/model.onnx --host 0.0.0.0 --port 8080 --workers 2")
    _run(p, onnx=True)
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
    _top_k(p)
    _min_confidence(p)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes answering on the one port, each with its own ONNX Runtime session; a run "
                        "folder is exported once (default: %(default)s)")

    p = _command(sub, "tutorial", "the tutorial's whole story: SGD vs Adam, reports, channels first/last",
                 "Run the tutorial this tool grew from, end to end, with the package: Fashion-MNIST, its 3-layer "
                 "CNN trained with SGD then Adam, predictions, scores, and channels first vs last.",
                 "convnet tutorial --quick", "convnet tutorial --faithful")
    p.add_argument("--quick", action="store_true", help="a first look: 12,000 images, 5 SGD + 3 Adam epochs "
                                                        "(default: off)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the folder it writes into: the two runs and the report (default: runs/tutorial-TIME)")
    add_options(p, TUTORIAL)

    p = _command(sub, "bench", "images/s of convnet vs the tutorial's loop, side by side",
                 "Time convnet's training and prediction loops against the tutorial's, on the same data and "
                 "weights; or, with --target-accuracy, the seconds of training each run takes to reach a test "
                 "accuracy (a benchmark measures on the test split; training decisions never do).",
                 "convnet bench", "convnet bench --target-accuracy 0.895 --runs 3")
    p.add_argument("--model", default="seed", metavar="NAME", help="the model to time (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    p.add_argument("--train-images", type=int, default=12_800, help="images per timed epoch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats; the median is reported (default: %(default)s)")
    p.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                   help="instead: seconds of training to this test accuracy, per run, for --recipe (default: off)")
    p.add_argument("--recipe", default=None, metavar="NAME|FILE",
                   help="with --target-accuracy: a named recipe or a recipe file (default: the device's recipe)")
    p.add_argument("--runs", type=int, default=3,
                   help="with --target-accuracy: how many runs, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true",
                   help="with --target-accuracy: skip the tutorial's Adam-15 reference run (default: run it)")
    add_options(p, BENCH)
    _json(p)
    _declared(p, "progress")

    p = _command(sub, "suggest", "the unlabelled images whose labels would help a run most, ranked",
                 "Rank a pool of unlabelled images by how much their labels would help the run: the ones it is least "
                 "sure of, spread over the data. Label them (move each file into its class folder under the training "
                 "folder) and train again, with --unlabeled POOL for the rest. The run's own labelled images "
                 "(training, validation, test) are never suggested.",
                 "convnet suggest RUN unlabelled/ --n 100 --html label-these.html", "convnet suggest RUN rest --csv "
                 "next.csv")
    _run(p, onnx=False)
    p.add_argument("pool", metavar="POOL", help="a folder of unlabelled images (any layout), or rest: the training "
                                                "images the run's --subset left out (by index on a named data set)")
    p.add_argument("--n", type=int, default=100, metavar="K", help="how many to suggest (default: %(default)s)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write the ranking as path,predicted,probability,score (default: no file)")
    p.add_argument("--html", type=Path, default=None, metavar="FILE",
                   help="write a contact sheet of the suggested images with the model's guess (default: no file)")
    _reads_a_run(p)

    p = _command(sub, "report", "one self-contained HTML report of runs: scores, plots, comparison",
                 "Write one HTML page of one or more runs (several are compared first), scoring and drawing any run "
                 "whose scores or pictures are missing or out of date.",
                 "convnet report RUN", "convnet report runs/* --html comparison.html")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders; several are compared first")
    p.add_argument("--html", type=Path, default=None, metavar="FILE",
                   help="the HTML file (default: report.html in the runs' common folder)")
    _reads_a_run(p)

    p = _command(sub, "inspect", "can I trust it? likely label errors, calibration, per-class scores",
                 "Inspect a run: likely label errors (confident learning) on the test split, and with --train-folds "
                 "on the training split; the expected calibration error with a 95 % interval and a reliability "
                 "diagram; support, precision and recall per class and the most confused pairs. Kept in "
                 "RUN/inspect.json for `convnet report`.",
                 "convnet inspect RUN", "convnet inspect RUN --train-folds 5 --csv issues.csv")
    _run(p, onnx=False)
    p.add_argument("--train-folds", type=int, default=None, metavar="K",
                   help="also check the training labels: K models, each trained on the other folds for half the "
                        "run's epochs, predict each image (kept in RUN/inspect/) (default: the test split only)")
    p.add_argument("--calibrate", action="store_true",
                   help="with --train-folds: fit the run's temperature on the out-of-fold probabilities and keep it "
                        "in the run (default: off)")
    p.add_argument("--csv", type=Path, default=None, metavar="FILE",
                   help="write every likely label error to FILE (default: no file)")
    _reads_a_run(p)

    p = _command(sub, "compare", "runs side by side in the terminal: accuracies, losses, f1 per class",
                 "Print runs side by side: settings, sizes, times, accuracies, the epoch each keeps, f1 per class.",
                 "convnet compare runs/a runs/b")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    _reads_a_run(p)

    p = _command(sub, "models", "list the registered models and their sizes",
                 "List every registered model with its parameter count (for 10 classes of 28x28 grey images).",
                 "convnet models", "convnet models --speed")
    p.add_argument("--speed", action="store_true",
                   help="also build each model and time its predictions on this machine's CPU (default: off)")
    _json(p)
    p = _command(sub, "recipes", "list the named training recipes and their settings, or a recipe file's",
                 "List each named recipe's settings as the flags of `convnet train` that set them (they paste "
                 "back), or a recipe file's.", "convnet recipes", "convnet recipes tune/photos-cpu/best.toml")
    p.add_argument("file", nargs="?", type=Path, default=None, help="a recipe file to show (default: the named ones)")
    _json(p)
    p = _command(sub, "datasets", "list the named data sets: image size, channels, classes, where each is found",
                 "List the data sets convnet knows by name, and where each is found on this machine.",
                 "convnet datasets")
    _json(p)
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
