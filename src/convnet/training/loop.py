"""Training: the optimizer, one training step, and the one training loop.

:func:`train_step` holds the five lines of a step (zero_grad, forward, loss, backward,
step). :func:`train` is the loop around it, read top to bottom: for each epoch, shuffle;
for each batch, slice the uint8 images, draw the augmentation, set the learning rate,
step. The engine runs the step eagerly or replays it as a CUDA graph
(:class:`~convnet.models.engine.StepRunner`). Everything optional (progress, checkpoints,
validation, stopping at a target accuracy) happens in :mod:`convnet.training.events`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.errors import ConvnetError, InputError, RunComplete, TrainingDiverged
from convnet.data.arrays import as_images, as_labels, as_split, spec_of
from convnet.data.dataset import DiskImages, Images, InputSpec, Split, batches, split_validation
from convnet.models.engine import Engine, StepRunner, make_engine
from convnet.models.networks import Calibrated, count_parameters, create_model, head_name, weight_mismatch
from convnet.training import augment, checkpoint, semi
from convnet.training.config import EpochRecord, TrainConfig, check_config, lr_at
from convnet.training.distributed import all_mean, wrap
from convnet.training.events import Calibrate, EventList, RunWriter, Validation
from convnet.training.recipes import without_flips
from convnet.training.state import EMA, TrainState


def make_optimizer(config: TrainConfig, model: nn.Module, engine: Engine) -> torch.optim.Optimizer:
    """The optimizer the config names. Weight decay is not applied to batch-norm and bias
    parameters.

    In faithful mode the learning rate is passed as the tutorial passed it, a float32
    tensor (``torch.tensor(1/1e3)``), which rounds it. For a step replayed as a CUDA graph
    it is a tensor on the device, updated in place, and the optimizers run their
    graph-safe kernels (fused SGD, capturable Adam).
    """
    graphs = engine.graphs and engine.device.type == "cuda"
    lr: float | torch.Tensor = config.lr
    if config.faithful:
        lr = torch.tensor(config.lr)
    elif graphs:
        lr = torch.tensor(config.lr, device=engine.device)
    params: Any = model.parameters()
    if config.weight_decay:
        params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": config.weight_decay},
                  {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if config.freeze_epochs or config.body_lr != 1.0:
        # the head and the body (every other layer) apart: the body learns at body_lr times the head's rate,
        # and not at all while frozen (set_lr); each group with a learning-rate tensor of its own in a CUDA graph
        head = head_name(model) + "."
        in_head = {id(p) for n, p in model.named_parameters() if n.startswith(head)}
        groups = params if config.weight_decay else [{"params": list(params)}]
        params = [{**g, "params": [p for p in g["params"] if (id(p) in in_head) == is_head], "body": not is_head,
                   "lr_scale": 1.0 if is_head else config.body_lr}
                  for is_head in (False, True) for g in groups]
        params = [g for g in params if g["params"]]
        if graphs:
            for g in params:
                g["lr"] = torch.tensor(config.lr * g["lr_scale"], device=engine.device)
    # faithful: one parameter at a time, as the tutorial's optimizer ran on its CPU (and as a
    # float32 learning-rate tensor allows on a GPU)
    foreach = False if config.faithful else None
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                               fused=True if graphs else None, foreach=foreach)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, capturable=graphs, foreach=foreach)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, capturable=graphs,  # decay set per group above
                             foreach=foreach)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, *, frozen: bool = False) -> None:
    """Set every group's learning rate: ``lr`` times the group's scale (the body's
    ``body_lr``; 0 while ``frozen``); a tensor learning rate is updated in place."""
    for group in optimizer.param_groups:
        value = lr * (0.0 if frozen and group.get("body") else group.get("lr_scale", 1.0))
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochRecord]
    run_dir: Path | None
    seconds: float  # the loop's own clock: training, plus what events did at each epoch's end
    spec: InputSpec
    config: TrainConfig
    graphed: bool = False  # the step ran as a CUDA graph
    best: dict[str, Any] | None = None  # the epoch whose weights `model` holds, on validation (None without)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, engine: Engine,
               ema: EMA | None, correct: torch.Tensor, seen: torch.Tensor, align: semi.Alignment | None, pad: int,
               adaptive: semi.Adaptive | None,
               images: torch.Tensor,
               labels: torch.Tensor, shifts: torch.Tensor | None = None, flips: torch.Tensor | None = None,
               pool: torch.Tensor | None = None, pool_shifts: torch.Tensor | None = None,
               pool_flips: torch.Tensor | None = None, **strong: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a batch; returns its loss (a tensor on the device).

    Graph-safe: no host synchronisation, state updated in place (``correct`` counts the
    right predictions on the training batches; ``seen`` the pool images the teacher was
    sure of and the sum of its confidence on them all).

    Args:
        images: uint8 ``(B, C, H, W)``; labels ``(B,)``.
        shifts, flips: the batch's augmentation draws (:func:`convnet.training.augment.draw`).
        pool: unlabelled uint8 images ``(U, C, H, W)``, with their light (``pool_shifts``,
            ``pool_flips``) and ``strong`` augmentation draws (:class:`~convnet.training.semi.StrongDraws`'s
            fields): FixMatch (:mod:`convnet.training.semi`).
    """
    x = engine.batch(images)  # (B, C, H, W) float in [0, 1], on the device, in the engine's layout
    x = augment.apply(x, augment.Draws(shifts, flips), pad)
    if pool is None:
        with engine.precision():
            logits = net(x)  # (B, num_classes)
        loss = loss_fn(logits.float(), labels)
    else:
        u = engine.batch(pool)  # (U, C, H, W)
        teacher = ema.module if ema is not None and semi.EMA_TEACHER else net
        mirror = semi.TEACHER_MIRROR and pool_flips is not None  # only where mirrors keep the class
        with torch.no_grad(), engine.precision():  # the teacher's classes, seen lightly augmented
            weak = augment.apply(u, augment.Draws(pool_shifts, pool_flips), pad)
            seen_as_drawn, seen_mirrored = teacher(weak), teacher(weak.flip(3)) if mirror else None
        probs = seen_as_drawn.float().softmax(dim=1)  # (U, num_classes)
        if seen_mirrored is not None:
            probs = (probs + seen_mirrored.float().softmax(dim=1)) / 2
        probs = align(probs) if align is not None else probs
        confidence, pseudo = probs.max(dim=1)  # (U,), (U,)
        sure = (confidence >= (adaptive(probs, confidence)[pseudo] if adaptive is not None else semi.THRESHOLD)).float()
        with engine.precision():  # (B + U, num_classes): one pass, one batch norm's statistics
            both = net(torch.cat([x, semi.strong(u, semi.StrongDraws(**{"strong_flips": None, **strong}))]))
        logits, pool_logits = both[:len(x)], both[len(x):]
        unlabelled = (nn.functional.cross_entropy(pool_logits.float(), pseudo, reduction="none") * sure).mean()
        loss = loss_fn(logits.float(), labels) + semi.WEIGHT * unlabelled
        seen.add_(torch.stack([sure.sum(), confidence.sum()]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if ema is not None:
        ema.update()
    correct.add_((logits.detach().argmax(dim=1) == labels).sum())
    return loss.detach()


def split_with_spec(data: Any) -> tuple[Split, InputSpec]:
    """Training data given without an input spec, as a split, and its spec: its images'
    channels and size, and one class per label value, named ``"0"``, ``"1"``, ...

    Raises:
        InputError: the images or labels cannot be used.
    """
    images, labels = (data.images, data.labels) if isinstance(data, Split) else \
        data if isinstance(data, tuple) and len(data) == 2 else (None, None)
    if images is None:
        raise InputError(f"data: a {type(data).__name__} was given; expected a convnet.Split or a pair "
                         "(images, labels)")
    if not isinstance(images, DiskImages):
        images = as_images(images, None, name="data images")
    n = len(images)
    y = as_labels(labels, n, 2**31 - 1, "data labels")
    num_classes = int(y.max()) + 1 if n else 1
    spec = spec_of(images if isinstance(images, torch.Tensor) else images[:256], [str(k) for k in range(num_classes)])
    return Split(images, y), spec  # converted once: as_split passes it through


def train(
    config: TrainConfig,
    data: Split,
    spec: InputSpec | None = None,
    *,
    val: Split | None = None,
    pool: Images | None = None,
    engine: Engine | None = None,
    events: Any = None,
    run_dir: Path | None = None,
    data_record: dict[str, Any] | None = None,
    resume: bool = False,
    init: Mapping[str, torch.Tensor] | None = None,
    init_record: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a model (fresh, from given weights, or resumed) on the training split ``data``.

    Args:
        config: what to train; validated here.
        data: the training images (uint8 ``(N, C, H, W)``, in memory or on disk) and labels;
            also a pair ``(images, labels)``, the images as any array, tensor or list
            :func:`convnet.data.arrays.as_images` accepts (e.g. numpy ``(N, 28, 28)``).
        spec: the images' input spec (channels, size, classes), recorded in the run;
            None: taken from ``data`` (its images' channels and size, classes named
            ``"0"``.. by the labels, which are then class indices). Where the spec says
            a mirrored image changes class (``hflip=False``), the config's flips
            (augmentation and test-time) are left out, as the command line does.
        val: images to score after every epoch; by default ``config.val_split`` of
            ``data`` is held out for it.
        pool: unlabelled uint8 images ``(P, C, H, W)`` in ``spec`` (in memory or on disk)
            that training learns from too (:mod:`convnet.training.semi`).
        engine: device and fast path; defaults to the CPU, faithful when ``config.faithful``.
        events: a :class:`~convnet.training.events.TrainEvents` or a list of them, called in
            order (see :mod:`convnet.training.events`: printing, stopping at a target accuracy).
        run_dir: when given, config, history, checkpoints and weights are written here.
        data_record: what to record of the data in ``config.json`` (default: counts only).
        resume: continue from ``run_dir``'s last checkpoint.
        init: starting weights, a state dict of ``config.model`` built for ``spec``
            (e.g. ``result.model.state_dict()`` of an earlier run); training starts
            from them with a fresh optimizer and schedule. None: fresh weights drawn
            from ``config.seed``.
        init_record: what ``config.json`` keeps of where ``init`` came from (``init``).

    Raises:
        ConvnetError: a bad config value, or ``init`` weights that do not fit the model;
            TrainingDiverged when the loss stops being finite.
    """
    check_config(config, from_weights=init is not None or resume, held_out=val is not None or None)
    if spec is None:
        data, spec = split_with_spec(data)
    elif not isinstance(spec, InputSpec):
        raise ConvnetError(f"spec: a {type(spec).__name__} was given; expected a convnet.InputSpec "
                           "(a data set's .spec) or None to take it from the images")
    data = as_split(data, spec, "data")  # arrays in any layout, or (images, labels): uint8 (N, C, H, W) in spec
    val = as_split(val, spec, "val") if val is not None else None
    if not spec.hflip and config.flips:
        config = without_flips(config)
    engine = engine or make_engine("cpu", faithful=config.faithful)
    if engine.world_size > 1:
        engine = replace(engine, graphs=False)  # DDP's gradient hooks are not captured: several processes run eagerly
    extra = list(events) if isinstance(events, Sequence) else [events] if events is not None else []
    if init is not None and resume:
        raise ConvnetError("init (starting weights) and resume cannot be combined: a resumed run continues "
                           "from its own checkpoint")
    if val is None and config.val_split:
        data, val = split_validation(data, config.val_split, config.seed)

    torch.manual_seed(config.seed)  # the initial weights, as the tutorial seeds them
    net = create_model(config.model, spec.num_classes, spec.channels, (spec.height, spec.width),
                       mean=spec.mean, std=spec.std)
    if init is not None:
        problem = weight_mismatch(net, init)
        if problem:
            raise ConvnetError(f"init: the starting weights do not fit model {config.model!r} for "
                               f"{spec.num_classes} classes of {spec.channels}x{spec.height}x{spec.width} images: "
                               f"{problem}")
        net.load_state_dict(init)
    model = engine.prepare_model(net)
    optimizer = make_optimizer(config, model, engine)
    ema = EMA(model, config.ema) if config.ema else None
    if ema is not None:
        ema.module.eval()  # evaluated, and the teacher of the pool images: its batch norm's statistics fixed
    # with a pool: the running mean of the teacher's probabilities that distribution alignment divides by
    align = semi.Alignment(data.labels, spec.num_classes, engine.device) if pool is not None and semi.ALIGN else None
    adaptive = semi.Adaptive(spec.num_classes, engine.device) if pool is not None and semi.ADAPTIVE else None
    state = TrainState(config, spec, model, optimizer, engine, torch.Generator().manual_seed(config.seed),
                       torch.Generator(engine.device).manual_seed(config.seed + 1), ema,
                       align=align.running if align is not None else None,
                       adaptive=adaptive.running if adaptive is not None else None)
    if resume:
        if run_dir is None:
            raise ConvnetError("resume needs the run folder")
        checkpoint.load_checkpoint(run_dir / runfolder.CHECKPOINT, state)
        if state.epoch >= config.epochs:
            kept = f", the weights of epoch {state.best.epoch} kept" if state.best is not None else ""
            raise RunComplete(f"{run_dir} is complete ({state.epoch} of {config.epochs} epochs{kept})", str(run_dir))
    elif run_dir is not None and engine.is_main:
        runfolder.write_config(run_dir, asdict(config), spec, engine.describe(), count_parameters(model),
                          data_record or {"name": "arrays", "train_images": len(data)}, init_record)
    writer = RunWriter(run_dir) if run_dir is not None and engine.is_main else None  # one process writes
    calibrate = Calibrate(val) if config.calibrate and val is not None else None  # before the writer keeps it
    hooks = EventList(*(e for e in (Validation(val) if val is not None else None, *extra, calibrate, writer)
                        if e is not None))
    net = wrap(model, engine)  # DistributedDataParallel under torchrun, else the model itself

    data = data.to(engine.device)  # (N, C, H, W) uint8, whole on the device (or left on disk)
    images, labels = data.images, data.labels
    n = len(data) * config.repeats  # images an epoch trains on: the split, config.repeats times
    where = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")  # of the images, for indices
    steps_per_epoch = len(batches(n, config.batch_size))
    correct = torch.zeros((), dtype=torch.int64, device=engine.device)
    seen = torch.zeros(2, device=engine.device)  # pool images the teacher was sure of, and its summed confidence
    per_batch = semi.RATIO  # pool images drawn per labelled image
    balanced = class_weights(labels, spec.num_classes) if "balanced" in (config.class_weight, config.sampler) else None
    weight = balanced.to(engine.device) if balanced is not None and config.class_weight == "balanced" else None
    # --sampler balanced: each image's chance is its class's weight (1 / its images), every class drawn equally often
    draw = balanced[labels.cpu()] if balanced is not None and config.sampler == "balanced" else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    step = StepRunner(functools.partial(train_step, net, optimizer, loss_fn, engine, ema, correct, seen, align,
                                        config.translate_px, adaptive), engine)
    scaled = any("lr_scale" in g for g in optimizer.param_groups)  # head and body apart (make_optimizer)
    check_each_batch = engine.device.type == "cpu"  # a finite-check costs a GPU sync; there, check per epoch
    hooks.on_train_start(state, n)
    start = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        model.train()
        t0 = time.perf_counter()
        order = epoch_order(len(data), config, state.shuffle_rng, where, draw)
        # the pool images of the epoch: RATIO per labelled image, every one before any twice
        pool_order = pool_rows(len(pool), per_batch * n, state.shuffle_rng) if pool is not None else None
        losses = []
        correct.zero_()
        seen.zero_()
        for i, rows in enumerate(batches(n, config.batch_size)):
            idx = order[rows] if order is not None else rows
            x, y = images[idx], labels[idx]  # (B, C, H, W) uint8, (B,)
            draws = augment.draw(len(y), config.augment, config.translate_px, state.augment_rng, engine.device)
            tensors = {k: v for k, v in (("images", x), ("labels", y), ("shifts", draws.shifts),
                                         ("flips", draws.flips)) if v is not None}
            if pool is not None and pool_order is not None:  # (U, C, H, W) unlabelled, U = RATIO * B
                u = pool[pool_order[per_batch * rows.start:per_batch * rows.stop]].to(engine.device)
                light = augment.draw(len(u), config.augment, config.translate_px, state.augment_rng, engine.device)
                tensors.update({k: v for k, v in (("pool", u), ("pool_shifts", light.shifts),
                                                  ("pool_flips", light.flips)) if v is not None})
                strong = semi.draw_strong(len(u), (spec.height, spec.width), spec.hflip, state.augment_rng,
                                          engine.device)
                tensors.update({k: v for k, v in vars(strong).items() if v is not None})
            if engine.world_size > 1:  # this process's share of the global batch
                tensors = {k: v.tensor_split(engine.world_size)[engine.rank] for k, v in tensors.items()}
            if config.schedule != "constant" or scaled:
                set_lr(optimizer, lr_at(config, epoch * steps_per_epoch + i, steps_per_epoch),
                       frozen=epoch < config.freeze_epochs)
            losses.append(step(**tensors))
            if check_each_batch and not torch.isfinite(losses[-1]):
                raise _diverged(epoch, i, losses[-1])
            hooks.on_batch_end(state, len(y))
        epoch_losses = all_mean(torch.stack(losses), engine)  # each process's batch losses, averaged
        if not check_each_batch and not torch.isfinite(epoch_losses).all():
            bad = int((~torch.isfinite(epoch_losses)).nonzero()[0])
            raise _diverged(epoch, bad, epoch_losses[bad])
        loss = float(epoch_losses.mean())  # waits for the epoch's last step
        seconds = time.perf_counter() - t0
        accuracy = float(all_mean(correct.float(), engine)) * engine.world_size / n  # all processes' hits
        lr = next(g["lr"] for g in optimizer.param_groups if not g.get("body"))  # the head's
        record = EpochRecord(epoch + 1, loss, seconds, n / seconds, float(lr), accuracy)
        if pool is not None:  # the share of the pool images drawn the teacher was sure of, its mean confidence
            sure, confidence = (float(v) / (per_batch * n) for v in all_mean(seen, engine) * engine.world_size)
            record.pool_used, record.pool_confidence = sure, confidence
        state.history.append(record)
        state.epoch = epoch + 1
        hooks.on_epoch_end(state)
        if state.stop:
            break
    hooks.on_train_end(state)
    kept = state.kept_model()  # the best epoch's weights on validation, else the last epoch's
    final = kept if state.calibration is None else Calibrated(kept, state.calibration["temperature"])
    return TrainResult(final, state.history, run_dir, time.perf_counter() - start, spec, config,
                       graphed=step.graph is not None, best=state.best.to_json() if state.best is not None else None)


def epoch_order(n: int, config: TrainConfig, rng: torch.Generator, where: torch.device,
                draw: torch.Tensor | None = None) -> torch.Tensor | None:
    """The rows of one epoch, in order: ``config.repeats`` passes over the ``n`` images,
    each in a new random order (or in their own order without shuffling); None for one
    unshuffled pass (the rows are then taken as slices). With ``draw`` (``--sampler
    balanced``: each image's relative chance), as many rows drawn with replacement."""
    if draw is not None:
        return torch.multinomial(draw, n * config.repeats, replacement=True, generator=rng).to(where)
    if config.shuffle:
        return torch.cat([torch.randperm(n, generator=rng) for _ in range(config.repeats)]).to(where)
    return torch.arange(n, device=where).repeat(config.repeats) if config.repeats > 1 else None


def pool_rows(size: int, count: int, rng: torch.Generator) -> torch.Tensor:
    """``count`` rows of a pool of ``size`` images: passes in new random orders, each
    image drawn once before any is drawn again."""
    passes = -(-count // size)
    return torch.cat([torch.randperm(size, generator=rng) for _ in range(passes)])[:count]


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``--class-weight balanced``: float32 ``(num_classes,)``, ``N / (classes present *
    N_class)`` as scikit-learn's ``compute_class_weight("balanced")`` gives it; 0 for a
    class with no training images."""
    from sklearn.utils.class_weight import compute_class_weight

    y = labels.cpu().numpy()
    present = np.unique(y)
    out = torch.zeros(num_classes)
    out[torch.from_numpy(present)] = torch.from_numpy(compute_class_weight("balanced", classes=present, y=y)).float()
    return out


def _diverged(epoch: int, batch: int, loss: torch.Tensor) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: loss is {float(loss)} at epoch {epoch + 1}, batch {batch + 1}; "
        "try a lower --lr (the last good checkpoint is kept)"
    )
