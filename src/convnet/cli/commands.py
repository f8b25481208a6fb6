"""What each command does with its parsed flags: one library call, then what it prints.

:mod:`convnet.cli.parser` parses the command line and calls the function of the command here.
The library is imported inside each command, so ``convnet --help`` and ``--version``
start without loading PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from convnet.core.errors import ConvnetError
from convnet.core.options import BENCH, TRAIN, TUNE, TUTORIAL, taken_by
from convnet.data.options import DataOptions
from convnet.training.config import TrainConfig, TrainRequest


def option_values(a: argparse.Namespace, interface: str, cls: type) -> dict[str, Any]:
    """The options of ``cls`` that ``interface`` takes, as given (None: not given)."""
    found = {}
    for o in taken_by(interface, cls):
        value = getattr(a, o.name, None)
        if value is not None and o.parse is not None:
            value = o.parse(value)
        if isinstance(value, list):
            value = tuple(value)
        found[o.name] = value
    return found


def data_options(a: argparse.Namespace, interface: str) -> DataOptions:
    """The data flags as the library's :class:`DataOptions`."""
    return DataOptions(**{k: v for k, v in option_values(a, interface, DataOptions).items() if v is not None})


def request_of(a: argparse.Namespace, interface: str = TRAIN) -> TrainRequest:
    """``convnet train``'s flags as the library's :class:`TrainRequest`."""
    given = {k: v for k, v in option_values(a, interface, TrainRequest).items() if v is not None}
    return TrainRequest(settings=option_values(a, interface, TrainConfig), data=data_options(a, interface), **given)


def cmd_train(a: argparse.Namespace) -> int:
    from convnet.tools.experiment import run_training

    request = request_of(a)
    request.mlflow_experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or request.mlflow_experiment
    outcome = run_training(request, env=dict(os.environ), stream=sys.stderr if a.json else sys.stdout)
    if outcome.evaluation is None:  # not the main process under torchrun
        return 0
    ev, result = outcome.evaluation, outcome.result
    if a.json:  # the run's lines went to stderr: stdout is the JSON alone
        print(json.dumps({"run": str(result.run_dir), "kept": result.best, "seconds": result.seconds,
                          **ev.to_json()}, indent=2))
        return 0
    print(f"Train Accuracy : {accuracy_text(ev.train.accuracy)}")
    print(f"Test  Accuracy : {ev.test.accuracy:.3f}")
    assert result.run_dir is not None
    print(f"trained in {result.seconds:.1f} s; weights in {result.run_dir / 'model.safetensors'}")
    return 0


def accuracy_text(accuracy: float | None, why: str = "the run keeps no training images") -> str:
    return f"not measured ({why})" if accuracy is None else f"{accuracy:.3f}"


