"""How long a small data set should train: the sweep behind the rule in `convnet.training.config.size_to_data`.

    python benchmarks/size_rule.py [--sizes 50,100,300,1000,2000] [--images 0,2500,5000,10000,20000]
                                   [--seeds 0,1] [--datasets fashion-mnist,digits] [--json OUT]

Trains the default recipe (`cpu`) on stratified subsets of N training images, each epoch made of as many passes over
the subset as bring it to about IMAGES images (0: one pass, as without sizing), and scores it on a fixed
validation split that is never trained on and is not a test set: 2,000 images of Fashion-MNIST's training set,
or 400 of scikit-learn's digits (of the 1,000 left once a fixed 797 are set aside as the digits' test images).
Prints one row per (data set, N, IMAGES): the mean validation accuracy over the seeds and the training seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from convnet.data.dataset import InputSpec, Split, stratified_split
from convnet.data.named import load_dataset
from convnet.models.engine import make_engine
from convnet.training.loop import train
from convnet.training.recipes import resolve_config
from convnet.trust.evaluation import score_split

DIGITS_TEST = 797  # the digits' own test images, set aside here and never used by the sweep


def digits() -> tuple[Split, Split, InputSpec]:
    """scikit-learn's digits as uint8 8x8 images (ink light on dark): the training pool and the validation split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * 255 / 16).astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    pool, _ = stratified_split(labels, DIGITS_TEST / len(labels), 0, "digits")  # the rest: the digits' test set
    pool_split = Split(images[pool], labels[pool])
    kept, held = stratified_split(pool_split.labels, 0.4, 0, "digits")
    spec = InputSpec(1, 8, 8, tuple(str(i) for i in range(10)), dark_background=True, hflip=False)
    return pool_split.take(torch.from_numpy(kept)), pool_split.take(torch.from_numpy(held)), spec


def fashion() -> tuple[Split, Split, InputSpec]:
    data = load_dataset("fashion-mnist")
    kept, held = stratified_split(data.train.labels, 2000 / len(data.train), 0, "fashion")
    return data.train.take(torch.from_numpy(kept)), data.train.take(torch.from_numpy(held)), data.spec


def subset(pool: Split, n: int, seed: int) -> Split:
    if n >= len(pool):
        return pool
    _, rows = stratified_split(pool.labels, n / len(pool), 1000 + seed, "subset")
    return pool.take(torch.from_numpy(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50,100,300,1000,2000")
    p.add_argument("--images", default="0,2500,5000,10000,20000", help="images per epoch to size to (0: one pass)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--datasets", default="fashion-mnist,digits")
    p.add_argument("--json", default=None, help="also write every run as JSON here")
    a = p.parse_args()
    engine = make_engine("cpu")
    runs = []
    for name in a.datasets.split(","):
        pool, val, spec = digits() if name == "digits" else fashion()
        for n in (int(x) for x in a.sizes.split(",")):
            if n > len(pool):
                continue
            for target in (int(x) for x in a.images.split(",")):
                accs, secs = [], []
                for seed in (int(x) for x in a.seeds.split(",")):
                    repeats = max(1, round(target / n))
                    config = resolve_config("cpu", {"seed": seed, "repeats": repeats}, hflip=spec.hflip)
                    t0 = time.perf_counter()
                    result = train(config, subset(pool, n, seed), spec, engine=engine)
                    secs.append(time.perf_counter() - t0)
                    accs.append(float(score_split(result.model, val, engine, config.tta).accuracy or 0.0))
                    runs.append({"dataset": name, "n": n, "images": target, "repeats": repeats, "seed": seed,
                                 "val_accuracy": accs[-1], "seconds": secs[-1]})
                print(f"{name:<14} N={n:>5} images/epoch={max(n, target):>6} repeats={max(1, round(target / n)):>4} "
                      f"val {statistics.fmean(accs):.4f} (min {min(accs):.4f}, max {max(accs):.4f}) "
                      f"{statistics.fmean(secs):6.1f} s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, engine {engine.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
