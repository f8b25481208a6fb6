"""Hyperparameter search: ``convnet tune``, an Optuna study scored on a validation split.

Each trial trains with the base recipe (sized to the data as ``convnet train`` sizes it)
and the trial's values laid over it, on the training images less ``--val-split`` of them
(stratified, the seed's split: the same for every trial), and is scored by the validation
accuracy of its best epoch (the weights ``convnet train`` keeps). The test split is never
scored. The training loop's events report the validation accuracy to Optuna's median
pruner at every tenth of the trial's epochs (so that short and long schedules are compared
at the same point of their decay),
which stops the trials that fall behind; a trial whose loss diverges counts as pruned.

With ``storage`` (a SQLite file or any database URL Optuna takes) several processes, on one
machine or many, share one study: ``trials`` is the study's total (each process stops once
the study has that many finished trials, so it can end with one extra per process), and
``timeout`` bounds each process. The study's best trial is written as a recipe file
(:func:`convnet.training.config.recipe_text`), which ``convnet train --recipe FILE`` trains with.
"""

from __future__ import annotations

import html
import importlib.util
import io
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from convnet.core import htmlparts
from convnet.core.durable import atomic_write
from convnet.core.errors import ConvnetError, TrainingDiverged
from convnet.core.version import install_hint
from convnet.data.load import load_data
from convnet.data.options import DataOptions
from convnet.models.engine import make_engine, recipe_kind, resolve_device
from convnet.tools.searchspace import Param, default_space, parse_param
from convnet.training.config import TrainConfig, TrainRequest
from convnet.training.events import TrainEvents
from convnet.training.recipes import (
    DEFAULT_RECIPE,
    RECIPE_BASE,
    RECIPES,
    recipe,
    recipe_text,
    resolve_config,
    resolve_run,
    trained_images,
)
from convnet.training.run import hflip_of, train_command_line, train_run
from convnet.training.state import TrainState

INSTALL = install_hint("tune")
BEST = "best.toml"  # the best trial's recipe, in the output folder
REPORT = "report.html"
PRUNE_AFTER = 5  # trials finished before the median pruner stops any
PRUNE_FROM = 25  # nor before this share (%) of a trial's epochs is done
STORAGE_TRIES = 8  # to open a storage that another process may be creating at the same moment
SCHEMA_RACE = ("already exists", "unique constraint failed", "duplicate key", "duplicate entry", "database is locked")


@dataclass
class TuneRequest:
    """Everything ``convnet tune`` is asked to do (see the module's docstring).

    Attributes:
        space: settings and their search, laid over the default space (:func:`parse_param`).
        settings: settings fixed for every trial (``convnet tune --model seed``), as
            ``--param model=seed`` fixes them; given in only one of the two. ``epochs``
            here is single passes, as ``convnet train --epochs`` (``--param epochs`` sized).
        trials: the study's total of finished (complete or pruned) trials.
        timeout: seconds this process may search (None: no bound).
        storage: Optuna's storage URL; None: an in-memory study.
        study: the study's name; None: the data's name and the recipe's.
        out: where the best recipe (and the report) go; None: ``tune/STUDY``.
        report: also write an HTML page of the study.
        seed: the seed of every trial's training (weights, order, split) and, without
            storage, of the sampler.
    """

    data: DataOptions = field(default_factory=DataOptions)
    recipe: str | None = None
    space: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    trials: int = 20
    timeout: float | None = None
    storage: str | None = None
    study: str | None = None
    out: Path | None = None
    val_split: float = 0.1
    seed: int = 42
    report: bool = False
    device: str = "auto"


@dataclass
class TuneOutcome:
    study: str
    finished: int  # the study's finished trials
    ran: int  # trials this process ran
    best_value: float | None
    best_trial: int | None
    best_params: dict[str, Any]
    recipe_path: Path | None
    report_path: Path | None
    best_interval: tuple[float, float, int] | None = None  # 95 % interval of best_value, and the images scored
    train_command: str | None = None  # the `convnet train` that trains the best recipe on the search's data


