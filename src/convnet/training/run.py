"""One training run, from a request to a trained model: the one path that trains.

:func:`train_run` resolves the config (recipe, settings given, data, weights), checks
everything before anything is read or written, reads the data, makes the run folder when
asked for one, and trains with the one loop (:func:`convnet.training.loop.train`). ``convnet
train``, the estimator's ``fit``, ``convnet tune``'s trials, the tutorial and ``convnet
inspect --train-folds`` all train through it; scoring the result is for the caller.
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from convnet.core import runfolder
from convnet.core.errors import ConvnetError, RunComplete, RunError
from convnet.core.options import declared
from convnet.data.catalog import DATASETS
from convnet.data.dataset import Dataset
from convnet.data.load import load_data, run_data
from convnet.data.options import DataOptions
from convnet.models.engine import Engine, cpu_info, make_engine, recipe_kind, resolve_device
from convnet.models.pretrained import fit_weights, model_of, open_source, spec_for
from convnet.training.config import TrainConfig, TrainRequest, check_config
from convnet.training.distributed import DistributedInfo
from convnet.training.events import ConsolePrinter, TrainEvents
from convnet.training.loop import TrainResult, train
from convnet.training.recipes import DEFAULT_RECIPE, DEFAULT_WHERE, resolve_run
from convnet.training.tracking import Tracker, check_log, connect, resume_tracking, start


@dataclass
class TrainedRun:
    """What :func:`train_run` trained.

    Attributes:
        result: the model, its history, the run folder (None: none written), the config.
        dataset: the data it was trained on (its test split not scored).
        engine: the device and arithmetic it trained with.
        tracker: the trackers it reports to (``--log``), still open for the final scores;
            None without.
    """

    result: TrainResult
    dataset: Dataset
    engine: Engine
    tracker: Tracker | None = None

    @property
    def config(self) -> TrainConfig:
        return self.result.config

    @property
    def run_dir(self) -> Path | None:
        return self.result.run_dir


def train_run(request: TrainRequest, *, write: bool = False, events: Sequence[TrainEvents | None] = (),
              engine: Engine | None = None, init: Mapping[str, torch.Tensor] | None = None,
              stream: TextIO | None = None, distributed: DistributedInfo | None = None,
              tensorboard_root: Path | None = None) -> TrainedRun:
    """Train as ``request`` says.

    Args:
        request: the settings, data, weights, device and output (see :class:`TrainRequest`).
        write: write a run folder (``request.out``, else ``runs/MODEL-OPTIMIZER-TIME``);
            False: only when ``request.out`` names one. Under torchrun only the first
            process writes.
        events: loop events besides those the request implies (printing, stopping at a
            target accuracy, tracking), called first.
        engine: the engine to train with (default: ``request.device``'s).
        init: starting weights (a state dict of the config's model), e.g. an estimator's
            warm start; not with ``request.init_from``.
        stream: where the run's lines are printed (its data, sizing and epochs); None: silent.
        distributed: this process's place under torchrun.
        tensorboard_root: the folder of TensorBoard runs when no run folder is written.

    Raises:
        ConvnetError: a bad setting or input, named, before anything is read or written.
    """
    if request.resume is not None:
        return _resume(request, events, engine, stream, distributed)
    rank, world = (distributed.rank, distributed.world_size) if distributed else (0, 1)
    device = engine.device if engine is not None else resolve_device(request.device)
    if distributed is not None and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)  # one GPU per process
    main = rank == 0
    # every check before anything is read or written
    if init is not None and request.init_from is not None:
        raise ConvnetError("init (starting weights) and --init-from cannot be combined: give one")
    source = open_source(request.init_from) if request.init_from is not None else None
    settings = request.settings
    given = {} if isinstance(settings, TrainConfig) else {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConvnetError(f"unknown setting {', '.join(unknown)}; `convnet recipes` lists them")
    if source is not None:
        given["model"] = model_of(source, given.get("model"))  # the source's

    kind = engine.recipe_kind if engine is not None else recipe_kind(device, given.get("precision", "auto"))

    def plan(train_images: int | None, pool: bool = False) -> tuple[TrainConfig, str]:
        if isinstance(settings, TrainConfig):  # a whole config, trained as it is
            check_config(settings, from_weights=source is not None or init is not None)
            return settings, ""
        return resolve_run(request.recipe, given, kind=kind, hflip=hflip_of(request.data),
                           from_weights=source is not None or init is not None, train_images=train_images, pool=pool)

    planned, _ = plan(None)
    if isinstance(request.data, DataOptions):
        request.data.validate()
        unlabeled = request.data.unlabeled
    else:  # a data set given whole: its pool is known before anything is read
        unlabeled = pool_name(request.data.pool_record) if request.data.pool is not None else None
    if planned.faithful and unlabeled is not None:
        raise ConvnetError("--faithful trains on the tutorial's labelled images alone; it cannot be combined "
                           f"with --unlabeled {unlabeled}")
    out = request.out if request.out is not None or not write else "new"
    if out not in (None, "new"):
        runfolder.check_out(out)
    trackers = check_log(request.log, request.mlflow_uri)
    connection = connect(trackers, request.mlflow_uri, request.mlflow_experiment) if trackers and main else None

    # the data, then the config sized to it and the weights fitted to it
    dataset = load_data(request.data, seed=planned.seed, progress=request.progress and main and stream is not None) \
        if isinstance(request.data, DataOptions) else request.data
    # validation: the data's own split, or held out of the training images; sized to the images trained on
    default_share = not isinstance(settings, TrainConfig) and "val_split" not in given
    watched = bool(planned.patience or planned.target_accuracy or planned.calibrate)  # these need validation
    dataset, validation = dataset.held_out(planned.val_split, planned.seed, adapt=default_share, watched=watched)
    if dataset.val is None and planned.val_split:  # too few images to hold any out: the run has no validation
        given["val_split"] = 0.0
    if dataset.pool is not None and not isinstance(settings, TrainConfig):
        given.setdefault("label_smoothing", 0.0)  # smoothed targets cap the teacher's confidence below THRESHOLD
    config, sizing = plan(len(dataset.train), pool=dataset.pool is not None)
    if source is not None:  # the normalization the weights were trained with (a hub model's)
        dataset = replace(dataset, spec=spec_for(source, dataset.spec))
    init_record = None
    if source is not None:
        init, init_record = fit_weights(source, config.model, dataset.spec, config.seed)
    engine = replace(engine or make_engine(device, faithful=config.faithful, precision=config.precision), rank=rank,
                     world_size=world)

    run_dir = None
    if out is not None and main:
        run_dir = runfolder.new_run_dir(None if out == "new" else out, f"{config.model}-{config.optimizer}")
        runfolder.write_data_files(run_dir, dataset.files, dataset.skipped)
    say = (lambda line: print(line, file=stream, flush=True)) if stream is not None and main else (lambda line: None)
    for note in dataset.notes:
        say(f"convnet: {note}")
    c, h, w = dataset.image_shape
    procs = f" x {world} processes" if world > 1 else ""
    folder = f"; run folder {run_dir}" if run_dir is not None else ""
    say(arithmetic_line(request.recipe if isinstance(request.recipe, str) else None, config, engine))
    what = {"folder": f"images of {dataset.source}", "arrays": "images given as arrays"}.get(
        dataset.name, f"{dataset.name} images")  # "54,000 fashion-mnist images", "864 images of /home/me/photos"
    say(f"training {config.model} on {len(dataset.train):,} {what} ({c}x{h}x{w}), "
        f"{engine.device}{procs}{folder}")
    if isinstance(request.data, DataOptions) and request.data.folder is not None and request.data.hflip is None \
            and config.flips:  # a folder can be read two ways: say which
        say("convnet: mirrored images are trained on and predicted with, as suits photos of things; if a mirror "
            "changes an image's class (digits, letters), pass --no-hflip")
    if init_record is not None:
        say(f"starting from {init_record['source']} ({'; '.join(init_record['changes']) or 'every weight kept'})")
    if dataset.val is not None and config.val_every > 1 and config.epochs > 1:
        validation += f"; scored every {config.val_every} epochs and after the last (--val-every)"
    say(validation)
    if dataset.pool is not None:
        say(f"unlabelled: {len(dataset.pool):,} images ({pool_name(dataset.pool_record)}), learnt from where the "
            "teacher is sure of them")
    if sizing:
        say(sizing)
    imbalance = imbalance_warning(dataset, config)
    if imbalance:
        say(f"convnet: {imbalance}")

    tracker = None
    if connection is not None:
        name = run_dir.name if run_dir is not None else \
            f"{config.model}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        tracker = start(connection, run_dir, name, config, data_record(dataset),
                        tensorboard_dir=None if run_dir is not None else Path(tensorboard_root or "tensorboard") / name)
    printer = ConsolePrinter(stream, progress=request.progress) if stream is not None and main else None
    result = tracked(tracker, lambda: train(config, dataset.train, dataset.spec, val=dataset.val, pool=dataset.pool,
                                            engine=engine, events=[*events, printer, tracker], run_dir=run_dir,
                                            data_record=data_record(dataset), init=init, init_record=init_record))
    return TrainedRun(result, dataset, engine, tracker)


def _resume(request: TrainRequest, events: Sequence[TrainEvents | None], engine: Engine | None,
            stream: TextIO | None, distributed: DistributedInfo | None) -> TrainedRun:
    """Continue ``request.resume`` from its last complete epoch, with its own config and data."""
    check_resume(request)
    assert request.resume is not None
    run = runfolder.open_run(request.resume)
    if not (run.path / runfolder.CHECKPOINT).is_file():
        raise RunError(f"{run.path}: no checkpoint yet (it stopped before its first epoch ended); start it again")
    config = TrainConfig.from_dict(run.config["train"])
    rank, world = (distributed.rank, distributed.world_size) if distributed else (0, 1)
    device = resolve_device(request.device)
    if distributed is not None and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)
    precision, note = resumed_precision(run, device)
    engine = replace(engine or make_engine(device, faithful=config.faithful, precision=precision), rank=rank,
                     world_size=world)
    if note and stream is not None and rank == 0:
        print(f"convnet: {note}", file=stream, flush=True)
    tracker = resume_tracking(run.path) if rank == 0 else None  # as the run recorded
    data_dir = request.data.data_dir if isinstance(request.data, DataOptions) else None
    dataset = run_data(run, data_dir, progress=request.progress and rank == 0 and stream is not None, pool=True)
    dataset, _ = dataset.held_out(config.val_split, config.seed)  # the validation split it had
    printer = ConsolePrinter(stream, progress=request.progress) if stream is not None and rank == 0 else None
    try:
        result = tracked(tracker, lambda: train(config, dataset.train, dataset.spec, val=dataset.val,
                                                pool=dataset.pool, engine=engine, events=[*events, printer, tracker],
                                                run_dir=run.path, resume=True))
    except RunComplete as e:  # the new run it points to trains on this run's data
        raise RunComplete(e.done, e.run, init_from_command(run)) from None
    return TrainedRun(result, dataset, engine, tracker)


def arithmetic_line(recipe_name: str | None, config: TrainConfig, engine: Engine) -> str:
    """One line: the recipe a run takes and the arithmetic it trains in, and why."""
    kind = engine.recipe_kind
    name = recipe_name or ("tutorial" if config.faithful else DEFAULT_RECIPE[kind])
    which = f"recipe {name}" + ("" if recipe_name or config.faithful else f" (the default {DEFAULT_WHERE[kind]})")
    if config.faithful:
        return f"{which}, the tutorial's arithmetic: fp32 (--faithful)"
    if engine.device.type != "cpu":
        return f"{which}, training in {'bf16' if engine.autocast else 'fp32'}"
    flags = " ".join(str(f) for f in cpu_info()["flags"]) or "unknown"  # type: ignore[attr-defined]
    if config.precision != "auto":
        return f"{which}, training in {config.precision} (--precision {config.precision}; CPU flags {flags})"
    if engine.autocast is not None:
        return f"{which}, training in bf16: this CPU computes bfloat16 natively (CPU flags {flags})"
    return (f"{which}, training in fp32: this CPU has no native bfloat16 (no AVX512-BF16 or AMX; CPU flags "
            f"{flags})")


def resumed_precision(run: runfolder.Run, device: torch.device) -> tuple[str, str]:
    """The arithmetic a resumed run continues in, and a line to say when it is not the one
    it trained in: the recorded one (bit for bit on a machine of the same kind), except
    bfloat16 on a CPU that does not compute it natively, which continues in fp32."""
    engine = run.config.get("engine")
    if not isinstance(engine, dict) or "autocast" not in engine:  # not recorded: as this machine trains
        return "auto", ""
    precision = "bf16" if engine["autocast"] == "bfloat16" else "fp32"
    if precision == "bf16" and device.type == "cpu" and Engine.fast(device).autocast is None:
        return "fp32", (f"{run.path} trained in bfloat16 on a CPU that computes it natively; this one does not "
                        "(no AVX512-BF16 or AMX), so it continues in fp32: the same run, not bit for bit")
    return precision, ""


def tracked(tracker: Tracker | None, training: Any) -> Any:
    """``training()`` (or the scoring after it), with the trackers told how it ended if
    it does not finish."""
    try:
        return training()
    except RunComplete:  # nothing was trained: the trackers keep the run as it ended
        raise
    except BaseException as e:
        if tracker is not None:
            tracker.fail(interrupted=isinstance(e, KeyboardInterrupt))
        raise


def check_resume(request: TrainRequest) -> None:
    """A resumed run continues with its own recorded settings and data: a setting given
    beside ``--resume`` would be silently ignored, so it is refused, named."""
    settings = request.settings if isinstance(request.settings, dict) else {}
    given = [k for k, v in settings.items() if v is not None]
    given += [name for name, value in (("recipe", request.recipe), ("out", request.out),
                                       ("init_from", request.init_from), ("log", request.log or None),
                                       ("mlflow_uri", request.mlflow_uri))
              if value is not None]  # a resumed run continues the trackers it recorded
    if isinstance(request.data, DataOptions):
        default = DataOptions()
        given += [f.name for f in fields(DataOptions) if f.name != "data_dir"
                  and getattr(request.data, f.name) != getattr(default, f.name)]
    if given:
        flag = {"folder": "data", "memory_budget_mb": "memory_budget"}  # the flags of the other fields
        flags = ", ".join("--" + flag.get(name, name).replace("_", "-") for name in given)
        raise ConvnetError(f"--resume continues a run with the settings and data it recorded; leave out {flags} "
                           "(to train differently, start a new run)")


IMBALANCE = 5  # the largest class's images over the smallest's from which `convnet train` warns


def imbalance_warning(dataset: Dataset, config: TrainConfig) -> str | None:
    """One line when the largest class of the training split has :data:`IMBALANCE` times
    the images of the smallest and neither remedy is asked for; None otherwise."""
    if config.class_weight != "none" or config.sampler != "passes" or len(dataset.train) == 0:
        return None
    counts = torch.bincount(dataset.train.labels.cpu(), minlength=dataset.num_classes)
    present = counts[counts > 0]
    big, small = int(counts.argmax()), int(torch.where(counts > 0, counts, counts.max() + 1).argmin())
    if len(present) < 2 or counts[big] < IMBALANCE * counts[small]:
        return None
    return (f"imbalanced classes: {dataset.classes[big]!r} has {int(counts[big]):,} training images, "
            f"{dataset.classes[small]!r} {int(counts[small]):,} ({float(counts[big] / counts[small]):.0f}x); "
            "--class-weight balanced or --sampler balanced gives the small classes more weight")


def hflip_of(data: DataOptions | Dataset) -> bool:
    """Whether the data allows mirrored images, known before it is read."""
    if isinstance(data, Dataset):
        return data.spec.hflip
    if data.hflip is not None:
        return data.hflip
    return True if data.folder is not None else DATASETS[data.name].hflip if data.name in DATASETS else True


def train_command_line(given: Mapping[str, object]) -> str:
    """The ``convnet train`` command line of the settings ``given`` by option name, in order, each as the flag its
    option declares (None: left out)."""
    flag = {o.name: o.flag_name for o in declared(DataOptions, TrainConfig, TrainRequest)}
    return shlex.join(["convnet", "train", *(a for name, value in given.items() if value is not None
                                             for a in (flag[name], str(value)))])


def init_from_command(run: runfolder.Run) -> str:
    """The ``convnet train`` command that starts a new run from ``run``'s weights on the data it was trained on (a
    folder's path, a named data set, its subset and the seed of its draw); a run of arrays (the estimator's) names
    no data."""
    data = run.config.get("data", {})
    name, seed = data.get("name"), run.config.get("train", {}).get("seed", TrainConfig().seed)
    return train_command_line({
        "folder": data.get("source") if name == "folder" else None,
        "dataset": name if name in DATASETS else None,
        "subset": data.get("subset") or None,
        "seed": seed if data.get("subset") and seed != TrainConfig().seed else None,  # the same stratified draw
        "init_from": run.path})


def data_record(dataset: Dataset) -> dict[str, Any]:
    """What ``config.json`` keeps of the data: enough to read the same images again."""
    val = {"val_images": len(dataset.val)} if dataset.val is not None else {}
    pool = {"pool": dataset.pool_record or {"images": len(dataset.pool)}} if dataset.pool is not None else {}
    return {"name": dataset.name, "source": dataset.source, "subset": dataset.subset,
            "train_images": len(dataset.train), **val, "test_images": len(dataset.test), **pool, **dataset.origin}


def pool_name(record: dict[str, Any] | None) -> str:
    """Where a run's unlabelled images come from, in words."""
    source = (record or {}).get("source")
    return "the training images --subset leaves out" if source == "rest" else str(source) if source else "given"


def resume(run_dir: str | Path, *, engine: Engine | None = None, events: Sequence[TrainEvents | None] = (),
           data_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Continue a run folder from its last complete epoch, with the run's own config and
    data (read from ``data_dir`` if it moved); the same, bit for bit on the CPU, as if it
    had never stopped.

    Raises:
        RunError: not a run folder, or no checkpoint in it yet.
    """
    data = DataOptions(data_dir=str(data_dir) if data_dir is not None else None)
    request = TrainRequest(data=data, resume=Path(run_dir), progress=progress)
    return train_run(request, engine=engine, events=list(events or ())).result
