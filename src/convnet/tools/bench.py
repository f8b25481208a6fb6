"""Benchmark: convnet's training and prediction against the tutorial's own loop, side
by side in one process on one device.

The reference is a faithful copy of the tutorial's ``TrainModelInBatches`` and
``MakePredictions``. Each measurement runs both on the same model, batch size and images;
warm-up runs are excluded, A and B alternate, and the median of the repeats is reported.
GPU work is synchronised before a clock is read.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convnet.core.errors import ConvnetError
from convnet.data.dataset import Dataset
from convnet.data.load import load_data
from convnet.data.options import DataOptions
from convnet.models.engine import Engine, cpu_info, make_engine
from convnet.models.inference import infer
from convnet.models.networks import create_model
from convnet.training.config import TrainConfig, TrainRequest
from convnet.training.events import StopAtAccuracy
from convnet.training.loop import train
from convnet.training.recipes import DEFAULT_RECIPE, resolve_config, resolve_run
from convnet.training.run import train_run
from convnet.trust.evaluation import score_split
from convnet.use.onnxfile import new_session, session_probabilities
from convnet.use.onnxgraph import export_model


# --- the tutorial's code, as printed (only the per-epoch print is dropped: each epoch's mean loss is returned)
def TrainModelInBatches(model, loss_func, optimizer, X, Y, batch_size=32, epochs=5):  # type: ignore[no-untyped-def]  # noqa: N802
    means = []
    for i in range(epochs):  # noqa: B007 (the tutorial's code, verbatim)
        batches = torch.arange((X.shape[0] // batch_size) + 1)  ### Batch Indices

        losses = []  ## Record loss of each batch
        for batch in batches:
            if batch != batches[-1]:
                start, end = int(batch * batch_size), int(batch * batch_size + batch_size)
            else:
                start, end = int(batch * batch_size), None

            X_batch, Y_batch = X[start:end], Y[start:end]  ## Single batch of data

            preds = model(X_batch)  ## Make Predictions by forward pass through network

            loss = loss_func(preds, Y_batch)  ## Calculate Loss
            losses.append(loss)  ## Record Loss

            optimizer.zero_grad()  ## Zero weights before calculating gradients
            loss.backward()  ## Calculate Gradients
            optimizer.step()  ## Update Weights

        means.append(torch.tensor(losses).mean())  # the tutorial prints this
    return means


def tutorial_adam(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  epochs: int = 1) -> list[torch.Tensor]:
    """The tutorial's Adam training of ``model`` on float images ``x`` in [0, 1]: its
    optimizer (the learning rate as the float32 tensor it passes), loss and
    :func:`TrainModelInBatches`; each epoch's mean batch loss, as it prints them."""
    optimizer = torch.optim.Adam(params=model.parameters(), lr=torch.tensor(1 / 1e3))
    with warnings.catch_warnings():  # its torch.tensor(losses) warns about grad-carrying scalars
        warnings.simplefilter("ignore", UserWarning)
        return TrainModelInBatches(model, nn.CrossEntropyLoss(), optimizer, x, y,
                                   batch_size=batch_size, epochs=epochs)


