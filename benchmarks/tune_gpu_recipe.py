"""Choose the GPU recipes on a validation split, then measure the chosen ones on the test set.

``sweep``: each candidate trains on 90 % of the training images (seed 0) and is scored
once, at the end, on the other 10 % (stratified): never on the test set. The candidate
with the best validation accuracy among those that train in at most ``--budget`` seconds
is the ``gpu`` recipe; ``--best`` candidates (no time limit beyond 2 minutes) compete for
the ``best`` recipe the same way.

``measure``: the picked settings, trained on all 60,000 training images with seeds
0..N-1, scored on the 10,000 test images: mean ± std of test accuracy and of training
seconds (the loop's own clock).

Usage: PYTHONPATH=src python3 benchmarks/tune_gpu_recipe.py sweep|measure [DATA_DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace

import torch

from convnet.data.dataset import split_validation
from convnet.data.named import load_dataset
from convnet.models.engine import make_engine
from convnet.models.networks import AirNet, register_model
from convnet.training.loop import train
from convnet.training.recipes import recipe
from convnet.trust.scoring import score_split

# one more width to try, registered for this process only
register_model("airnet-64-256-256", "airnet with widths 64-256-256")(lambda n, c, s: AirNet(n, c, (64, 256, 256)))

GPU = recipe("gpu")
CANDIDATES = {
    "airnet e10": replace(GPU, epochs=10),
    "airnet e14": replace(GPU, epochs=14),
    "airnet e18": replace(GPU, epochs=18),
    "airnet e14 bs1024 lr0.3": replace(GPU, epochs=14, batch_size=1024, lr=0.3),
    "airnet e14 ls0.2": replace(GPU, epochs=14, label_smoothing=0.2),
    "airnet e14 shift3": replace(GPU, epochs=14, translate_px=3),
    "airnet e14 ema0.99": replace(GPU, epochs=14, ema=0.99),
    "airnet-64-256-256 e12": replace(GPU, model="airnet-64-256-256", epochs=12),
}
BEST = recipe("best")
BEST_CANDIDATES = {
    "airnet-wide e40": replace(BEST, epochs=40),
    "airnet-wide e70": replace(BEST, epochs=70),
}


def sweep(ds, candidates, budget: float, device: str) -> str:  # type: ignore[no-untyped-def]
    engine = make_engine(device)
    fit, val = split_validation(ds.train, 0.1, 0)
    rows = []
    for name, config in candidates.items():
        result = train(replace(config, seed=0), fit, ds.spec, engine=engine)
        acc = score_split(result.model, val, engine, config.tta).accuracy
        rows.append((name, acc, result.seconds))
        print(f"sweep {name:<28} val {acc:.4f}  {result.seconds:6.1f} s  graphed={result.graphed}", flush=True)
    fitting = [r for r in rows if r[2] <= budget] or [min(rows, key=lambda r: r[2])]
    pick = max(fitting, key=lambda r: r[1])
    print(f"picked {pick[0]} (val {pick[1]:.4f}, {pick[2]:.1f} s; budget {budget} s)", flush=True)
    return pick[0]


def measure(ds, name: str, config, seeds: int, device: str) -> dict:  # type: ignore[no-untyped-def]
    engine = make_engine(device)
    accs, secs = [], []
    for seed in range(seeds):
        t0 = time.perf_counter()
        result = train(replace(config, seed=seed), ds.train, ds.spec, engine=engine)
        accs.append(score_split(result.model, ds.test, engine, config.tta).accuracy)
        secs.append(result.seconds)
        print(f"measure {name} seed {seed}: test {accs[-1]:.4f}, training {secs[-1]:.2f} s "
              f"(call {time.perf_counter() - t0:.1f} s)", flush=True)
    out = {"name": name, "config": asdict(config), "accuracies": accs, "seconds": secs,
           "mean_accuracy": statistics.fmean(accs), "std_accuracy": statistics.stdev(accs) if seeds > 1 else 0.0,
           "mean_seconds": statistics.fmean(secs), "std_seconds": statistics.stdev(secs) if seeds > 1 else 0.0,
           "device": engine.describe()["device"], "torch": torch.__version__, "cuda": torch.version.cuda}
    print("RESULT " + json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("sweep", "measure", "all"))
    p.add_argument("data_dir", nargs="?")
    p.add_argument("--budget", type=float, default=4.6)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--best-seeds", type=int, default=0)
    p.add_argument("--gpu-pick", default=None)
    p.add_argument("--best-pick", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--best-sweep", action="store_true", help="also sweep the best-recipe candidates")
    a = p.parse_args()
    ds = load_dataset("fashion-mnist", a.data_dir)
    gpu_pick, best_pick = a.gpu_pick, a.best_pick
    if a.what in ("sweep", "all"):
        gpu_pick = sweep(ds, CANDIDATES, a.budget, a.device)
        if a.best_sweep:
            best_pick = sweep(ds, BEST_CANDIDATES, 120.0, a.device)
    if a.what in ("measure", "all"):
        if gpu_pick:
            measure(ds, gpu_pick, CANDIDATES[gpu_pick], a.seeds, a.device)
        if best_pick and a.best_seeds:
            measure(ds, best_pick, BEST_CANDIDATES[best_pick], a.best_seeds, a.device)


if __name__ == "__main__":
    main()
