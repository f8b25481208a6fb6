"""Active learning, simulated: does labelling what `convnet suggest` ranks first beat labelling at random?

    python benchmarks/suggest_sim.py OUT.json [--methods badge,random] [--seeds 0,1,2] [--score test|judge]
                                     [--pool] [--step 100] [--rounds 8] [--plot FILE.png] [--report]

Fashion-MNIST, the default training (`convnet train`'s, sized to the data, validation held out of the labels):
start from 200 labelled training images drawn at random (stratified, by the seed), then 8 rounds that each add
100 more, chosen by the method from the rest of the training images (the pool; their labels are read only once a
method has chosen them, as a person would label them), retraining from scratch each round. With `--pool` each run
also learns from the rest of those images as its unlabelled pool (`convnet train --unlabeled`, as README's loop does),
and the suggestions come from that model. Each model is scored on
`--score`: the 10,000 test images (the measurement), or 2,000 training images that are never labelled nor in the
pool (`judge`: how the ranking method was chosen). Writes every round to OUT.json and prints accuracy by labels;
a round already in OUT.json is not trained again where its model is not needed (the last round, or `random`'s);
`--report` trains nothing and prints (and plots) what OUT.json holds.
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

from convnet.data.dataset import Dataset, Split
from convnet.data.named import load_dataset
from convnet.models.engine import make_engine
from convnet.models.inference import infer
from convnet.training.config import TrainRequest
from convnet.training.run import train_run
from convnet.use.suggest import predict_with_features, rank

START = 200


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--methods", default="badge,random")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--score", choices=("test", "judge"), default="test")
    p.add_argument("--pool", action="store_true", help="train with the other images as the unlabelled pool")
    p.add_argument("--step", type=int, default=100, help="labels added each round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--plot", type=Path, default=None, help="also draw accuracy against labels, a line per method")
    p.add_argument("--report", action="store_true", help="train nothing: the table (and plot) of OUT.json")
    a = p.parse_args()
    data = load_dataset("fashion-mnist")
    x, y = data.train.images, data.train.labels.numpy()
    engine = make_engine("cpu")
    rows = json.loads(a.out.read_text()) if a.out.is_file() else []
    rest, judge = judge_split(y)
    if a.score == "test":
        score_x, score_y = data.test.images, data.test.labels
    else:
        score_x, score_y = x[torch.from_numpy(judge)], torch.from_numpy(y[judge])
    empty = Split(x[:0], data.train.labels[:0])
    done = {_key(r) for r in rows}
    for seed in () if a.report else (int(s) for s in a.seeds.split(",")):
        for method in a.methods.split(","):
            labelled = train_test_split(rest, train_size=START, random_state=seed, stratify=y[rest])[0]
            for round_ in range(a.rounds + 1):
                key = (a.score, a.pool, method, seed, len(labelled))
                last = round_ == a.rounds
                if round_ == 0 and key not in done:  # every method starts from the same labels: one run for all
                    same = [r for r in rows if _key(r)[:2] == (a.score, a.pool) and _key(r)[3:] == key[3:]]
                    if same:
                        rows.append({**same[0], "method": method})
                        done.add(key)
                pool = np.setdiff1d(rest, labelled)
                if key not in done or not (last or method == "random"):  # to measure, or for the next picks
                    start = time.perf_counter()
                    split = Split(x[torch.from_numpy(labelled)], torch.from_numpy(y[labelled]))
                    dataset = Dataset("fashion-mnist", data.spec, split, empty, "",
                                      pool=x[torch.from_numpy(pool)] if a.pool else None)
                    trained = train_run(TrainRequest({"seed": seed}, dataset), engine=engine)
                    model = trained.result.model
                    logits = infer(model, score_x, engine=engine, tta=trained.config.tta)
                    accuracy = float((logits.argmax(1) == score_y).float().mean())
                    if key not in done:
                        rows.append({"score": a.score, "pool": a.pool, "method": method, "seed": seed,
                                     "labels": len(labelled), "accuracy": accuracy,
                                     "seconds": time.perf_counter() - start})
                        done.add(key)
                        print(json.dumps(rows[-1]), flush=True)
                        a.out.write_text(json.dumps(rows, indent=1))
                if not last:  # the next labels: chosen from the pool by the method (random's need no model)
                    blank = np.zeros((len(pool), 1))
                    probs, feats = (blank, blank) if method == "random" else predict_with_features(
                        _Loaded(model, engine, trained.config.tta), x[torch.from_numpy(pool)])  # type: ignore
                    labelled = np.concatenate([labelled, pool[rank(probs, feats, a.step, method=method,
                                                                   seed=seed + round_)]])
    sizes = [START + a.step * r for r in range(a.rounds + 1)]
    methods = a.methods.split(",")
    print("| labels | " + " | ".join(methods) + " |")
    print("| --- |" + " --- |" * len(methods))
    for n in sizes:
        cells = []
        for m in methods:
            found = [r["accuracy"] for r in rows if _key(r)[:3] == (a.score, a.pool, m) and r["labels"] == n]
            cells.append(f"{statistics.fmean(found):.4f} ({min(found):.4f}-{max(found):.4f})" if found else "")
        print(f"| {n:,} | " + " | ".join(cells) + " |")
    if a.plot is not None:
        plot([r for r in rows if _key(r)[1] == a.pool], a.score, methods, sizes, a.plot)
    return 0


def judge_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of Fashion-MNIST's training images that may be labelled or pooled, and the 2,000 (stratified, fixed)
    that never are: the judge images methods are chosen on (here and in pool_choose.py)."""
    return train_test_split(np.arange(len(y)), test_size=2_000, random_state=1234, stratify=y)

def _key(row: dict) -> tuple:
    """A round's identity in OUT.json: score, pool, method, seed, labels (rows before `--pool` had none)."""
    return row["score"], row.get("pool", False), row["method"], row["seed"], row["labels"]


def plot(rows: list[dict], score: str, methods: list[str], sizes: list[int], out: Path) -> None:
    """Mean accuracy against labels, a line per method, the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for m in methods:
        found = [[r["accuracy"] for r in rows if (r["score"], r["method"], r["labels"]) == (score, m, n)]
                 for n in sizes]
        shown = [(n, f) for n, f in zip(sizes, found, strict=True) if f]
        ax.plot([n for n, _ in shown], [statistics.fmean(f) for _, f in shown], marker="o", label=m)
        ax.fill_between([n for n, _ in shown], [min(f) for _, f in shown], [max(f) for _, f in shown], alpha=0.2)
    ax.set_xlabel("labelled images")
    ax.set_ylabel(f"{score} accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


class _Loaded:
    """What :func:`predict_with_features` reads of a loaded run: a model, its engine, its flips."""

    def __init__(self, model: torch.nn.Module, engine: object, tta: bool) -> None:
        self.model, self.engine, self.tta = model, engine, tta


if __name__ == "__main__":
    sys.exit(main())