class Pruning(TrainEvents):
    """Reports the validation accuracy to the trial at every tenth of its epochs (step 10,
    20, ... 100: the share done, the same steps for every schedule) and, when Optuna's
    pruner says so, stops the training after this epoch (``pruned``: the caller tells
    Optuna)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None
        self.reported = 0  # the last step reported

    def on_epoch_end(self, state: TrainState) -> None:
        record = state.history[-1]
        if record.val_accuracy is None:  # not a checked epoch (--val-every): its tenths go with the next check
            return
        for step in range(self.reported + 10, 100 * record.epoch // state.config.epochs + 1, 10):
            self.trial.report(record.val_accuracy, step)
            self.reported = step
        if self.trial.should_prune():
            self.pruned_at = record.epoch
            state.stop = True


def check_request(request: TuneRequest) -> tuple[TrainConfig, str, dict[str, Param]]:
    """Every check before any data is read: Optuna installed, the split, the trials, the
    recipe and the space. Returns the base config, its name and the space."""
    if importlib.util.find_spec("optuna") is None:
        raise ConvnetError(f"convnet tune needs Optuna, which is not installed: {INSTALL}")
    if not 0 < request.val_split < 1:
        raise ConvnetError(f"--val-split must be in (0, 1) for tune: trials are scored on it, never on the test "
                           f"split; got {request.val_split:g}")
    if request.trials < 0:
        raise ConvnetError(f"--trials must be at least 0, got {request.trials}")
    if request.timeout is not None and not request.timeout > 0:
        raise ConvnetError(f"--timeout must be a positive number of seconds, got {request.timeout:g}")
    if request.study is not None and request.storage is None:
        raise ConvnetError("--study names a study kept in --storage; give --storage too (an in-memory study "
                           "has no name to share)")
    device = resolve_device(request.device)
    kind = recipe_kind(device, request.settings.get("precision") or "auto")
    name = request.recipe or DEFAULT_RECIPE[kind]
    base = recipe(name)
    both = sorted(set(request.settings) & set(request.space))
    if both:
        raise ConvnetError(f"--{both[0].replace('_', '-')} fixes the setting that --param {both[0]}=... searches; "
                           "give one")
    space = default_space(base) | {k: parse_param(k, v) for k, v in request.space.items()} | {
        k: Param(k, "fixed", choices=(v,)) for k, v in request.settings.items()}  # a flag fixes its setting
    for p in space.values():  # each value a trial can draw, with the recipe's others: a bad one named now
        for value in p.choices if p.kind in ("fixed", "choice") else (p.low, p.high):
            try:
                trial_config(name, {p.name: value}, request, None)
            except ConvnetError as e:
                raise ConvnetError(f"--param {p.name}: {value!r} cannot be trained: {e}") from None
    return base, name, space


def trial_config(base_name: str, values: dict[str, Any], request: TuneRequest,
                 train_images: int | None) -> TrainConfig:
    """The config a trial trains with: the base recipe with the trial's values laid over
    it, sized to the data (when ``train_images`` is known) as ``convnet train --recipe
    FILE`` sizes a recipe file's: the one resolution every run goes through
    (:func:`~convnet.training.recipes.resolve_run`). ``--epochs N`` given to the search
    means what it means to ``convnet train``: N single passes, not sized; a searched or
    ``--param`` epochs is the recipe's, sized (with ``--unlabeled``, times
    :data:`~convnet.training.recipes.POOL_EPOCHS`, as ``convnet train`` trains a pool run)."""
    trained = trained_images(train_images, request.val_split) if train_images is not None else None
    passes = {"epochs": request.settings["epochs"]} if "epochs" in request.settings else {}  # as train's --epochs
    return resolve_run(trial_recipe(base_name, values, request),
                       {"seed": request.seed, "val_split": request.val_split, **passes},
                       hflip=hflip_of(request.data), train_images=trained,
                       pool=request.data.unlabeled is not None)[0]  # with a pool, as many epochs as train gives it


def trial_recipe(base_name: str, values: dict[str, Any], request: TuneRequest) -> TrainConfig:
    """A trial's recipe, as the recipe file of the best trial holds it: the base recipe with
    the trial's values laid over it (a shorter schedule keeping its warm-up within it)."""
    trial = resolve_config(base_name, values, hflip=hflip_of(request.data))
    return replace(trial, warmup_epochs=min(trial.warmup_epochs, trial.epochs))