def cmd_evaluate(a: argparse.Namespace) -> int:
    from convnet.trust.report import evaluate_and_plot

    ev, plots = evaluate_and_plot(a.run, data_dir=a.data_dir, data=a.data, device=a.device, progress=a.progress)
    if a.json:
        print(json.dumps(ev.to_json(), indent=2))
        if ev.note:
            print(f"note: {ev.note}", file=sys.stderr)
        return 0
    if a.data is not None:
        print(f"Scored on {int(ev.confusion_matrix.sum()):,} labelled images of {a.data}")
    else:
        print(f"Train Accuracy : {accuracy_text(ev.train.accuracy)}")
    print(f"Test  Accuracy : {ev.test.accuracy:.3f}")
    if ev.note:
        print(f"note: {ev.note}")
    print("Test Data Classification Report :")
    print(ev.report_text)
    print("Confusion matrix (rows: true class, columns: predicted class)")
    width = max(len(str(int(ev.confusion_matrix.max()))), 4)
    print(" " * 13 + "".join(f"{i:>{width + 1}}" for i in range(len(ev.classes))))
    for i, (name, row) in enumerate(zip(ev.classes, ev.confusion_matrix, strict=True)):
        print(f"{i} {name[:10]:<11}" + "".join(f"{int(v):>{width + 1}}" for v in row))
    if plots is not None:
        print(f"Plots in {plots}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from convnet.use.export import export_run

    result = export_run(a.run, a.onnx, data_dir=a.data_dir, progress=a.progress)
    if a.json:
        print(json.dumps({"onnx": str(result.path), "opset": result.opset, "parity": result.parity.to_json(),
                          "mlflow_run": result.mlflow_run}, indent=2))
        return 0
    print(result.parity.describe())
    print(f"ONNX model (opset {result.opset}) written to {result.path}; parity figures in {result.parity_path}")
    if result.mlflow_run is not None:
        print(f"added to MLflow run {result.mlflow_run}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from convnet.use.serve import ServeOptions, serve

    serve(a.run, ServeOptions(host=a.host, port=a.port, max_body_mb=a.max_body_mb, max_images=a.max_images,
                              max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, top_k=a.top_k,
                              min_confidence=a.min_confidence, workers=a.workers))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from convnet.trust.report import build_report

    path = build_report(a.runs, a.html, data_dir=a.data_dir, device=a.device)
    print(json.dumps({"report": str(path)}) if a.json else f"Report written to {path}")
    return 0


ISSUES_PRINTED = 20  # likely label errors printed in the terminal (--csv and --json hold them all)


def cmd_inspect(a: argparse.Namespace) -> int:
    from convnet.trust.inspection import inspect_and_plot

    found, diagram = inspect_and_plot(a.run, train_folds=a.train_folds, calibrate=a.calibrate, data_dir=a.data_dir,
                                      device=a.device, progress=a.progress and not a.json, csv=a.csv)
    if a.json:
        print(json.dumps(found.to_json(), indent=2))
        return 0
    names = found.classes
    print(f"inspected {found.run}: {found.test_images:,} test images, accuracy {found.test_accuracy:.4f}")
    if found.warning:
        print(f"warning: {found.warning}")
    by_split = {s: sum(i.split == s for i in found.issues) for s in ("train", "test")}
    how = ""
    if found.folds is not None:
        f = found.folds
        epochs = f"{f['epochs']} epoch{'s' if f['epochs'] > 1 else ''}"
        how = (f"; training labels checked by {f['folds']} models of {epochs}, each predicting the "
               f"fold it did not train on" + (" (kept from an earlier inspection)" if f["reused"] else ""))
    print(f"likely label errors: {by_split['test']:,} in the test split"
          + (f", {by_split['train']:,} in the training split" if found.folds is not None else "") + how)
    width = max((len(n) for n in names), default=5)
    for i in found.issues[:ISSUES_PRINTED]:
        where = f"  {i.path}" if i.path else ""
        print(f"  {i.rank:>4}  {i.split:<5} {i.index:>6}  given {names[i.given]:<{width}}  looks like "
              f"{names[i.suggested]:<{width}} {i.confidence:.3f}{where}")
    if len(found.issues) > ISSUES_PRINTED:
        print(f"  … {len(found.issues) - ISSUES_PRINTED:,} more: --csv FILE or --json lists them all")
    c = found.calibration
    scaled = f"with temperature {found.temperature:.3f}" if found.temperature else "no temperature (train with " \
        "--calibrate, or inspect --train-folds K --calibrate)"
    print(f"calibration on the test split, {scaled}: expected calibration error {c.ece:.2%} (95 % interval "
          f"{c.low:.2%}–{c.high:.2%}, {len(c.bins)} bins); reliability diagram in {diagram}")
    if a.calibrate:
        print(f"temperature fitted on the out-of-fold probabilities, kept in {found.run / 'calibration.json'}; "
              "`convnet evaluate` and `convnet export` use it from now on")
    print(f"{'class':<{width}}  support  precision  recall")
    for r in found.per_class:
        print(f"{r.name:<{width}}  {r.support:>7,}  {r.precision:>9.3f}  {r.recall:>6.3f}")
    if found.confused:
        print("most confused: " + ", ".join(f"{t} as {p} {n:,}" for t, p, n in found.confused))
    if a.csv is not None:
        print(f"{len(found.issues):,} likely label errors in {a.csv}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from convnet.trust.report import compare

    print(compare(a.runs, data_dir=a.data_dir, device=a.device, as_json=a.json))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from convnet.core.errors import InputError
    from convnet.use.prediction import predict_inputs

    job = predict_inputs(a.run, a.inputs, top_k=a.top_k, min_confidence=a.min_confidence, layout=a.layout,
                         device=a.device, csv=a.csv, explain=a.explain, progress=True)
    if job.passed_over:
        n, shown = len(job.passed_over), ", ".join(map(str, job.passed_over[:3]))
        print(f"convnet: passed over {n} file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not an image: "
              f"{shown}{' …' if n > 3 else ''}", file=sys.stderr)
    rows_out = sys.stderr if a.json and a.csv is None else sys.stdout  # stdout stays JSON
    printed, width = 0, 0
    for item in job:
        if isinstance(item, InputError):
            print(f"convnet: error: {item}", file=sys.stderr)
            continue
        if a.csv is not None:
            continue
        width = max(width, *(len(r.input) for r in item))
        for row in item:
            if a.json:  # one JSON list, printed a row at a time
                json_text = json.dumps(row.to_json(), indent=2).replace("\n", "\n  ")
                print("[\n  " if not printed else ",\n  ", json_text, sep="", end="")
            else:
                others = row.top if row.unsure else row.top[1:]  # the rest of the --top-k classes, in order
                print(f"{row.input:<{width}}  {'-' if row.label is None else row.label}  {row.cls:<12}  "
                      f"{row.probability:.3f}" + "".join(f"   {c} {q:.3f}" for _, c, q in others))
            printed += 1
    if a.json and a.csv is None:
        print("\n]" if printed else "[]")
    if a.min_confidence is not None:
        print(f"{job.unsure:,} of {job.predicted:,} images unsure (most probable class below {a.min_confidence:g})",
              file=rows_out)
    if a.csv is not None:
        print(f"{job.predicted:,} images predicted, {job.unreadable} unreadable inputs; table in {a.csv}")
    if job.explained is not None:
        print(f"{job.explained:,} heat maps (integrated gradients, the predicted class) in {a.explain}", file=rows_out)
    if job.unreadable and len(job.files) > 1:  # one input: its own line said it all
        print(f"convnet: {job.unreadable} of {len(job.files)} inputs could not be read", file=sys.stderr)
    return 1 if job.unreadable else 0


def cmd_tutorial(a: argparse.Namespace) -> int:
    from convnet.tools.tutorial import run_tutorial

    run_tutorial(data_options(a, TUTORIAL), a.out, device=a.device or "auto", faithful=bool(a.faithful),
                 quick=a.quick, progress=a.progress)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from convnet.tools.bench import BenchResult, bench, format_bench, format_time_to_accuracy

    result = bench(data_options(a, BENCH), device=a.device or "auto", model=a.model, batch_size=a.batch_size,
                   train_images=a.train_images, repeats=a.repeats, target=a.target_accuracy, recipe=a.recipe,
                   seeds=a.runs, reference=not a.no_reference, precision=a.precision or "auto")
    if a.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_bench(result) if isinstance(result, BenchResult) else format_time_to_accuracy(result))
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from convnet.tools.searchspace import read_space
    from convnet.tools.tune import TuneRequest, run_tune

    space = read_space(a.space) if a.space is not None else {}
    for item in a.param:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip():
            raise ConvnetError(f"--param {item!r}: give NAME=SPEC, e.g. lr=0.01:0.5:log or model=fastnet,resnet20")
        space[name.strip()] = spec
    settings = {k: v for k, v in option_values(a, TUNE, TrainConfig).items() if v is not None}
    seed, val_split = settings.pop("seed", 42), settings.pop("val_split", 0.1)
    outcome = run_tune(TuneRequest(data=data_options(a, TUNE), recipe=a.recipe, space=space, settings=settings,
                                   trials=a.trials, timeout=a.timeout, storage=a.storage, study=a.study, out=a.out,
                                   val_split=val_split, seed=seed, report=a.report, device=a.device or "auto"))
    if a.json:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(outcome).items()}, indent=2))
        return 0
    print(f"study {outcome.study!r}: {outcome.finished} trials finished, {outcome.ran} run by this process")
    if outcome.best_trial is not None:
        print(f"best: trial {outcome.best_trial}, val accuracy {outcome.best_value:.4f}: "
              + " ".join(f"{k} {v}" for k, v in outcome.best_params.items()))
        if outcome.best_interval is not None:
            low, high, images = outcome.best_interval
            print(f"  95 % interval {low:.3f}-{high:.3f} on {images:,} validation images: trials closer than that "
                  "are not told apart (a larger --val-split narrows it)")
        print(f"recipe written to {outcome.recipe_path}: {outcome.train_command}")
    if outcome.report_path is not None:
        print(f"report written to {outcome.report_path}")
    return 0


