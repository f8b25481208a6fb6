"""Can the model be trusted? The measurements behind README's "Can I trust it?" section, each run as a user runs it
(every convnet command in its own process), on Fashion-MNIST written as PNG class folders.

    python benchmarks/trust.py WORKDIR label-errors --planting-seed 1   # planted label errors found by inspect
    python benchmarks/trust.py WORKDIR imbalance                        # two classes cut to 5 %, with the remedies
    python benchmarks/trust.py WORKDIR calibration                      # ECE before and after --calibrate
    python benchmarks/trust.py WORKDIR unsure RUN                       # share of foreign images answered "unsure"

label-errors: a stratified 10,000-image subset of the training images (seed 0) with 3 % of its labels moved to
another class at random (--planting-seed), all 10,000 test images; `convnet train --data` with no tuning flags,
then `convnet inspect RUN --train-folds 5 --json`; precision and recall of the training images it flags against
the planted ones, the time inspect takes, and the flagged images that were not planted.

imbalance: all training images but those of Pullover and Shirt, of which 5 % are kept (seed 0); the classes most
confused with others, so the hardest case. Trained three times: as is, --class-weight balanced, --sampler
balanced. Macro recall and the two small classes' recall on the full test split.

calibration: `convnet train --calibrate` with the default recipe on the 60,000 training images; then `convnet
inspect` on the run as trained and with its temperature set aside (ECE, 95 % interval, accuracy).

unsure: P chosen so that 95 % of Fashion-MNIST's test images have a top probability of at least P; then the share
of scikit-learn's 1,797 digits (scaled to 28×28) and of 2,000 uniform-noise images below P.

Each writes WORKDIR/trust-KIND.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from small_data import arrays, write_folder  # the same PNG folders as the small-data benchmark

SMALL = ("Pullover", "Shirt")


def convnet(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "convnet", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"convnet {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done, wall


def label_errors(work: Path, planting_seed: int, folds: int) -> dict:
    from sklearn.model_selection import train_test_split

    pool_x, pool_y, test_x, test_y, classes = arrays("fashion-mnist")
    rows = train_test_split(np.arange(len(pool_y)), train_size=10_000, random_state=0, stratify=pool_y)[0]
    x, y = pool_x[rows], pool_y[rows].copy()
    rng = np.random.default_rng(planting_seed)
    planted = rng.choice(len(y), size=len(y) * 3 // 100, replace=False)
    y[planted] = (y[planted] + rng.integers(1, len(classes), size=len(planted))) % len(classes)
    folder, run = work / f"planted-{planting_seed}", work / f"run-planted-{planting_seed}"
    if not (folder / "test").is_dir():
        write_folder(folder / "train", x, y, classes)
        write_folder(folder / "test", test_x, test_y, classes)
    if not (run / "metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        _, train_wall = convnet("train", "--data", str(folder), "--out", str(run), "--no-progress")
    else:
        train_wall = None
    shutil.rmtree(run / "inspect", ignore_errors=True)  # the folds are trained again, and timed
    done, inspect_wall = convnet("inspect", str(run), "--train-folds", str(folds), "--json")
    found = json.loads(done.stdout)
    flagged = {int(Path(i["path"]).stem): i for i in found["label_issues"] if i["split"] == "train"}
    truth = set(int(i) for i in planted)
    hits = truth & set(flagged)
    _, test_only_wall = convnet("inspect", str(run), "--json")
    draw_not_planted(work / f"not-planted-{planting_seed}.png", folder,
                     [i for k, i in flagged.items() if k not in truth][:18], classes)
    return {"planting_seed": planting_seed, "images": len(y), "planted": len(truth), "flagged": len(flagged),
            "found": len(hits), "precision": len(hits) / max(1, len(flagged)), "recall": len(hits) / len(truth),
            "folds": folds, "train_wall_s": train_wall, "inspect_folds_wall_s": inspect_wall,
            "inspect_wall_s": test_only_wall, "test_flagged": sum(i["split"] == "test" for i in found["label_issues"]),
            "not_planted": [{"path": i["path"], "given": i["given_class"], "suggested": i["suggested_class"],
                             "confidence": i["confidence"]} for k, i in flagged.items() if k not in truth]}


def draw_not_planted(out: Path, folder: Path, issues: list[dict], classes: list[str]) -> None:
    """The most likely label errors that were not planted: Fashion-MNIST's own, or hard images."""
    from convnet.trust import plots

    names = [c.replace("-", "/") if c == "T-shirt-top" else c for c in classes]
    images = np.stack([np.asarray(Image.open(folder / i["path"]))[None] for i in issues])
    figure = plots.plot_image_grid(images, np.array([classes.index(i["given_class"]) for i in issues]),
                                   np.array([classes.index(i["suggested_class"]) for i in issues]),
                                   np.array([i["confidence"] for i in issues]), names,
                                   "Flagged by inspect --train-folds 5, not planted: the data set's own labels?",
                                   captions=("given", "seen"))
    out.write_bytes(plots.save(figure))


