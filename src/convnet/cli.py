"""The command line: argparse sub-commands, each mapped to library calls.

Only this module knows argparse. User errors (:class:`ConvnetError`) become one line on
stderr and exit status 1; bad flags exit 2 (argparse's own convention); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from convnet import __version__
from convnet.augment import AUGMENTS
from convnet.bench import format_bench, format_time_to_accuracy, run_bench, time_to_accuracy
from convnet.data import DATASETS, Dataset, load_dataset
from convnet.engine import (
    DEVICES,
    DistributedInfo,
    Engine,
    init_distributed,
    keep_freed_memory,
    resolve_device,
)
from convnet.errors import ConvnetError, InputError
from convnet.evaluate import evaluate_run
from convnet.models import count_parameters, create_model, list_models
from convnet.predict import LAYOUTS, input_batches, load_model, predict
from convnet.report import build_report, compare, evaluate_and_plot
from convnet.runs import new_run_dir
from convnet.train import (
    DEFAULT_RECIPE,
    OPTIMIZERS,
    RECIPES,
    SCHEDULES,
    ConsolePrinter,
    TrainConfig,
    recipe,
    resume,
    train,
)
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

    p = sub.add_parser("train", help="train a model; writes a run folder",
                       description="Train a model. Settings come from a recipe (see `convnet recipes`); "
                                   "each flag given overrides the recipe's value.")
    p.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="named settings (default: cpu on a CPU, gpu on a GPU; tutorial with --faithful)")
    p.add_argument("--model", help="registered model (default: the recipe's; see `convnet models`)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="(default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--epochs", type=int, help="(default: the recipe's)")
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

    p = sub.add_parser("bench", help="images/s of convnet vs the tutorial's loop, side by side")
    p.add_argument("--model", default="seed", help="model to time (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--train-images", type=int, default=12_800, help="images per timed epoch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, 
                   help="timed repeats; the median is reported (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--target", type=float, default=None,
                   help="instead: seconds of training to this test accuracy, per seed, for --recipe")
    p.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="with --target (default: the device's default recipe)")
    p.add_argument("--seeds", type=int, default=3, help="with --target: runs, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--no-reference", action="store_true",
                   help="with --target: skip the tutorial's Adam-15 reference run")
    _data_flags(p)
    _device_flag(p)

    p = sub.add_parser("report", help="one self-contained HTML report of runs: scores, plots, comparison")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders; several are compared first")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="HTML file or folder (default: report.html in the runs' common folder)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the IDX files (default: as trained)")
    _device_flag(p)

    p = sub.add_parser("compare", help="runs side by side in the terminal: accuracies, losses, f1 per class")
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the IDX files (default: as trained)")
    _device_flag(p)

    sub.add_parser("models", help="list the registered models")
    sub.add_parser("recipes", help="list the named training recipes and their settings")
    return parser


def train_config(a: argparse.Namespace, device_type: str) -> TrainConfig:
    """The recipe's config with every flag that was given laid over it."""
    name = a.recipe or ("tutorial" if a.faithful else DEFAULT_RECIPE.get(device_type, "cpu"))
    config = recipe(name)
    if a.optimizer not in (None, "sgd") and a.nesterov is None:  # the recipe's SGD momentum does not carry over
        config.nesterov, config.momentum = False, 0.0
    for f in fields(TrainConfig):
        value = getattr(a, f.name, None)
        if value is not None and f.name != "faithful":
            setattr(config, f.name, value)
    if a.faithful:
        config.faithful, config.shuffle = True, False
    return config


def cmd_train(a: argparse.Namespace) -> int:
    """Train in this process, or as one of several under torchrun (DistributedDataParallel)."""
    info = init_distributed(a.device, dict(os.environ))
    if info is None:
        return _train(a, info)
    import torch.distributed as dist

    try:
        status = _train(a, info)
        dist.barrier()  # rank 0 evaluates after training: the others wait, so no process tears down early
        return status
    finally:
        dist.destroy_process_group()


def _train(a: argparse.Namespace, info: DistributedInfo | None) -> int:
    device = resolve_device(a.device)
    if info is not None and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)  # one GPU per process
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    printer = ConsolePrinter(progress=not a.no_progress) if rank == 0 else None  # one process prints

    def engine_for(config: TrainConfig) -> Engine:
        engine = Engine.faithful(device) if config.faithful else Engine.fast(device)
        return replace(engine, rank=rank, world_size=world)

    dataset: Dataset | None = None  # on --resume the run reads its own data
    if a.resume is not None:
        engine = engine_for(TrainConfig.from_dict(_read_train_config(a.resume)))
        result = resume(a.resume, engine=engine, events=printer, data_dir=a.data_dir)
    else:
        config = train_config(a, device.type)
        config.validate()  # before anything is loaded or written
        dataset = load_dataset(a.dataset, a.data_dir, subset=a.subset)
        engine = engine_for(config)
        run_dir = new_run_dir(a.out, f"{config.model}-{config.optimizer}") if rank == 0 else None
        if rank == 0:
            procs = f" x {world} processes" if world > 1 else ""
            print(f"training {config.model} on {len(dataset.train):,} {dataset.name} images, {engine.device}{procs}; "
                  f"run folder {run_dir}", flush=True)
        result = train(config, dataset, engine=engine, events=printer, run_dir=run_dir)
    if rank != 0:
        return 0
    assert result.run_dir is not None
    ev = evaluate_run(result.run_dir, engine=replace(engine, rank=0, world_size=1), data_dir=a.data_dir,
                      dataset=dataset)  # the data set already in memory, not read a second time
    print(f"Train Accuracy : {ev.train.accuracy:.3f}")
    print(f"Test  Accuracy : {ev.test.accuracy:.3f}")
    print(f"trained in {result.seconds:.1f} s; weights in {result.run_dir / 'model.safetensors'}")
    return 0


