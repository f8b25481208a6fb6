"""The few-labels loop on a real folder, as a user runs it: scikit-learn's handwritten digits written as PNG files.

    python benchmarks/digits_loop.py WORKDIR [--seed 0]

WORKDIR/digits/test/ holds 797 digits (a stratified draw, the same for every seed), WORKDIR/digits/train/ 50 of
the other 1,000 (5 per class, drawn by the seed), WORKDIR/unlabelled/ the remaining 950 with their labels hidden
(in a CSV beside the folder, read only to "label" what convnet suggests). Then, each command in its own process:

    convnet train --data digits --no-hflip --out runs/labels              # the 50 labels alone
    convnet train --data digits --no-hflip --unlabeled unlabelled --out runs/pool
    convnet suggest runs/pool unlabelled --n 50 --csv next.csv           # label these: moved into digits/train/
    convnet train --data digits --no-hflip --unlabeled unlabelled --out runs/pool-100

and, to compare, 50 more picked at random instead. Prints each run's test accuracy and wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def convnet(*args: str, cwd: Path) -> float:
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "convnet", *args, "--no-progress"], cwd=cwd, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SystemExit(f"convnet {' '.join(args)}:\n{p.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    work = a.workdir / f"seed{a.seed}"
    shutil.rmtree(work, ignore_errors=True)
    d = load_digits()
    images = np.rint(d.images * 255 / 16).astype(np.uint8)
    rest, test = train_test_split(np.arange(len(images)), test_size=797, random_state=0, stratify=d.target)
    labelled, pool = train_test_split(rest, train_size=50, random_state=a.seed, stratify=d.target[rest])
    hidden = {}
    for part, rows in (("digits/test", test), ("digits/train", labelled), ("unlabelled", pool)):
        for i in rows:
            folder = work / part / (str(d.target[i]) if part.startswith("digits") else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
            if part == "unlabelled":
                hidden[f"{i:04d}.png"] = int(d.target[i])
    results = []

    def train(name: str, *extra: str) -> None:
        seconds = convnet("train", "--data", "digits", "--no-hflip", "--seed", str(a.seed), *extra,
                          "--out", f"runs/{name}", cwd=work)
        metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
        results.append({"run": name, "labels": sum(1 for _ in (work / "digits/train").rglob("*.png")),
                        "test_accuracy": metrics["test"]["accuracy"], "wall_seconds": round(seconds, 1)})
        print(json.dumps(results[-1]), flush=True)

    def label(files: list[str]) -> None:  # a person labels them: each file into its class folder
        for name in files:
            target = work / "digits/train" / str(hidden[name])
            (work / "unlabelled" / name).rename(target / name)

    train("labels")
    train("pool", "--unlabeled", "unlabelled")
    start = time.perf_counter()
    convnet("suggest", "runs/pool", "unlabelled", "--n", "50", "--csv", "next.csv", cwd=work)
    print(json.dumps({"suggest_seconds": round(time.perf_counter() - start, 1)}), flush=True)
    with open(work / "next.csv", newline="") as f:
        suggested = [Path(row["path"]).name for row in csv.DictReader(f)]
    keep = work.with_name(work.name + "-random")  # the same start, 50 random labels instead
    shutil.copytree(work, keep)
    label(suggested)
    train("pool-suggested", "--unlabeled", "unlabelled")
    rng = np.random.default_rng(a.seed)
    work_random, work = keep, keep
    label(list(rng.choice(sorted(p.name for p in (work_random / "unlabelled").iterdir()), 50, replace=False)))
    train("pool-random", "--unlabeled", "unlabelled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