def run_tune(request: TuneRequest, *, stream: TextIO | None = None) -> TuneOutcome:
    """Search as ``request`` says (see the module's docstring).

    Raises:
        ConvnetError: a bad setting or input, named, before any data is read.
    """
    out_stream = stream or sys.stdout
    base, base_name, space = check_request(request)
    request.data.validate()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial, ours
    data_name = Path(request.data.folder).name if request.data.folder else request.data.name
    study_name = request.study or f"{data_name}-{base_name if base_name in RECIPES else Path(base_name).stem}"
    out = request.out or Path("tune") / study_name
    described = {"recipe": base_name, "data": data_name, "subset": request.data.subset,
                 "val_split": request.val_split, "seed": request.seed,
                 "space": {k: p.describe() for k, p in space.items()}}
    sampler = optuna.samplers.TPESampler(seed=request.seed if request.storage is None else None)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER, n_warmup_steps=PRUNE_FROM)
    for attempt in range(1, STORAGE_TRIES + 1):
        try:
            study = optuna.create_study(study_name=study_name, storage=request.storage, direction="maximize",
                                        sampler=sampler, pruner=pruner, load_if_exists=True)
            break
        except Exception as e:  # Optuna's, SQLAlchemy's and the driver's errors: all mean "cannot use this storage"
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if attempt == STORAGE_TRIES or not any(m in message.lower() for m in SCHEMA_RACE):
                raise ConvnetError(f"--storage {request.storage}: cannot open the study ({message[:300]})") from None
            # processes started together on a new storage: the first makes its tables, the others fail on
            # the half-made schema (Optuna makes it in whichever process comes first); a moment later it is whole
            time.sleep(0.2 * attempt + random.random() * 0.3)
    kept = study.user_attrs.get("search")
    if kept is None:
        study.set_user_attr("search", described)
    elif kept != described:
        raise ConvnetError(f"study {study_name!r} searches {kept}; this process would search {described}: give "
                           "the same data, recipe and space, or another --study")

    def finished() -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    dataset = load_data(request.data, seed=request.seed, progress=False) if finished() < request.trials else None
    device = resolve_device(request.device)
    ran = 0
    worker = f"{socket.gethostname()}:{os.getpid()}"

    guard = _Interrupt()

    def objective(trial: Any) -> float:
        with guard.training():
            return run_trial(trial)

    def run_trial(trial: Any) -> float:
        nonlocal ran
        assert dataset is not None
        ran += 1
        trial.set_user_attr("process", worker)
        trial.set_user_attr("val_images", math.ceil(request.val_split * len(dataset.train)))
        values = {k: p.suggest(trial) for k, p in space.items()}
        config = trial_config(base_name, values, request, len(dataset.train))
        start = time.perf_counter()
        pruning = Pruning(trial)
        try:
            trial_engine = make_engine(device, precision=config.precision)  # the trial's --precision
            result = train_run(TrainRequest(settings=config, data=dataset), engine=trial_engine,
                               events=[pruning]).result
        except TrainingDiverged as e:  # as bad as a trial gets: counted with the pruned ones
            print(f"trial {trial.number}: {e}  {_values(values)}", file=out_stream, flush=True)
            raise optuna.TrialPruned() from None
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at_epoch", pruning.pruned_at)
            print(f"trial {trial.number}: pruned after epoch {pruning.pruned_at} of {config.epochs}  "
                  f"{time.perf_counter() - start:.0f} s  {_values(values)}", file=out_stream, flush=True)
            raise optuna.TrialPruned()
        # the validation accuracy of the epoch the run keeps: the best, as `convnet train` keeps it
        accuracy = float(result.best["val_accuracy"] if result.best else result.history[-1].val_accuracy or 0.0)
        best = max([accuracy, *(t.value for t in study.get_trials(deepcopy=False)
                                if t.value is not None and t.number != trial.number)])
        print(f"trial {trial.number}: val accuracy {accuracy:.4f}  {time.perf_counter() - start:.0f} s  "
              f"{_values(values)}  (best so far {best:.4f})", file=out_stream, flush=True)
        return accuracy

    if dataset is not None:
        print(f"tune: study {study_name!r}, {finished()} of {request.trials} trials finished; {len(dataset.train):,} "
              f"{dataset.name} images, {request.val_split:g} held out for scoring", file=out_stream, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        stop = optuna.study.MaxTrialsCallback(request.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                      optuna.trial.TrialState.PRUNED))
    # Ctrl-C and SIGTERM (a scheduler, `kill`; and a background job, which ignores Ctrl-C) end the search
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, guard.handle) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:  # Ctrl-C, SIGTERM or an error: the best recipe so far is written all the same
        if dataset is not None:
            study.optimize(objective, timeout=request.timeout, callbacks=[stop, guard.stop_study])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        outcome = _finish(study, request, out, base, base_name, finished(), ran)
    if guard.signalled:
        raise KeyboardInterrupt
    return outcome


class _Interrupt:
    """Ctrl-C and SIGTERM during a search. A trial being trained is interrupted at once (Optuna records it
    as failed); at any other moment, e.g. while Optuna writes a finished trial to its storage, an exception
    would leave the study half-written, so the search ends after that step instead."""

    def __init__(self) -> None:
        self.signalled = False
        self.inside = False

    @contextmanager
    def training(self) -> Iterator[None]:
        if self.signalled:  # the signal came between two trials: this one never starts
            raise KeyboardInterrupt
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def handle(self, signum: int, frame: object) -> None:
        self.signalled = True
        if self.inside:
            raise KeyboardInterrupt

    def stop_study(self, study: Any, trial: Any) -> None:
        if self.signalled:
            study.stop()


