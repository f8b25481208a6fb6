"""One training run from settings to a scored run folder: what ``convnet train`` does, as
one Python call (:func:`run_training`).

The order matters for a user's files: every setting and input is checked first (config,
data options, the output folder), then the data is read, then the run folder is made,
trained into and scored. A command rejected at any check leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from convnet import runs
from convnet.catalog import DATASETS
from convnet.config import CALIBRATION_SPLIT, TrainConfig, fine_tune_defaults, resolve_config, size_to_data
from convnet.data import DataOptions, load_data
from convnet.datatypes import Dataset
from convnet.distributed import DistributedInfo, finish, init_distributed
from convnet.durable import atomic_write, write_json
from convnet.engine import make_engine, resolve_device, single_process
from convnet.errors import ConvnetError
from convnet.evaluation import Evaluation
from convnet.events import ConsolePrinter, StopAtAccuracy
from convnet.loadrun import load_run
from convnet.pretrained import Source, fit, model_of, open_source, spec_for
from convnet.report import write_plots
from convnet.scoring import evaluate_run
from convnet.tracking import EXPERIMENT, Tracker, check_log, connect, resume_tracking, start
from convnet.training import TrainResult, resume, train


@dataclass
class TrainRequest:
    """Everything ``convnet train`` is asked to do.

    Attributes:
        overrides: training settings given explicitly (TrainConfig field names); they
            are laid over the recipe's.
        data: which data, and how to read it.
        recipe: a named recipe; None: the device's default (the tutorial's with ``faithful``).
        faithful: the tutorial's exact arithmetic.
        device: ``auto``, ``cpu`` or ``cuda``.
        out: the run folder; None: ``runs/MODEL-OPTIMIZER-TIME``.
        resume: continue this run folder instead of starting a new one.
        progress: live bars in a terminal.
        init_from: start from these weights (a run folder or a ``.safetensors`` file,
            see :mod:`convnet.pretrained`) instead of fresh ones.
        log: trackers to send the run to (``tensorboard``, ``mlflow``: :mod:`convnet.tracking`).
        mlflow_uri: where MLflow keeps runs (None: MLflow's default, which its
            ``MLFLOW_TRACKING_URI`` sets).
        mlflow_experiment: the MLflow experiment the run goes into.
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    data: DataOptions = field(default_factory=DataOptions)
    recipe: str | None = None
    faithful: bool = False
    device: str = "auto"
    out: Path | None = None
    resume: Path | None = None
    progress: bool = True
    init_from: str | None = None
    log: tuple[str, ...] = ()
    mlflow_uri: str | None = None
    mlflow_experiment: str = EXPERIMENT


@dataclass
class TrainOutcome:
    result: TrainResult
    evaluation: Evaluation | None  # None in the processes other than rank 0


def run_training(request: TrainRequest, *, env: dict[str, str] | None = None,
                 stream: TextIO | None = None) -> TrainOutcome:
    """Train as ``request`` says, in this process or as one of several under torchrun
    (``env`` holds torchrun's variables), and score the result on both splits.

    Raises:
        ConvnetError: a bad setting or input, named, before anything is written.
    """
    out = stream or sys.stdout
    info = init_distributed(request.device, env if env is not None else dict(os.environ))
    try:
        return _run(request, info, out)
    finally:
        finish(info)


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