def cmd_recipes(a: argparse.Namespace) -> int:
    from convnet.training.recipes import describe_recipes

    found = describe_recipes(a.file)
    if a.json:
        print(json.dumps({title: flags for title, flags in found}, indent=2))
        return 0
    for title, flags in found:
        print(title)
        for flag in flags:
            print(f"  {flag}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from convnet.models.names import list_models, model_name

    if a.speed:
        from convnet.tools.bench import model_speeds  # imported here: building and timing the models needs torch

        speeds = model_speeds(list_models())
    if a.json:
        rows = [{"model": name, "description": description, "parameters": model_name(name).parameters,  # type: ignore
                 **({"images_per_s": speeds[name]} if a.speed else {})} for name, description in list_models().items()]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12} {'parameters':>10}  " + (f"{'images/s':>9}  " if a.speed else "")
          + ("(parameters for 10 classes of 28x28 grey images" + ("; images/s predicting them on this machine's CPU)"
                                                                  if a.speed else ")")))
    for name, description in list_models().items():
        count = model_name(name).parameters  # type: ignore[union-attr]
        shown = f"{count:>10,}" if count is not None else f"{'?':>10}"
        speed = f"{speeds[name]:>9,.0f}  " if a.speed else ""
        print(f"{name:<12} {shown}  {speed}{description}", flush=True)
    return 0