def _values(values: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def _finish(study: Any, request: TuneRequest, out: Path, base: TrainConfig, base_name: str, finished: int,
            ran: int) -> TuneOutcome:
    """The best trial's recipe (and the report) written into ``out``."""
    complete = [t for t in study.trials if t.value is not None]
    best = max(complete, key=lambda t: t.value) if complete else None
    interval = accuracy_interval(best.value, best.user_attrs.get("val_images")) if best else None
    recipe_path = report_path = None
    if best is not None or request.report:
        out.mkdir(parents=True, exist_ok=True)
    if best is not None:
        config = trial_recipe(base_name, dict(best.params), request)
        comment = (f"convnet recipe: the best of {finished} trials of study {study.study_name!r} (trial "
                   f"{best.number}),\nvalidation accuracy {best.value:.4f} on --val-split {request.val_split:g}, "
                   f"--seed {request.seed}" + (f"\n(95 % interval {interval[0]:.3f}-{interval[1]:.3f} on "
                                               f"{interval[2]:,} images)" if interval else "")
                   + (f"\nits trials trained {config.epochs} single pass{'es' if config.epochs > 1 else ''} (--epochs "
                      f"{config.epochs}): give convnet train --epochs {config.epochs} too to train as they did"
                      if "epochs" in request.settings else ""))
        text = recipe_text(config, comment, base=base_name if base_name in RECIPES else RECIPE_BASE).encode()
        recipe_path = out / BEST
        atomic_write(recipe_path, lambda f: f.write(text))
    if request.report:
        page = study_html(study, best.number if best else None).encode()
        report_path = out / REPORT
        atomic_write(report_path, lambda f: f.write(page))
    return TuneOutcome(study.study_name, finished, ran, best.value if best else None, best.number if best else None,
                       dict(best.params) if best else {}, recipe_path, report_path, interval,
                       train_command(request, recipe_path) if recipe_path is not None else None)


def train_command(request: TuneRequest, recipe: Path) -> str:
    """The ``convnet train`` command that trains ``recipe`` on the data the search was
    scored on, as its trials trained: the same data flags, seed and ``--epochs``."""
    d = request.data
    return train_command_line({"recipe": recipe, "folder": d.folder, "dataset": d.dataset, "data_dir": d.data_dir,
                               "subset": d.subset, "unlabeled": d.unlabeled,
                               "image_size": f"{d.image_size[0]}x{d.image_size[1]}" if d.image_size else None,
                               "channels": d.channels, "epochs": request.settings.get("epochs"),
                               "seed": request.seed if request.seed != TrainConfig().seed else None})


def accuracy_interval(accuracy: float | None, images: int | None) -> tuple[float, float, int] | None:
    """Wilson's 95 % interval of an accuracy scored on ``images`` images, and ``images``
    (None when either is unknown): how far apart two trials must be to be told apart."""
    if accuracy is None or not images:
        return None
    from scipy.stats import binomtest

    interval = binomtest(round(accuracy * images), images).proportion_ci(0.95, method="wilson")
    return float(interval.low), float(interval.high), images


def study_html(study: Any, best: int | None) -> str:
    """An HTML page of the study: its trials, and Optuna's optimisation history and
    parameter importances (matplotlib), embedded."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from matplotlib import pyplot as plt

    def picture(draw: Any, alt: str) -> str:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw(study)
        except (ValueError, RuntimeError) as e:  # e.g. importances need two finished trials
            return f"<p>{html.escape(alt)}: {html.escape(str(e))}</p>"
        buffer = io.BytesIO()
        axes.figure.set_size_inches(8, 4.5)
        axes.figure.tight_layout()
        axes.figure.savefig(buffer, format="png", dpi=110)
        plt.close(axes.figure)
        return htmlparts.img(buffer.getvalue(), alt)

    names = sorted({k for t in study.trials for k in t.params})
    rows = [[t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}",
             *(_cell(t.params.get(k)) for k in names),
             "" if t.datetime_complete is None or t.datetime_start is None
             else f"{(t.datetime_complete - t.datetime_start).total_seconds():.0f}", t.user_attrs.get("process", "")]
            for t in study.trials]
    title = html.escape(f"convnet tune: study {study.study_name}")
    return "".join([
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>',
        f"<style>{htmlparts.CSS}</style></head><body><h1>{title}</h1>",
        f"<p>{len(study.trials)} trials; best: trial {best}.</p>" if best is not None else "<p>No finished trial.</p>",
        picture(optuna.visualization.matplotlib.plot_optimization_history, "optimisation history"),
        picture(optuna.visualization.matplotlib.plot_param_importances, "parameter importances"),
        htmlparts.table(["trial", "state", "val accuracy", *names, "seconds", "process"], rows),
        "</body></html>\n",
    ])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)