def _run(request: TrainRequest, info: DistributedInfo | None, out: TextIO) -> TrainOutcome:
    device = resolve_device(request.device)
    if info is not None and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)  # one GPU per process
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    printer = ConsolePrinter(out, progress=request.progress) if rank == 0 else None  # one process prints

    if request.resume is not None:
        check_resume(request)
        run = runs.open_run(request.resume)
        config = TrainConfig.from_dict(run.config["train"])
        engine = replace(make_engine(device, faithful=config.faithful), rank=rank, world_size=world)
        tracker = resume_tracking(run.path) if rank == 0 else None  # as the run recorded
        result = tracked(tracker, lambda: resume(run, engine=engine, events=[printer, tracker],
                                                 data_dir=request.data.data_dir,
                                                 progress=request.progress and rank == 0))
        dataset, stop = None, []  # evaluate_run reads the run's own data
    else:
        source = open_source(request.init_from) if request.init_from is not None else None

        def plan(train_images: int | None) -> tuple[TrainConfig, str]:
            return run_config(request.recipe, request.overrides, device_type=device.type, faithful=request.faithful,
                              hflip=hflip_of(request.data), source=source, train_images=train_images)

        plan(None)  # every check before anything is loaded or written
        request.data.validate()
        runs.check_out(request.out)
        trackers = check_log(request.log, request.mlflow_uri)
        connection = connect(trackers, request.mlflow_uri, request.mlflow_experiment) \
            if trackers and rank == 0 else None  # reached, or refused
        dataset = load_data(request.data, progress=request.progress and rank == 0)
        config, sizing = plan(len(dataset.train))
        if source is not None:  # the normalization the weights were trained with (a hub model's)
            dataset = replace(dataset, spec=spec_for(source, dataset.spec))
        init, init_record = fit(source, config.model, dataset.spec, config.seed) if source else (None, None)
        engine = replace(make_engine(device, faithful=config.faithful), rank=rank, world_size=world)
        run_dir = runs.new_run_dir(request.out, f"{config.model}-{config.optimizer}") if rank == 0 else None
        if rank == 0:
            for note in dataset.notes:
                print(f"convnet: {note}", file=out)
            procs = f" x {world} processes" if world > 1 else ""
            c, h, w = dataset.image_shape
            print(f"training {config.model} on {len(dataset.train):,} {dataset.name} images ({c}x{h}x{w}), "
                  f"{engine.device}{procs}; run folder {run_dir}", file=out, flush=True)
            if init_record is not None:
                changes = "; ".join(init_record["changes"]) or "every weight kept"
                print(f"starting from {init_record['source']} ({changes})", file=out)
            if sizing:
                print(sizing, file=out, flush=True)
            imbalance = imbalance_warning(dataset, config)
            if imbalance:
                print(f"convnet: {imbalance}", file=out, flush=True)
            assert run_dir is not None
            write_data_files(run_dir, dataset)
        stop = [StopAtAccuracy(dataset.test, config.target_accuracy, tta=config.tta)] if config.target_accuracy else []
        tracker = start(connection, run_dir, run_dir.name, config, data_record(dataset)) \
            if connection is not None and run_dir is not None else None
        result = tracked(tracker, lambda: train(config, dataset.train, dataset.spec, engine=engine,
                                                events=[*stop, printer, tracker], run_dir=run_dir,
                                                data_record=data_record(dataset), init=init,
                                                init_record=init_record))
    if rank != 0:
        return TrainOutcome(result, None)
    assert result.run_dir is not None
    # a --target-accuracy run measured the final model's test logits last: they are reused; it is timed to
    # that accuracy, so the training images are not scored again (`convnet evaluate RUN` does that)
    test_logits = stop[0].logits if stop else None
    run_dir = result.run_dir

    def scored() -> Evaluation:
        evaluation = evaluate_run(run_dir, engine=single_process(engine), data_dir=request.data.data_dir,
                                  dataset=dataset, test_logits=test_logits,  # the data in memory, not read again
                                  score_train=not result.config.target_accuracy)
        if tracker is not None:  # the scores, the pictures a user looks at first, and the run folder
            images = (dataset or load_run(run_dir, engine=single_process(engine)).dataset(
                request.data.data_dir, progress=False)).test.images
            pictures = write_plots(run_dir, evaluation, images, result.model)
            tracker.finish(evaluation.to_json(), {k: pictures[k] for k in ("confusion_matrix", "mistakes")}, run_dir)
        return evaluation

    return TrainOutcome(result, tracked(tracker, scored))


def tracked(tracker: Tracker | None, training: Callable[[], Any]) -> Any:
    """``training()`` (or the scoring after it), with the trackers told how it ended if
    it does not finish."""
    try:
        return training()
    except BaseException as e:
        if tracker is not None:
            tracker.fail(interrupted=isinstance(e, KeyboardInterrupt))
        raise


