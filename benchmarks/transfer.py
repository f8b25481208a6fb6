"""Fine-tuning against training from scratch, offline, on real data: the figures behind README's "Fine-tuning".

    python benchmarks/transfer.py choose WORKDIR [--models fastnet] [--seeds 0,1]
    python benchmarks/transfer.py measure WORKDIR [--models fastnet,resnet20,resnet18] [--per-class 10,20,50]
                                          [--seeds 0,1,2]

Both start by pretraining each model once, with the default recipe, on Fashion-MNIST's classes 0-4 (all their
30,000 training images, WORKDIR/source/), exactly as `convnet train --data WORKDIR/source --model MODEL` does.

`choose` picks the fine-tuning defaults on a validation split only: 20 training images per class of classes 5-9,
scored on 2,000 other training images of those classes (never the test images), for a grid of --freeze-epochs and
--body-lr. `measure` is the test protocol: 10, 20 and 50 training images per class of classes 5-9 (stratified,
drawn by the seed), tested on the 5,000 test images of classes 5-9, trained from scratch and with
--init-from the pretrained run, each as `convnet train --data FOLDER` does with no other flag; mean and spread
of the test errors and accuracies over the seeds, training seconds (the loop's clock) and wall seconds, and the
models' training and prediction images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

from convnet.data.named import load_dataset
from convnet.data.options import DataOptions
from convnet.models.engine import make_engine
from convnet.tools.bench import prediction_speed
from convnet.tools.experiment import run_training
from convnet.training.config import TrainRequest

OLD, NEW = range(0, 5), range(5, 10)


def write_folder(folder: Path, images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / classes[int(label)].replace("/", "-") / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(path)
    return folder


def pick(labels: np.ndarray, classes: range, per_class: int | None, seed: int, exclude: np.ndarray | None = None
         ) -> np.ndarray:
    """Rows of ``classes``, ``per_class`` of each drawn by ``seed`` (all of them for None)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if exclude is not None:
            rows = np.setdiff1d(rows, exclude)
        out.append(rows if per_class is None else rng.choice(rows, per_class, replace=False))
    return np.sort(np.concatenate(out))


def train(folder: Path, out: Path, **flags: object) -> dict[str, float]:
    """What `convnet train --data FOLDER --out OUT [flags]` does, in this process; its scores and seconds."""
    init = flags.pop("init_from", None)
    request = TrainRequest(settings=dict(flags), data=DataOptions(folder=str(folder)), device="cpu", out=out,
                           progress=False, init_from=str(init) if init else None)
    start = time.perf_counter()
    with redirect_stdout(io.StringIO()) as printed:
        outcome = run_training(request)
    assert outcome.evaluation is not None
    history = outcome.result.history
    sizing = next((line for line in printed.getvalue().splitlines() if "epochs of" in line), "")
    return {"test_accuracy": float(outcome.evaluation.test.accuracy or 0.0), "train_s": outcome.result.seconds,
            "wall_s": time.perf_counter() - start, "train_images_per_s": statistics.fmean(h.images_per_s
                                                                                          for h in history),
            "epochs": len(history), "sizing": sizing}


