"""The command line: argparse sub-commands, each mapped to library calls.

Only this module knows argparse. User errors (:class:`ConvnetError`) become one line on
stderr and exit status 1; bad flags exit 2 (argparse's own convention); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from convnet import __version__
from convnet.data import DATASETS, load_dataset
from convnet.engine import DEVICES, Engine, resolve_device
from convnet.errors import ConvnetError, InputError
from convnet.evaluate import evaluate, evaluate_run
from convnet.models import count_parameters, create_model, list_models
from convnet.predict import LAYOUTS, load_inputs, load_model, predict
from convnet.runs import new_run_dir, write_json
from convnet.train import OPTIMIZERS, ConsolePrinter, TrainConfig, resume, train
from convnet.tutorial import run_tutorial

D = TrainConfig()  # defaults, shown in --help


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", choices=list(DATASETS), help="data set (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four IDX files (default: cache, then system copy, then download)")


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to compute (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnet", description="Train, evaluate and use CNN image classifiers.")
    parser.add_argument("--version", action="version", version=f"convnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model; writes a run folder")
    p.add_argument("--model", default=D.model, help=f"registered model (default: {D.model}; see `convnet models`)")
    p.add_argument("--optimizer", default=D.optimizer, choices=OPTIMIZERS, help=f"(default: {D.optimizer})")
    p.add_argument("--lr", type=float, default=D.lr, help=f"learning rate (default: {D.lr})")
    p.add_argument("--epochs", type=int, default=D.epochs, help=f"(default: {D.epochs})")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help=f"(default: {D.batch_size})")
    p.add_argument("--seed", type=int, default=D.seed, help=f"initial weights and shuffle order (default: {D.seed})")
    p.add_argument("--momentum", type=float, default=D.momentum, help=f"SGD momentum (default: {D.momentum})")
    p.add_argument("--weight-decay", type=float, default=D.weight_decay, help=f"(default: {D.weight_decay})")
    p.add_argument("--no-shuffle", action="store_true", help="keep the data's order every epoch (default: shuffle)")
    p.add_argument("--faithful", action="store_true",
                   help="the tutorial's exact arithmetic: fp32, no shuffling, its float32 learning rate")
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/MODEL-OPTIMIZER-TIME)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN",
                   help="continue RUN from its last complete epoch, with its own config")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar (default: bar in a terminal)")
    _data_flags(p)
    _device_flag(p)

    p = sub.add_parser("evaluate", help="accuracy, classification report and confusion matrix of a run")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the IDX files (default: as trained)")
    _device_flag(p)

    p = sub.add_parser("predict", help="classify image files, .npy arrays or IDX files with a trained run")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="PNG/JPEG/... images, .npy arrays, IDX files")
    p.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="layout of 4-d arrays: channels first or last (default: detect)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    _device_flag(p)

    p = sub.add_parser("tutorial", help="the tutorial's whole story: SGD vs Adam, reports, channels first/last")
    p.add_argument("--quick", action="store_true", help="a first look: 12,000 images, 5 SGD + 3 Adam epochs")
    p.add_argument("--faithful", action="store_true", help="the tutorial's exact arithmetic and numbers")
    p.add_argument("--out", type=Path, default=None, help="folder for the two runs (default: runs/tutorial-TIME)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _data_flags(p)
    _device_flag(p)

    sub.add_parser("models", help="list the registered models")
    return parser


def cmd_train(a: argparse.Namespace) -> int:
    device = resolve_device(a.device)
    printer = ConsolePrinter(progress=not a.no_progress)
    if a.resume is not None:
        config = TrainConfig.from_dict(_read_train_config(a.resume))
        engine = Engine.faithful(device) if config.faithful else Engine.fast(device)
        result = resume(a.resume, engine=engine, events=printer, data_dir=a.data_dir)
    else:
        config = TrainConfig(model=a.model, optimizer=a.optimizer, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size,
                             seed=a.seed, shuffle=not a.no_shuffle, momentum=a.momentum,
                             weight_decay=a.weight_decay, faithful=a.faithful)
        config.validate()  # before anything is loaded or written
        dataset = load_dataset(a.dataset, a.data_dir, subset=a.subset)
        engine = Engine.faithful(device) if config.faithful else Engine.fast(device)
        run_dir = new_run_dir(a.out, f"{config.model}-{config.optimizer}")
        print(f"training {config.model} on {len(dataset.train):,} {dataset.name} images, {engine.device}; "
              f"run folder {run_dir}", flush=True)
        result = train(config, dataset, engine=engine, events=printer, run_dir=run_dir)
    assert result.run_dir is not None
    ev = evaluate_run(result.run_dir, engine=engine, data_dir=a.data_dir)
    print(f"Train Accuracy : {ev.train.accuracy:.3f}")
    print(f"Test  Accuracy : {ev.test.accuracy:.3f}")
    print(f"trained in {result.seconds:.1f} s; weights in {result.run_dir / 'model.safetensors'}")
    return 0


def _read_train_config(run: Path) -> dict:  # type: ignore[type-arg]
    from convnet.runs import open_run

    return open_run(run).config["train"]  # type: ignore[no-any-return]


def cmd_evaluate(a: argparse.Namespace) -> int:
    ev = evaluate_run(a.run, engine=Engine.fast(resolve_device(a.device)), data_dir=a.data_dir)
    if a.json:
        print(json.dumps(ev.to_json(), indent=2))
        return 0
    print(f"Train Accuracy : {ev.train.accuracy:.3f}")
    print(f"Test  Accuracy : {ev.test.accuracy:.3f}")
    print("Test Data Classification Report :")
    print(ev.report_text)
    print("Confusion matrix (rows: true class, columns: predicted class)")
    width = max(len(str(int(ev.confusion_matrix.max()))), 4)
    print(" " * 13 + "".join(f"{i:>{width + 1}}" for i in range(len(ev.classes))))
    for i, (name, row) in enumerate(zip(ev.classes, ev.confusion_matrix, strict=True)):
        print(f"{i} {name[:10]:<11}" + "".join(f"{int(v):>{width + 1}}" for v in row))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    engine = Engine.fast(resolve_device(a.device))
    model, run = load_model(a.run, engine)
    rows, failed = [], 0
    for item in load_inputs(a.inputs, run.image_shape, layout=a.layout):
        if isinstance(item, InputError):
            print(f"convnet: error: {item}", file=sys.stderr)
            failed += 1
            continue
        pred = predict(model, item.images, engine=engine)
        for name, label, probs in zip(item.names, pred.labels.tolist(), pred.probabilities, strict=True):
            rows.append({"input": name, "label": label, "class": run.classes[label],
                         "probability": round(float(probs[label]), 6)})
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max((len(r["input"]) for r in rows), default=5)
        for r in rows:
            print(f"{r['input']:<{width}}  {r['label']}  {r['class']:<12}  {r['probability']:.3f}")
    if failed:
        print(f"convnet: {failed} of {len(a.inputs)} inputs could not be read", file=sys.stderr)
    return 1 if failed else 0


def cmd_tutorial(a: argparse.Namespace) -> int:
    device = resolve_device(a.device)
    engine = Engine.faithful(device) if a.faithful else Engine.fast(device)
    dataset = load_dataset(a.dataset, a.data_dir)
    out = new_run_dir(a.out, "tutorial")
    run_tutorial(dataset, out, engine=engine, faithful=a.faithful, quick=a.quick, progress=not a.no_progress)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    for name, description in list_models().items():
        print(f"{name:<10} {count_parameters(create_model(name)):>9,} parameters  {description}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "tutorial": cmd_tutorial,
            "models": cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConvnetError as e:
        print(f"convnet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = " (resume with `convnet train --resume RUN`)" if args.command == "train" else ""
        print(f"convnet: interrupted{hint}", file=sys.stderr)
        return 130