def check_resume(request: TrainRequest) -> None:
    """A resumed run continues with its own recorded settings and data: a setting given
    beside ``--resume`` would be silently ignored, so it is refused, named."""
    given = [k for k, v in request.overrides.items() if v is not None]
    if request.recipe is not None:
        given.append("recipe")
    if request.faithful:
        given.append("faithful")
    if request.out is not None:
        given.append("out")
    if request.init_from is not None:
        given.append("init_from")
    if request.log or request.mlflow_uri is not None:  # a resumed run continues the trackers it recorded
        given += ["log"] if request.log else []
        given += ["mlflow_uri"] if request.mlflow_uri is not None else []
    default = DataOptions()
    given += [f.name for f in fields(DataOptions) if f.name != "data_dir"
              and getattr(request.data, f.name) != getattr(default, f.name)]
    if given:
        flag = {"folder": "data", "memory_budget_mb": "memory_budget"}  # the flags of the other fields
        flags = ", ".join("--" + flag.get(name, name).replace("_", "-") for name in given)
        raise ConvnetError(f"--resume continues a run with the settings and data it recorded; leave out {flags} "
                           "(to train differently, start a new run)")


def run_config(recipe: str | None, overrides: dict[str, Any], *, device_type: str, faithful: bool, hflip: bool,
               source: Source | None = None, train_images: int | None = None) -> tuple[TrainConfig, str]:
    """The config a new run trains with, validated, and a line saying how it was sized:
    the recipe (by default the device's) with the settings given laid over it; for a run
    that starts from ``source``'s weights, its model and fine-tuning's defaults
    (:func:`~convnet.config.fine_tune_defaults`) where no setting says otherwise; and, when
    ``train_images`` is known and ``epochs`` is not given, sized to the data
    (:func:`~convnet.config.size_to_data`; never the tutorial's recipe or a faithful run).

    Raises:
        ConvnetError: a bad setting, named by its flag.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if source is not None:
        given["model"] = model_of(source, given.get("model"))  # the source's
    config = resolve_config(recipe, given, device_type=device_type, faithful=faithful, hflip=hflip)
    if config.calibrate and not config.val_split:  # the temperature is fitted on held-out images
        if "val_split" in given:
            raise ConvnetError("--calibrate fits a temperature on held-out training images; --val-split 0 holds "
                               f"none (leave it out for {CALIBRATION_SPLIT})")
        config = replace(config, val_split=CALIBRATION_SPLIT)
    if source is not None:  # fine-tuning's defaults, where no setting says otherwise
        config = replace(config, **{k: v for k, v in fine_tune_defaults(config.epochs).items() if k not in given})
    sizing = ""
    if train_images is not None and "epochs" not in given and not config.faithful and recipe != "tutorial":
        config, sizing = size_to_data(config, trained_images(train_images, config.val_split))
    config.validate()
    if config.freeze_epochs and source is None:
        raise ConvnetError("--freeze-epochs trains the head of a model that starts from trained weights; "
                           "give them with --init-from")
    return config, sizing


def trained_images(images: int, val_split: float) -> int:
    """How many of ``images`` are trained on when ``val_split`` of them is held out
    (the stratified split rounds the held-out share up)."""
    return images - math.ceil(val_split * images) if val_split else images


def hflip_of(options: DataOptions) -> bool:
    """Whether the data ``options`` name allows mirrored images, known before it is read."""
    if options.hflip is not None:
        return options.hflip
    return True if options.folder is not None else DATASETS[options.dataset].hflip if options.dataset in DATASETS \
        else True


def data_record(dataset: Dataset) -> dict[str, Any]:
    """What ``config.json`` keeps of the data: enough to read the same images again."""
    return {"name": dataset.name, "source": dataset.source, "subset": dataset.subset,
            "train_images": len(dataset.train), "test_images": len(dataset.test), **dataset.origin}


def write_data_files(run_dir: Path, dataset: Dataset) -> None:
    """For a folder of images: the files of each split (``split.json``) and the images
    left out (``skipped_images.txt``)."""
    if dataset.files is not None:
        write_json(run_dir / runs.SPLIT, dataset.files)
    if dataset.skipped:
        text = "".join(f"{name}\n" for name in dataset.skipped).encode()
        atomic_write(run_dir / runs.SKIPPED, lambda f: f.write(text))
