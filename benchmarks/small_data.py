"""Small data, as a user meets it: `convnet train --data DIR` with no tuning flags against scikit-learn's SVC on raw
pixels with C and gamma tuned by GridSearchCV, on the same training images and the same test images.

    python benchmarks/small_data.py WORKDIR [--sizes 100,300,1000] [--seeds 0,1,2] [--datasets fashion-mnist,digits]

For each data set, N and seed: a folder WORKDIR/DATASET-N-SEED/ with train/ (N images, stratified, drawn by the
seed) and test/ (Fashion-MNIST: all 10,000 test images; digits: a fixed 797 of scikit-learn's 1,797 images, the
other 1,000 being the pool the training images are drawn from), written as PNG files. convnet trains on the folder
in its own process, as a user runs it (digits with --no-hflip, as a user would: a mirrored digit is another
digit), and its test accuracy is read from the run's metrics.json; the SVC is tuned (5-fold, C in 0.1..100, gamma
'scale' or 1e-3..1e-1) and scored on the same images. Prints the mean over the seeds of both and the wall time of
each, as a Markdown table, and writes every run to WORKDIR/small_data.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_TEST = 797


def arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """uint8 images (N, H, W) and labels: the training pool and the test set, and the class names."""
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.rint(d.images * 255 / 16).astype(np.uint8)
        pool, test = train_test_split(np.arange(len(images)), test_size=DIGITS_TEST, random_state=0,
                                      stratify=d.target)
        return images[pool], d.target[pool], images[test], d.target[test], [str(i) for i in range(10)]
    from convnet.data.named import load_dataset

    data = load_dataset("fashion-mnist")
    return (data.train.images[:, 0].numpy(), data.train.labels.numpy(), data.test.images[:, 0].numpy(),
            data.test.labels.numpy(), [c.replace("/", "-") for c in data.classes])


def write_folder(folder: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / classes[int(label)] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(path)


def svc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> tuple[float, float]:
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    start = time.perf_counter()
    grid = {"C": [0.1, 1, 10, 100], "gamma": ["scale", 1e-3, 1e-2, 1e-1]}
    search = GridSearchCV(SVC(), grid, cv=5, n_jobs=2).fit(train_x.reshape(len(train_x), -1) / 255.0, train_y)
    accuracy = float(search.score(test_x.reshape(len(test_x), -1) / 255.0, test_y))
    return accuracy, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--sizes", default="100,300,1000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default="fashion-mnist,digits")
    a = p.parse_args()
    from sklearn.model_selection import train_test_split

    rows = []
    for name in a.datasets.split(","):
        pool_x, pool_y, test_x, test_y, classes = arrays(name)
        for n in (int(x) for x in a.sizes.split(",")):
            results = []
            for seed in (int(x) for x in a.seeds.split(",")):
                rows_n = np.arange(len(pool_y)) if n >= len(pool_y) else train_test_split(
                    np.arange(len(pool_y)), train_size=n, random_state=seed, stratify=pool_y)[0]
                folder = a.workdir / f"{name}-{n}-{seed}"
                if not (folder / "test").is_dir():
                    write_folder(folder / "train", pool_x[rows_n], pool_y[rows_n], classes)
                    write_folder(folder / "test", test_x, test_y, classes)
                run = a.workdir / f"run-{name}-{n}-{seed}"
                command = [sys.executable, "-m", "convnet", "train", "--data", str(folder), "--out", str(run),
                           "--no-progress", "--seed", str(seed), *(["--no-hflip"] if name == "digits" else [])]
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    return 1
                sizing = next((line for line in done.stdout.splitlines() if "epochs of" in line), "")
                ours = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
                theirs, svc_seconds = svc(pool_x[rows_n], pool_y[rows_n], test_x, test_y)
                results.append({"dataset": name, "n": n, "seed": seed, "convnet": ours, "convnet_wall_s": wall,
                                "svc": theirs, "svc_s": svc_seconds, "sizing": sizing})
                print(json.dumps(results[-1]), flush=True)
            rows += results
    (a.workdir / "small_data.json").write_text(json.dumps(rows, indent=1))
    print("| data set | N | convnet (mean of seeds) | tuned SVC | convnet wall time | SVC time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in a.datasets.split(","):
        for n in (int(x) for x in a.sizes.split(",")):
            r = [x for x in rows if x["dataset"] == name and x["n"] == n]
            mean = {k: statistics.fmean(x[k] for x in r) for k in ("convnet", "svc", "convnet_wall_s", "svc_s")}
            spread = {k: (min(x[k] for x in r), max(x[k] for x in r)) for k in ("convnet", "svc")}
            ours, theirs = spread["convnet"], spread["svc"]
            print(f"| {name} | {n:,} | {mean['convnet']:.4f} ({ours[0]:.4f}-{ours[1]:.4f}) "
                  f"| {mean['svc']:.4f} ({theirs[0]:.4f}-{theirs[1]:.4f}) | {mean['convnet_wall_s']:.0f} s "
                  f"| {mean['svc_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
