"""How much of a small labelled set to hold out for validation, chosen on held-out images only.

    python benchmarks/val_share.py OUT.json [--shares 0,0.1,0.2] [--seeds 0,1,2]

`convnet train` holds out a share of the training images (`--val-split`) and keeps the weights of the epoch that
scores best on them; with few labels that costs training images. For each data set, N and share, the default
recipe (`cpu`, sized to the data) trains on N labelled images, stratified and drawn by the seed, less the share held
out (0: no validation, the last epoch's weights), and the weights it keeps are scored on a fixed set of other
labelled images that no run trains or chooses on: 2,000 other Fashion-MNIST training images; 400 of the 1,000
scikit-learn digits that are not the digits' test images. The test splits are never read. Prints the mean accuracy
over the seeds per share as a Markdown table and writes every run to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from convnet.core.inputspec import InputSpec
from convnet.data.dataset import Dataset, Split
from convnet.data.named import load_dataset
from convnet.models.engine import make_engine
from convnet.models.inference import infer
from convnet.training.config import TrainRequest
from convnet.training.run import train_run

JUDGE = {"fashion-mnist": 2_000, "digits": 400}
SIZES = {"fashion-mnist": (100, 300, 1_000), "digits": (100, 300)}


def pool(name: str) -> tuple[np.ndarray, np.ndarray, InputSpec]:
    """uint8 images (N, 1, H, W) and labels that no test split holds, and their spec."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.rint(d.images * 255 / 16).astype(np.uint8)[:, None]
        rows, _ = train_test_split(np.arange(len(images)), test_size=797, random_state=0, stratify=d.target)
        return images[rows], d.target[rows], InputSpec(1, 8, 8, tuple(map(str, range(10))), hflip=False)
    data = load_dataset("fashion-mnist")
    return data.train.images.numpy(), data.train.labels.numpy(), data.spec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shares", default="0,0.1,0.2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default="fashion-mnist,digits")
    a = p.parse_args()
    engine = make_engine("cpu")
    rows = json.loads(a.out.read_text()) if a.out.is_file() else []
    done = {(r["dataset"], r["n"], r["share"], r["seed"]) for r in rows}
    for name in a.datasets.split(","):
        x, y, spec = pool(name)
        rest, judge = train_test_split(np.arange(len(y)), test_size=JUDGE[name], random_state=1234, stratify=y)
        judge_x, judge_y = torch.from_numpy(x[judge]), torch.from_numpy(y[judge])
        for n in SIZES[name]:
            for seed in (int(s) for s in a.seeds.split(",")):
                drawn = train_test_split(rest, train_size=n, random_state=seed, stratify=y[rest])[0]
                split = Split(torch.from_numpy(x[drawn]), torch.from_numpy(y[drawn].astype(np.int64)))
                empty = Split(split.images[:0], split.labels[:0])
                for share in (float(s) for s in a.shares.split(",")):
                    if (name, n, share, seed) in done:
                        continue
                    data = Dataset(name, spec, split, empty, "")
                    start = time.perf_counter()
                    trained = train_run(TrainRequest({"seed": seed, "val_split": share}, data), engine=engine)
                    logits = infer(trained.result.model, judge_x, engine=engine, tta=trained.config.tta)
                    accuracy = float((logits.argmax(1) == judge_y).float().mean())
                    best = trained.result.best
                    rows.append({"dataset": name, "n": n, "share": share, "seed": seed, "accuracy": accuracy,
                                 "kept_epoch": best["epoch"] if best else len(trained.result.history),
                                 "seconds": time.perf_counter() - start})
                    print(json.dumps(rows[-1]), flush=True)
                    a.out.write_text(json.dumps(rows, indent=1))
    shares = [float(s) for s in a.shares.split(",")]
    print("| data set | N | " + " | ".join(f"--val-split {s:g}" for s in shares) + " |")
    print("| --- | --- |" + " --- |" * len(shares))
    for name in a.datasets.split(","):
        for n in SIZES[name]:
            cells = []
            for s in shares:
                found = [r["accuracy"] for r in rows if (r["dataset"], r["n"], r["share"]) == (name, n, s)]
                cells.append(f"{statistics.fmean(found):.4f} (n={len(found)})" if found else "")
            print(f"| {name} | {n:,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
