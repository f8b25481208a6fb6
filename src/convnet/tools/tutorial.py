"""The tutorial's whole story, told with this package: data, model, SGD, predictions and
scores, Adam, the two side by side, and channels first vs channels last."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.durable import write_json
from convnet.data.arrays import images_from_array
from convnet.data.dataset import Dataset, to_float
from convnet.data.load import load_data
from convnet.data.options import DataOptions
from convnet.models.engine import Engine, make_engine
from convnet.models.inference import predict
from convnet.models.networks import count_parameters, create_model
from convnet.training.config import TrainConfig, TrainRequest
from convnet.training.loop import TrainResult
from convnet.training.run import train_run
from convnet.trust.evaluation import Evaluation, evaluate
from convnet.trust.report import build_report, format_comparison, load_summaries, write_plots

SGD = TrainConfig(model="seed", optimizer="sgd", lr=1e-3, epochs=25, batch_size=128, seed=42, shuffle=False,
                  val_split=0.0)  # the tutorial's: every training image, no validation
ADAM = replace(SGD, optimizer="adam", epochs=15)
QUICK_SUBSET, QUICK_SGD_EPOCHS, QUICK_ADAM_EPOCHS = 12_000, 5, 3


@dataclass
class TutorialRun:
    name: str
    config: TrainConfig
    result: TrainResult
    evaluation: Evaluation


def run_tutorial(data: DataOptions | Dataset | None = None, out: str | Path | None = None, *, device: str = "auto",
                 faithful: bool = False, quick: bool = False, stream: TextIO | None = None,
                 progress: bool = True) -> list[TutorialRun]:
    """Run the tutorial end to end, printing as it goes; the two runs go in ``out/sgd``
    and ``out/adam`` (each with its plots), their HTML report in ``out/report.html``.

    Args:
        data: Fashion-MNIST by default (any named data set or folder works: the seed
            model is built for its size and channels).
        out: a new or empty folder; default ``runs/tutorial-TIME``.
        device: ``auto``, ``cpu`` or ``cuda``, for both runfolder.
        faithful: the tutorial's exact arithmetic (same numbers as the tutorial).
        quick: a first look: the first 12,000 training images, 5 SGD and 3 Adam epochs.
    """
    s = stream or sys.stdout
    engine = make_engine(device, faithful=faithful)
    runfolder.check_out(out)
    dataset = data if isinstance(data, Dataset) else load_data(data or DataOptions(), progress=progress)
    out = runfolder.new_run_dir(out, "tutorial")

    def say(text: str = "") -> None:
        print(text, file=s, flush=True)

    sgd, adam = replace(SGD, faithful=faithful), replace(ADAM, faithful=faithful)
    if quick:
        dataset = dataset.first(QUICK_SUBSET)
        sgd, adam = replace(sgd, epochs=QUICK_SGD_EPOCHS), replace(adam, epochs=QUICK_ADAM_EPOCHS)

    say("== Load dataset")
    say(f"{dataset.name} from {dataset.source}")
    say(f"X_train {tuple(dataset.train.images.shape)} {dataset.train.images.dtype}, "
        f"X_test {tuple(dataset.test.images.shape)}, Y_train {tuple(dataset.train.labels.shape)}, "
        f"Y_test {tuple(dataset.test.labels.shape)}")
    say("Images stay uint8 in [0, 255] (channels first: N, C, H, W) and are scaled to [0, 1] batch by batch.")
    say("Classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(dataset.classes)))

    say("\n== Create neural network")
    torch.manual_seed(42)
    c, h, w = dataset.image_shape
    net = create_model("seed", dataset.num_classes, c, (h, w))
    say(str(net))
    say(f"{count_parameters(net):,} parameters")
    sample_x, sample_y = to_float(dataset.train.images[:5]), dataset.train.labels[:5]
    logits = net(sample_x)
    say(f"preds = conv_net(X_train[:5]) -> shape {tuple(logits.shape)}")
    say(f"cross entropy on those 5 (untrained): {nn.CrossEntropyLoss()(logits, sample_y).item():.4f}")

    done: list[TutorialRun] = []
    out.mkdir(parents=True, exist_ok=True)
    for name, config, title in (("sgd", sgd, "SGD"), ("adam", adam, "Adam")):
        say(f"\n== Train model ({title} optimizer): {config.epochs} epochs, lr {config.lr}, batch {config.batch_size}")
        run_dir = out / name
        result = train_run(TrainRequest(settings=config, data=dataset, out=run_dir, progress=progress), engine=engine,
                           stream=s).result
        say(f"\n== Make predictions ({title})")
        ev = evaluate(result.model, dataset, engine=engine)
        runfolder.write_metrics(run_dir, ev.to_json())
        write_plots(run_dir, ev, dataset.test.images, result.model)
        say(f"test predictions  {ev.test.predictions[:5].tolist()}   labels {dataset.test.labels[:5].tolist()}")
        say(f"train predictions {ev.train.predictions[:5].tolist()}   labels {dataset.train.labels[:5].tolist()}")
        say(f"\n== Evaluate model performance ({title})")
        say(f"Train Accuracy : {ev.train.accuracy:.3f}")
        say(f"Test  Accuracy : {ev.test.accuracy:.3f}")
        say("Test Data Classification Report :")
        say(ev.report_text)
        done.append(TutorialRun(name, config, result, ev))

    run_dirs = [out / r.name for r in done]
    say("== SGD vs Adam")
    say(format_comparison(load_summaries(run_dirs, device=str(engine.device))))

    say("\n== Channels first vs channels last")
    say(channels_demo(done[-1].result.model, dataset, engine))
    write_json(out / "tutorial.json", {r.name: {"train_accuracy": r.evaluation.train.accuracy,
                                                "test_accuracy": r.evaluation.test.accuracy,
                                                "losses": [h.loss for h in r.result.history]} for r in done})
    say(f"\nRuns written to {out / 'sgd'} and {out / 'adam'}")
    report = build_report(run_dirs, out / "report.html", device=str(engine.device))
    say(f"Report (scores, plots, SGD vs Adam side by side): {report}")
    return done


def channels_demo(model: nn.Module, dataset: Dataset, engine: Engine) -> str:
    """The tutorial's last section: PyTorch's convolutions want channels first."""
    c, h, w = dataset.image_shape
    conv1 = nn.Conv2d(c, 16, (3, 3), padding="same")
    conv2 = nn.Conv2d(16, 32, (3, 3), padding="same")
    x = torch.rand(50, c, h, w)
    with torch.no_grad():
        y1 = conv1(x)
        y2 = conv2(y1)
    lines = [
        f"Conv Layer 1 Weights Shape : {conv1.weight.shape}   (out channels, in channels, kH, kW)",
        f"Conv Layer 2 Weights Shape : {conv2.weight.shape}",
        f"Input Shape               : {tuple(x.shape)}   (N, C, H, W): channels first",
        f"Conv Layer 1 Output Shape : {y1.shape}",
        f"Conv Layer 2 Output Shape : {y2.shape}",
    ]
    first = dataset.test.images[:8]  # (8, C, H, W)  channels first
    last = first.permute(0, 2, 3, 1).numpy()  # (8, H, W, C) channels last, as Keras or PIL would give it
    back = images_from_array(last, "channels-last array", dataset.spec, "auto")
    p_first = predict(model, first, engine=engine).labels
    p_last = predict(model, back, engine=engine).labels
    lines += [
        "",
        f"The same 8 test images channels last {tuple(last.shape)} are detected as NHWC and turned to "
        f"{tuple(back.shape)}.",
        f"predictions from channels first: {p_first.tolist()}",
        f"predictions from channels last : {p_last.tolist()}   identical: {bool(torch.equal(p_first, p_last))}",
        "Inside convnet's fast engine a model may still *store* activations channels last "
        "(torch.channels_last) for speed; the tensor's shape stays (N, C, H, W).",
    ]
    return "\n".join(lines)
