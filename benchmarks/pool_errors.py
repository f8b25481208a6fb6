"""Where a pool run's accuracy goes: its pseudo-labels' mistakes, read after the fact.

    python benchmarks/pool_errors.py WORKDIR [--n 1000] [--seeds 0,1,2] [--against RUN ...]

Reads the pool runs `few_labels.py WORKDIR` wrote (WORKDIR/pool-N-S) and predicts each run's pool (the
training images its `--subset N --seed S` left out) with its kept weights, as the teacher sees them (no
test-time flips): the share of the pool it is sure of at 0.8, 0.95 and 0.99 and how often it is right there,
the confidently wrong pairs it would teach (true -> taught, at 0.95), and its test recall per class beside the
runs named by `--against` (e.g. plain `convnet train` runs on all the labels). A diagnosis: the pool's hidden
labels and the test split are read to explain a result, never to choose a method (pool_choose.py does that).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

from convnet.data.named import load_dataset
from convnet.use.loadrun import load_model, torch_probabilities


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--against", type=Path, nargs="*", default=[])
    a = p.parse_args()
    data = load_dataset("fashion-mnist")
    classes = data.spec.classes
    runs: list[Path] = []
    for seed in map(int, a.seeds.split(",")):
        folder = a.workdir / f"pool-{a.n}-{seed}"
        rows = data.draw(a.n, seed, rest_as_pool=True).pool_index
        truth = data.train.labels.numpy()[rows]
        model, _ = load_model(folder)
        probs = torch_probabilities(model, data.train.images[torch.from_numpy(rows)], tta=False)
        taught, confidence = probs.argmax(1), probs.max(1)
        right = taught == truth
        sure = {t: f"{(confidence >= t).mean():.1%} sure, {right[confidence >= t].mean():.1%} right"
                for t in (0.8, 0.95, 0.99)}
        wrong = ~right & (confidence >= 0.95)
        pairs = collections.Counter(zip(truth[wrong].tolist(), taught[wrong].tolist(), strict=True)).most_common(6)
        print(f"seed {seed}: pool {right.mean():.4f} right; " + "; ".join(f">= {t}: {v}" for t, v in sure.items()))
        print(f"  {int(wrong.sum()):,} taught wrong at >= 0.95, most often: "
              + ", ".join(f"{classes[t]} -> {classes[w]} {c}" for (t, w), c in pairs))
        runs.append(folder)
    recalls = {run.name: json.loads((run / "metrics.json").read_text())["test"]["report"]
               for run in [*runs, *a.against]}
    print("| test recall | " + " | ".join(recalls) + " |")
    print("| --- |" + " --- |" * len(recalls))
    for name in classes:
        print(f"| {name} | " + " | ".join(f"{r[name]['recall']:.3f}" for r in recalls.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
