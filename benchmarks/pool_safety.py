"""A pool of the wrong things, and a small data set: does learning from unlabelled images ever make a run worse?

    python benchmarks/pool_safety.py OUT.json [--seeds 0] [--cases foreign,digits] [--arms alone,pool,...]

`foreign`: Fashion-MNIST, 1,000 labels (`Dataset.draw`, the stratified draw `convnet train --subset 1000 --seed S`
makes), the other 59,000 training images as the pool, then the same pool with 30 % of it replaced by images of no
Fashion-MNIST class (scikit-learn's 1,797 digits upscaled to 28x28, each used about 10 times), against the labels
alone; scored on the 10,000 test images. `digits`: scikit-learn's digits, 797 set aside as the test images, 50 of
the other 1,000 labelled (stratified, by the seed) and the remaining 950 the pool, against the 50 alone. Every run
is the default training (`convnet train`'s, sized to the data, validation held out of the labels) through
`train_run`, the path `convnet train` takes. Writes every run to OUT.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from convnet.core.inputspec import InputSpec
from convnet.data.dataset import Dataset, Split
from convnet.data.named import load_dataset
from convnet.models.engine import make_engine
from convnet.models.inference import infer
from convnet.training.config import TrainRequest
from convnet.training.run import train_run

FOREIGN_SHARE = 0.3


def digits_images(size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (N, 1, H, W), 8x8 or upscaled to ``size`` (light on dark, as Fashion-MNIST)."""
    d = load_digits()
    images = np.rint(d.images * 255 / 16).astype(np.uint8)
    if size is not None:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])
    return images[:, None], d.target


def score(dataset: Dataset, seed: int, engine: object) -> tuple[float, float]:
    start = time.perf_counter()
    trained = train_run(TrainRequest({"seed": seed}, dataset), engine=engine)
    logits = infer(trained.result.model, dataset.test.images, engine=engine, tta=trained.config.tta)
    return float((logits.argmax(1) == dataset.test.labels).float().mean()), time.perf_counter() - start


def cases(name: str, seed: int) -> dict[str, Dataset]:
    if name == "foreign":
        data = load_dataset("fashion-mnist")
        clean = data.draw(1_000, seed, rest_as_pool=True)
        assert clean.pool is not None
        pool = clean.pool.clone()
        rng = np.random.default_rng(seed)
        swap = rng.choice(len(pool), round(FOREIGN_SHARE * len(pool)), replace=False)
        digits, _ = digits_images(28)
        pool[torch.from_numpy(swap)] = torch.from_numpy(digits[rng.integers(0, len(digits), len(swap))])
        return {"alone": replace(clean, pool=None, pool_record=None, pool_index=None), "pool": clean,
                "pool 30% foreign": replace(clean, pool=pool, pool_record={"path": "30% digits", "images": len(pool)},
                                            pool_index=None)}
    images, labels = digits_images()
    rest, test = train_test_split(np.arange(len(images)), test_size=797, random_state=0, stratify=labels)
    labelled, pool = train_test_split(rest, train_size=50, random_state=seed, stratify=labels[rest])
    spec = InputSpec(1, 8, 8, tuple(map(str, range(10))), hflip=False)

    def split(rows: np.ndarray) -> Split:
        return Split(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]))

    alone = Dataset("digits", spec, split(labelled), split(test), "")
    return {"alone": alone, "pool": replace(alone, pool=torch.from_numpy(images[pool]),
                                            pool_record={"path": "digits", "images": len(pool)})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seeds", default="0")
    p.add_argument("--cases", default="foreign,digits")
    p.add_argument("--arms", default="", help="only these arms (e.g. 'pool 30%% foreign'; default: all)")
    a = p.parse_args()
    engine = make_engine("cpu")
    rows = json.loads(a.out.read_text()) if a.out.is_file() else []
    for name in a.cases.split(","):
        for seed in map(int, a.seeds.split(",")):
            for arm, dataset in cases(name, seed).items():
                if a.arms and arm not in a.arms.split(","):
                    continue
                if any((r["case"], r["arm"], r["seed"]) == (name, arm, seed) for r in rows):
                    continue
                accuracy, seconds = score(dataset, seed, engine)
                rows.append({"case": name, "arm": arm, "seed": seed, "accuracy": accuracy, "seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
                a.out.write_text(json.dumps(rows, indent=1))
    print("| case | arm | test accuracy, mean (min-max) | seeds |")
    print("| --- | --- | --- | --- |")
    for name in dict.fromkeys(r["case"] for r in rows):
        for arm in dict.fromkeys(r["arm"] for r in rows if r["case"] == name):
            acc = [r["accuracy"] for r in rows if (r["case"], r["arm"]) == (name, arm)]
            print(f"| {name} | {arm} | {statistics.fmean(acc):.4f} ({min(acc):.4f}-{max(acc):.4f}) | {len(acc)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