def source(work: Path, model: str, data: object) -> Path:
    """The model pretrained once on classes 0-4 (all 30,000 training images), its run folder."""
    run = work / f"source-{model}"
    if (run / "metrics.json").is_file():
        return run
    folder = work / "source"
    if not (folder / "test").is_dir():
        train_rows, test_rows = pick(data.train.labels.numpy(), OLD, None, 0), pick(data.test.labels.numpy(), OLD,
                                                                                    None, 0)
        write_folder(folder / "train", data.train.images[train_rows, 0].numpy(), data.train.labels[train_rows].numpy(),
                     data.classes)
        write_folder(folder / "test", data.test.images[test_rows, 0].numpy(), data.test.labels[test_rows].numpy(),
                     data.classes)
    scores = train(folder, run, model=model)
    print(json.dumps({"pretrained": model, **scores}), flush=True)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("choose", "measure"))
    p.add_argument("workdir", type=Path)
    p.add_argument("--models", default="fastnet")
    p.add_argument("--per-class", default="10,20,50")
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    data = load_dataset("fashion-mnist")
    labels, test_labels = data.train.labels.numpy(), data.test.labels.numpy()
    images, test_images = data.train.images[:, 0].numpy(), data.test.images[:, 0].numpy()
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for model in a.models.split(","):
        run = source(a.workdir, model, data)
        if a.what == "choose":
            val = pick(labels, NEW, 400, 123)  # 2,000 training images of classes 5-9: the validation split
            grid = [(0, 1.0), (0, 0.1), (1, 1.0), (1, 0.1), (1, 0.01), (3, 0.1)]
            for seed in seeds:
                rows_t = pick(labels, NEW, 20, seed, exclude=val)
                folder = a.workdir / f"choose-{seed}"
                if not (folder / "test").is_dir():
                    write_folder(folder / "train", images[rows_t], labels[rows_t], data.classes)
                    write_folder(folder / "test", images[val], labels[val], data.classes)  # scored: validation
                for freeze, body_lr in grid:
                    out = a.workdir / f"choose-{model}-{seed}-{freeze}-{body_lr}"
                    r = train(folder, out, seed=seed, init_from=run, freeze_epochs=freeze, body_lr=body_lr)
                    rows.append({"model": model, "seed": seed, "freeze_epochs": freeze, "body_lr": body_lr, **r})
                    print(json.dumps(rows[-1]), flush=True)
            for freeze, body_lr in grid:
                accs = [r["test_accuracy"] for r in rows if (r["model"], r["freeze_epochs"], r["body_lr"]) ==
                        (model, freeze, body_lr)]
                print(f"{model} --freeze-epochs {freeze} --body-lr {body_lr}: validation accuracy "
                      f"{statistics.fmean(accs):.4f} (min {min(accs):.4f}, max {max(accs):.4f})")
            continue
        test_rows = pick(test_labels, NEW, None, 0)
        for k in (int(x) for x in a.per_class.split(",")):
            for seed in seeds:
                folder = a.workdir / f"new-{k}-{seed}"
                if not (folder / "test").is_dir():
                    rows_t = pick(labels, NEW, k, seed)
                    write_folder(folder / "train", images[rows_t], labels[rows_t], data.classes)
                    write_folder(folder / "test", test_images[test_rows], test_labels[test_rows], data.classes)
                for how in ("scratch", "fine-tune"):
                    out = a.workdir / f"{how}-{model}-{k}-{seed}"
                    flags = {"model": model} if how == "scratch" else {"init_from": run}
                    r = train(folder, out, seed=seed, **flags)
                    rows.append({"model": model, "per_class": k, "seed": seed, "how": how,
                                 "test_errors": round((1 - r["test_accuracy"]) * len(test_rows)), **r})
                    print(json.dumps(rows[-1]), flush=True)
        speed = prediction_speed(model, engine=make_engine("cpu"), seconds=2.0)
        rows.append({"model": model, "predict_images_per_s": speed})
        print(json.dumps(rows[-1]), flush=True)
    (a.workdir / f"transfer-{a.what}.json").write_text(json.dumps(rows, indent=1))
    if a.what == "measure":
        print("| model | images per class | from scratch: test errors (accuracy) | fine-tuned | fewer errors | "
              "training s (scratch / fine-tuned) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for model in a.models.split(","):
            for k in (int(x) for x in a.per_class.split(",")):
                got = {how: [r for r in rows if r.get("how") == how and r["model"] == model and r["per_class"] == k]
                       for how in ("scratch", "fine-tune")}
                if not got["scratch"]:
                    continue
                e = {h: statistics.fmean(r["test_errors"] for r in got[h]) for h in got}
                sd = {h: statistics.stdev(r["test_errors"] for r in got[h]) if len(got[h]) > 1 else 0.0 for h in got}
                acc = {h: statistics.fmean(r["test_accuracy"] for r in got[h]) for h in got}
                secs = {h: statistics.fmean(r["train_s"] for r in got[h]) for h in got}
                print(f"| {model} | {k} | {e['scratch']:.0f} ± {sd['scratch']:.0f} ({acc['scratch']:.4f}) | "
                      f"{e['fine-tune']:.0f} ± {sd['fine-tune']:.0f} ({acc['fine-tune']:.4f}) | "
                      f"{1 - e['fine-tune'] / e['scratch']:.0%} | {secs['scratch']:.0f} / {secs['fine-tune']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