def recalls(run: Path) -> dict:
    scores = json.loads((run / "metrics.json").read_text())
    matrix, classes = np.array(scores["test"]["confusion_matrix"]), scores["classes"]  # the run's order of classes
    recall = matrix.diagonal() / matrix.sum(1)
    return {"accuracy": float(matrix.diagonal().sum() / matrix.sum()), "macro_recall": float(recall.mean()),
            **{c: float(recall[classes.index(c)]) for c in SMALL}}


def imbalance(work: Path) -> dict:
    pool_x, pool_y, test_x, test_y, classes = arrays("fashion-mnist")
    rng = np.random.default_rng(0)
    keep = np.ones(len(pool_y), bool)
    for name in SMALL:
        rows = np.flatnonzero(pool_y == classes.index(name))
        keep[rows] = False
        keep[rng.choice(rows, size=len(rows) * 5 // 100, replace=False)] = True
    folder = work / "imbalanced"
    if not (folder / "test").is_dir():
        write_folder(folder / "train", pool_x[keep], pool_y[keep], classes)
        write_folder(folder / "test", test_x, test_y, classes)
    result = {"train_images": int(keep.sum()), "per_class": np.bincount(pool_y[keep]).tolist(), "runs": {}}
    for name, flags, slug in (("as is", [], "none"), ("--class-weight balanced", ["--class-weight", "balanced"],
                                                      "class-weight"),
                              ("--sampler balanced", ["--sampler", "balanced"], "sampler")):
        run = work / f"run-imbalanced-{slug}"
        if not (run / "metrics.json").is_file():
            shutil.rmtree(run, ignore_errors=True)
            done, wall = convnet("train", "--data", str(folder), "--out", str(run), "--no-progress", *flags)
            warned = "--class-weight balanced" in done.stdout + done.stderr
        else:
            wall, warned = None, None
        result["runs"][name] = {**recalls(run), "wall_s": wall, "warned": warned}
        print(name, json.dumps(result["runs"][name]), flush=True)
    return result


def inspected(run: Path) -> dict:
    done, wall = convnet("inspect", str(run), "--json")
    found = json.loads(done.stdout)
    return {"ece": found["calibration"]["ece"], "low": found["calibration"]["low"],
            "high": found["calibration"]["high"], "accuracy": found["test_accuracy"],
            "temperature": found.get("temperature"), "wall_s": wall}


def calibration(work: Path) -> dict:
    run = work / "run-calibrated"
    if not (run / "calibration.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        convnet("train", "--calibrate", "--out", str(run), "--no-progress")
    after = inspected(run)
    kept = run / "calibration.json"
    aside = run.parent / "calibration.json.aside"
    shutil.move(kept, aside)
    try:
        before = inspected(run)
    finally:
        shutil.move(aside, kept)
    inspected(run)  # leave the run's inspect.json as the run is
    return {"run": str(run), "before": before, "after": after}


def unsure(work: Path, run: Path) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    _, _, test_x, _, _ = arrays("fashion-mnist")
    digits = load_digits().images
    foreign = {"digits": np.stack([np.asarray(Image.fromarray(np.rint(d * 255 / 16).astype(np.uint8), "L")
                                              .resize((28, 28), Image.Resampling.LANCZOS)) for d in digits]),
               "noise": np.random.default_rng(0).integers(0, 256, size=(2000, 28, 28), dtype=np.uint8)}

    def top(images: np.ndarray, name: str) -> np.ndarray:
        path = work / f"{name}.npy"
        np.save(path, images)
        done, _ = convnet("predict", str(run), str(path), "--json", "--top-k", "1")
        return np.array([p["probability"] for p in json.loads(done.stdout)])

    p = float(np.quantile(top(test_x, "fmnist-test"), 0.05))
    result = {"run": str(run), "min_confidence": p, "calibrated": (run / "calibration.json").is_file()}
    for name, images in foreign.items():
        result[name] = float((top(images, name) < p).mean())
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("kind", choices=["label-errors", "imbalance", "calibration", "unsure"])
    p.add_argument("run", type=Path, nargs="?", help="unsure: the run to ask")
    p.add_argument("--planting-seed", type=int, default=1)
    p.add_argument("--folds", type=int, default=5)
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    if a.kind == "label-errors":
        result = label_errors(a.workdir, a.planting_seed, a.folds)
    elif a.kind == "imbalance":
        result = imbalance(a.workdir)
    elif a.kind == "calibration":
        result = calibration(a.workdir)
    else:
        if a.run is None:
            p.error("unsure needs the RUN to ask")
        result = unsure(a.workdir, a.run)
    name = f"trust-{a.kind}" + (f"-{a.planting_seed}" if a.kind == "label-errors" else "")
    (a.workdir / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "not_planted"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