def MakePredictions(model, input_data, batch_size=32):  # type: ignore[no-untyped-def]  # noqa: N802
    batches = torch.arange((input_data.shape[0] // batch_size) + 1)  ### Batch Indices

    with torch.no_grad():  ## Disables automatic gradients calculations
        preds = []
        for batch in batches:
            if batch != batches[-1]:
                start, end = int(batch * batch_size), int(batch * batch_size + batch_size)
            else:
                start, end = int(batch * batch_size), None

            X_batch = input_data[start:end]

            preds.append(model(X_batch))

    return preds


@dataclass
class BenchResult:
    device: str
    model: str
    batch_size: int
    train_images: int
    predict_images: int
    repeats: int
    tutorial_train_images_per_s: float
    convnet_train_images_per_s: float
    tutorial_predict_images_per_s: float
    convnet_predict_images_per_s: float
    train_speedup: float
    predict_speedup: float
    engine: dict[str, Any]
    torch: str
    threads: int
    cpu: str
    onnx_predict_images_per_s: float | None = None  # ONNX Runtime on the model's export (the CPU's prediction path)
    onnx_predict_speedup: float | None = None
    cpu_flags: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def prediction_speed(name: str, *, engine: Engine, shape: tuple[int, int, int] = (1, 28, 28),
                     seconds: float = 0.5) -> float:
    """Images per second that model ``name`` (freshly built for ``shape`` and 10 classes)
    predicts on ``engine``, for about ``seconds`` after a warm-up batch: what ``convnet
    models`` shows next to each model."""
    c, h, w = shape
    net = engine.prepare_model(create_model(name, 10, c, (h, w)))
    images = torch.randint(0, 256, (256, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    infer(net, images[:engine.infer_batch_size], engine=engine)  # warm-up
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or done == 0:
        infer(net, images, engine=engine)
        done += len(images)
    return done / elapsed


def model_speeds(names: Iterable[str], seconds: float = 0.3) -> dict[str, float]:
    """What ``convnet models --speed`` shows: each model's :func:`prediction_speed` on the CPU."""
    engine = make_engine("cpu")
    return {name: prediction_speed(name, engine=engine, seconds=seconds) for name in names}


def run_bench(dataset: Dataset, *, engine: Engine, model: str = "seed", batch_size: int = 128,
              train_images: int = 12_800, repeats: int = 5, warmup: int = 1) -> BenchResult:
    """Images/s of the tutorial's loop and of convnet's, training and predicting.

    Training: one epoch over the first ``train_images`` training images with Adam,
    lr 0.001. Prediction: the whole test split. Both sides start from the same weights.
    """
    device, spec = engine.device, dataset.spec
    sub = dataset.train.first(train_images).to(device)
    config = TrainConfig(model=model, optimizer="adam", lr=1e-3, epochs=1, batch_size=batch_size, shuffle=True,
                         val_split=0.0)  # the loop alone, on every image
    # the tutorial's side: float32 tensors scaled once, on the device, its own model and optimizer
    x_train = (sub.images.float() / 255.0).to(device)
    y_train = sub.labels.to(device)
    x_test = (dataset.test.images.float() / 255.0).to(device)
    test_uint8 = dataset.test.images.to(device)

    def new_model() -> nn.Module:
        return create_model(model, spec.num_classes, spec.channels, (spec.height, spec.width))

    def tutorial_train() -> None:
        torch.manual_seed(config.seed)
        tutorial_adam(new_model().to(device), x_train, y_train, batch_size)

    def convnet_train() -> None:
        train(config, sub, spec, engine=engine)

    torch.manual_seed(0)
    net = new_model().to(device).eval()
    fast_net = engine.prepare_model(new_model())
    fast_net.load_state_dict(net.state_dict())

    def tutorial_predict() -> None:
        torch.cat(MakePredictions(net, x_test, batch_size=batch_size)).argmax(dim=1)

    def convnet_predict() -> None:
        infer(fast_net, test_uint8, engine=engine).argmax(dim=1)

    pairs = [("tt", tutorial_train), ("ct", convnet_train), ("tp", tutorial_predict), ("cp", convnet_predict)]
    if device.type == "cpu":  # what a run on the CPU predicts with: ONNX Runtime on its export
        session = new_session(export_model(fast_net, spec, tta=False).SerializeToString())
        test_cpu = test_uint8.cpu()

        def onnx_predict() -> None:
            session_probabilities(session, test_cpu, spec.num_classes, Path("bench.onnx")).argmax(axis=1)

        pairs.append(("op", onnx_predict))
    times: dict[str, list[float]] = {k: [] for k, _ in pairs}
    for i in range(warmup + repeats):
        order = [pairs[1], pairs[0], *pairs[2:][::-1]] if i % 2 else pairs  # alternate which side goes first
        for key, fn in order:
            t = _timed(fn, device)
            if i >= warmup:
                times[key].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_test = len(dataset.test)
    return BenchResult(
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        model=model, batch_size=batch_size, train_images=len(sub), predict_images=n_test, repeats=repeats,
        tutorial_train_images_per_s=len(sub) / med["tt"], convnet_train_images_per_s=len(sub) / med["ct"],
        tutorial_predict_images_per_s=n_test / med["tp"], convnet_predict_images_per_s=n_test / med["cp"],
        train_speedup=med["tt"] / med["ct"], predict_speedup=med["tp"] / med["cp"],
        engine=engine.describe(), torch=torch.__version__, threads=torch.get_num_threads(),
        cpu=str(cpu_info()["name"]), cpu_flags=list(cpu_info()["flags"]),  # type: ignore[call-overload]
        onnx_predict_images_per_s=n_test / med["op"] if "op" in med else None,
        onnx_predict_speedup=med["tp"] / med["op"] if "op" in med else None,
    )


def format_bench(r: BenchResult) -> str:
    return "\n".join([
        f"device {r.device}, torch {r.torch}, {r.threads} threads, model {r.model}, batch {r.batch_size}, "
        f"median of {r.repeats} (warm-up excluded)",
        f"{'':<10}{'tutorial':>14}{'convnet':>14}{'speed-up':>10}",
        f"{'train':<10}{r.tutorial_train_images_per_s:>10,.0f} i/s{r.convnet_train_images_per_s:>10,.0f} i/s"
        f"{r.train_speedup:>9.2f}x",
        f"{'predict':<10}{r.tutorial_predict_images_per_s:>10,.0f} i/s{r.convnet_predict_images_per_s:>10,.0f} i/s"
        f"{r.predict_speedup:>9.2f}x  (PyTorch, fp32)",
        *([f"{'predict':<10}{'':>14}{r.onnx_predict_images_per_s:>10,.0f} i/s{r.onnx_predict_speedup:>9.2f}x  "
           "(ONNX Runtime, fp32: what a run on the CPU predicts with)"] if r.onnx_predict_images_per_s else []),
        f"cpu {r.cpu}, flags {' '.join(r.cpu_flags or []) or 'unknown'}; engine: "
        f"{'bf16' if r.engine.get('autocast') else 'fp32'} training, channels-last {r.engine.get('channels_last')}",
    ])


@dataclass
class TimeToAccuracy:
    """Seconds of training until the test accuracy reached ``target``, per seed."""

    device: str
    recipe: str
    target: float
    seeds: list[int]
    seconds: list[float]  # training time to the target, or to the end when it was not reached
    epochs: list[int]
    accuracies: list[float]  # test accuracy when training stopped
    reference: dict[str, float] | None  # the tutorial's Adam-15 run: seconds and test accuracy
    torch: str
    threads: int

    @property
    def reached(self) -> int:
        return sum(a >= self.target for a in self.accuracies)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(reached=self.reached, mean_seconds=statistics.fmean(self.seconds),
                 std_seconds=statistics.stdev(self.seconds) if len(self.seconds) > 1 else 0.0)
        return d


def time_to_accuracy(dataset: Dataset, *, engine: Engine, recipe_name: str, target: float, seeds: int = 3,
                     reference: bool = True) -> TimeToAccuracy:
    """Train ``recipe_name`` with ``--target-accuracy target`` once per seed (0, 1, …) and
    time it; optionally the tutorial's Adam-15 run on the same engine as a reference.

    The time is the training loop's own clock, including the per-epoch test evaluation
    that decides when to stop, excluding start-up and data loading.
    """
    secs, epochs, accs = [], [], []
    for seed in range(seeds):  # every training image, timed to the test accuracy: a benchmark, not a choice
        config, _ = resolve_run(recipe_name, {"seed": seed, "val_split": 0.0}, kind=engine.recipe_kind,
                                hflip=dataset.spec.hflip, train_images=len(dataset.train))
        stop = StopAtAccuracy(dataset.test, target, tta=config.tta)
        result = train_run(TrainRequest(config, dataset), engine=engine, events=[stop]).result
        secs.append(result.seconds)
        epochs.append(len(result.history))
        accs.append(float(result.history[-1].test_accuracy or 0.0))
    ref = None
    if reference:
        tutorial_adam = {"optimizer": "adam", "epochs": 15, "seed": 42, "val_split": 0.0}
        result = train_run(TrainRequest(tutorial_adam, dataset, recipe="tutorial"), engine=engine).result
        ref = {"seconds": result.seconds, "test_accuracy": score_split(result.model, dataset.test, engine).accuracy}
    return TimeToAccuracy(
        device=str(engine.device) if engine.device.type == "cpu" else torch.cuda.get_device_name(engine.device),
        recipe=recipe_name, target=target, seeds=list(range(seeds)), seconds=secs, epochs=epochs, accuracies=accs,
        reference=ref, torch=torch.__version__, threads=torch.get_num_threads(),
    )


def format_time_to_accuracy(r: TimeToAccuracy) -> str:
    d = r.to_json()
    lines = [
        f"device {r.device}, torch {r.torch}, {r.threads} threads, recipe {r.recipe}, target test accuracy {r.target}",
        f"reached in {r.reached}/{len(r.seeds)} seeds: {d['mean_seconds']:.1f} ± {d['std_seconds']:.1f} s of training "
        f"(epochs {r.epochs}, accuracies {[round(a, 4) for a in r.accuracies]})",
    ]
    if r.reference:
        lines.append(f"reference, the tutorial's Adam-15 on the same engine: {r.reference['seconds']:.1f} s, "
                     f"test accuracy {r.reference['test_accuracy']:.4f}")
    return "\n".join(lines)


def bench(data: DataOptions, *, device: str = "auto", model: str = "seed", batch_size: int = 128,
          train_images: int = 12_800, repeats: int = 5, target: float | None = None, recipe: str | None = None,
          seeds: int = 3, reference: bool = True, precision: str = "auto") -> BenchResult | TimeToAccuracy:
    """What ``convnet bench`` does: :func:`run_bench`, or with ``target``
    :func:`time_to_accuracy` of ``recipe`` (default: the device's), on the fast engine
    training in ``precision`` (``fp32`` measures a CPU without bfloat16's path on any CPU).

    Raises:
        ConvnetError: a bad value, named, before the data is read.
    """
    if repeats < 1 or train_images < batch_size or batch_size < 1:
        raise ConvnetError("--repeats must be >= 1, --batch-size >= 1 and --train-images at least one --batch-size")
    if target is not None and (not 0 < target <= 1 or seeds < 1):
        raise ConvnetError(f"--target-accuracy must be an accuracy in (0, 1] and --runs >= 1, got {target}, {seeds}")
    engine = make_engine(device, precision=precision)
    create_model(model)  # an unknown name is refused before the data is read
    if recipe is not None:
        resolve_config(recipe)
    dataset = load_data(data)
    if target is not None:
        return time_to_accuracy(dataset, engine=engine, recipe_name=recipe or DEFAULT_RECIPE[engine.recipe_kind],
                                target=target, seeds=seeds, reference=reference)
    return run_bench(dataset, engine=engine, model=model, batch_size=batch_size, train_images=train_images,
                     repeats=repeats)