def _read_train_config(run: Path) -> dict:  # type: ignore[type-arg]
    from convnet.runs import open_run

    return open_run(run).config["train"]  # type: ignore[no-any-return]


def cmd_evaluate(a: argparse.Namespace) -> int:
    ev = evaluate_and_plot(a.run, engine=Engine.fast(resolve_device(a.device)), data_dir=a.data_dir)
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
    print(f"Plots in {a.run / 'plots'}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    path = build_report(a.runs, a.out, data_dir=a.data_dir, engine=Engine.fast(resolve_device(a.device)))
    print(f"Report written to {path}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    print(compare(a.runs, data_dir=a.data_dir, engine=Engine.fast(resolve_device(a.device))))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    engine = Engine.fast(resolve_device(a.device))
    model, run = load_model(a.run, engine)
    tta = bool(run.config["train"].get("tta", False))  # predict the way the run was evaluated
    failed, printed, width = 0, 0, 0
    for item in input_batches(a.inputs, run.image_shape, layout=a.layout):  # bounded memory for inputs of any size
        if isinstance(item, InputError):
            print(f"convnet: error: {item}", file=sys.stderr)
            failed += 1
            continue
        pred = predict(model, item.images, engine=engine, tta=tta)
        width = max(width, *map(len, item.names))
        top = pred.probabilities.max(dim=1).values.tolist()  # the probability of each predicted label
        for name, label, probability in zip(item.names, pred.labels.tolist(), top, strict=True):
            row = {"input": name, "label": label, "class": run.classes[label], "probability": round(probability, 6)}
            if a.json:  # one JSON list, printed a row at a time
                text = json.dumps(row, indent=2).replace("\n", "\n  ")
                print("[\n  " if not printed else ",\n  ", text, sep="", end="")
            else:
                print(f"{name:<{width}}  {label}  {row['class']:<12}  {row['probability']:.3f}")
            printed += 1
    if a.json:
        print("\n]" if printed else "[]")
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


def cmd_bench(a: argparse.Namespace) -> int:
    if a.repeats < 1 or a.train_images < a.batch_size:
        raise ConvnetError("--repeats must be >= 1 and --train-images at least one --batch-size")
    dataset = load_dataset(a.dataset, a.data_dir)
    if a.target is not None:
        if not 0 < a.target <= 1 or a.seeds < 1:
            raise ConvnetError(f"--target must be an accuracy in (0, 1] and --seeds >= 1, got {a.target}, {a.seeds}")
        engine = Engine.fast(resolve_device(a.device))
        tta = time_to_accuracy(dataset, engine=engine, recipe_name=a.recipe or DEFAULT_RECIPE[engine.device.type],
                               target=a.target, seeds=a.seeds, reference=not a.no_reference)
        print(json.dumps(tta.to_json(), indent=2) if a.json else format_time_to_accuracy(tta))
        return 0
    result = run_bench(dataset, engine=Engine.fast(resolve_device(a.device)), model=a.model,
                       batch_size=a.batch_size, train_images=a.train_images, repeats=a.repeats)
    print(json.dumps(result.to_json(), indent=2) if a.json else format_bench(result))
    return 0


def cmd_recipes(a: argparse.Namespace) -> int:
    per_run = {"seed", "val_split", "target_accuracy", "faithful"}  # not part of a recipe
    for name, config in RECIPES.items():
        default = [d for d, r in DEFAULT_RECIPE.items() if r == name]
        note = f" (default on {', '.join(default)})" if default else " (the tutorial's settings; base of --faithful)"
        print(f"{name}{note}")
        for k, v in asdict(config).items():
            if k not in per_run:
                print(f"  --{k.replace('_', '-'):<17} {v}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    for name, description in list_models().items():
        print(f"{name:<10} {count_parameters(create_model(name)):>9,} parameters  {description}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "tutorial": cmd_tutorial,
            "models": cmd_models, "recipes": cmd_recipes, "bench": cmd_bench, "report": cmd_report,
            "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # steady step times on glibc (see engine.keep_freed_memory)
    try:
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
