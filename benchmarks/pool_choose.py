"""How the pool's method is chosen: Fashion-MNIST, N labels, the other training images as the pool, scored on
2,000 training images that are never labelled nor in the pool (never the test split, never the pool's labels).

    python benchmarks/pool_choose.py OUT.json NAME [--n 1000] [--seeds 0,1] [--set semi.NAME=VALUE ...]
                                     [--train NAME=VALUE ...]

NAME labels the arm in OUT.json. `--set` changes one of `convnet.training.semi`'s constants for the arm (a
candidate method), `--train` one of the run's settings as `convnet train`'s flags name them (`val_split=0`).
Every run is the default training (`convnet train`'s, sized to the data) through `train_run`, the path `convnet
train` takes. Each run also records the judge accuracy with its batch norm's statistics recomputed on the
run's own training images, labelled and pool, unaugmented (`accuracy_bn`). The judge images are the ones
`suggest_sim.py --score judge` holds out. A run already in OUT.json is not repeated.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from suggest_sim import judge_split
from torch import nn

from convnet.data.dataset import Dataset, Split
from convnet.data.named import load_dataset
from convnet.models.engine import Engine, make_engine
from convnet.models.inference import infer
from convnet.training import semi
from convnet.training.config import TrainRequest
from convnet.training.run import train_run


def recalibrated(model: nn.Module, images: torch.Tensor, engine: Engine) -> nn.Module:
    """A copy of ``model`` whose batch norm's running statistics are the plain mean over ``images``."""
    m = copy.deepcopy(model)
    norms = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for b in norms:
        b.reset_running_stats()
        b.momentum = None  # a cumulative average over the batches
    m.train()
    with torch.no_grad():
        for chunk in images.split(512):
            m(engine.batch(chunk))
    return m.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--set", action="append", default=[], metavar="semi.NAME=VALUE")
    p.add_argument("--train", action="append", default=[], metavar="NAME=VALUE")
    a = p.parse_args()
    for item in a.set:
        key, value = item.split("=", 1)
        attr = key.removeprefix("semi.")
        if not hasattr(semi, attr):
            raise SystemExit(f"--set {item}: convnet.training.semi has no {attr}")
        setattr(semi, attr, ast.literal_eval(value))
    overrides = {k: ast.literal_eval(v) for k, v in (t.split("=", 1) for t in a.train)}
    data = load_dataset("fashion-mnist")
    x, y = data.train.images, data.train.labels.numpy()
    rest, judge = judge_split(y)
    judge_x, judge_y = x[torch.from_numpy(judge)], torch.from_numpy(y[judge])
    engine = make_engine("cpu")

    def judged(model: nn.Module, tta: bool) -> float:
        return float((infer(model, judge_x, engine=engine, tta=tta).argmax(1) == judge_y).float().mean())

    rows = json.loads(a.out.read_text()) if a.out.is_file() else []
    for seed in map(int, a.seeds.split(",")):
        if any((r["name"], r["n"], r["seed"]) == (a.name, a.n, seed) for r in rows):
            continue
        labelled, pool = (np.sort(r) for r in train_test_split(rest, train_size=a.n, random_state=seed,
                                                                stratify=y[rest]))
        empty = Split(x[:0], data.train.labels[:0])
        split = Split(x[torch.from_numpy(labelled)], torch.from_numpy(y[labelled]))
        dataset = Dataset("fashion-mnist", data.spec, split, empty, "", pool=x[torch.from_numpy(pool)])
        start = time.perf_counter()
        trained = train_run(TrainRequest({"seed": seed, **overrides}, dataset), engine=engine)
        seconds = time.perf_counter() - start
        model, tta = trained.result.model, trained.config.tta
        accuracy = judged(model, tta)
        accuracy_bn = judged(recalibrated(model, torch.cat([split.images, dataset.pool]), engine), tta)  # type: ignore[list-item]
        last = trained.result.history[-1]
        rows.append({"name": a.name, "n": a.n, "seed": seed, "set": a.set, "train": a.train, "accuracy": accuracy,
                     "accuracy_bn": accuracy_bn, "kept": (trained.result.best or {}).get("epoch"),
                     "epochs": len(trained.result.history), "pool_used": getattr(last, "pool_used", None),
                     "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        a.out.write_text(json.dumps(rows, indent=1))
    print("| arm | N | judge accuracy, mean (per seed) | BN recomputed |")
    print("| --- | --- | --- | --- |")
    for name, n in dict.fromkeys((r["name"], r["n"]) for r in rows):
        found = [r for r in rows if (r["name"], r["n"]) == (name, n)]
        print(f"| {name} | {n:,} | {statistics.fmean(r['accuracy'] for r in found):.4f} "
              f"({', '.join(format(r['accuracy'], '.4f') for r in found)}) | "
              f"{statistics.fmean(r['accuracy_bn'] for r in found):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