def cmd_datasets(a: argparse.Namespace) -> int:
    from convnet.data.catalog import describe_datasets

    found = describe_datasets()
    if a.json:
        print(json.dumps(found, indent=2))
        return 0
    for d in found:
        print(f"{d['name']:<14} {d['height']}x{d['width']}, {d['channels']} channel{'s' if d['channels'] > 1 else ''}, "
              f"{d['classes']} classes, {d['train_images']:,} + {d['test_images']:,} images, "
              f"flips {'allowed' if d['hflip'] else 'not allowed'}")
        print(f"{'':<14} {d['where']}")
    print("Your own images: convnet train --data DIR (one subfolder per class)")
    return 0


def cmd_suggest(a: argparse.Namespace) -> int:
    from convnet.use.suggest import suggest

    found = suggest(a.run, a.pool, n=a.n, device=a.device, csv_out=a.csv, html_out=a.html,
                    progress=a.progress and not a.json, data_dir=a.data_dir)
    if a.json:
        print(json.dumps({"ranked": found.ranked, "already_labelled": found.already_labelled,
                          "suggestions": [s.to_json() for s in found.suggestions]}, indent=2))
        return 0
    width = max(len(s.item) for s in found.suggestions)
    print(f"{len(found.suggestions)} of {found.ranked:,} unlabelled images to label, the most useful first: the "
          "least sure, spread over the data, so a sure one may come early (score: how unsure, 1 - the gap between "
          "the two likeliest classes)" + (f"; {found.already_labelled:,} left out: the run's own labelled images"
                                          if found.already_labelled else ""))
    for s in found.suggestions:
        print(f"{s.rank:>5}  {s.item:<{width}}  looks like {s.predicted:<12} {s.probability:.3f}  score {s.score:.3f}")
    for what, path in (("table", a.csv), ("contact sheet", found.html)):
        if path is not None:
            print(f"{what} in {path}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "tutorial": cmd_tutorial,
            "models": cmd_models, "recipes": cmd_recipes, "datasets": cmd_datasets, "bench": cmd_bench,
            "report": cmd_report, "inspect": cmd_inspect, "compare": cmd_compare, "export": cmd_export,
            "serve": cmd_serve, "tune": cmd_tune, "suggest": cmd_suggest}
