"""Few labels: N labelled Fashion-MNIST training images (a stratified draw by the seed), with and without the
other 60,000 - N as an unlabelled pool, scored on the 10,000 test images; each command in its own process.

    python benchmarks/few_labels.py WORKDIR [--sizes 100,1000] [--seeds 0,1,2] [--arms alone,pool] [--full SEEDS]

Arms: `alone` is `convnet train --subset N --seed S`, `pool` adds `--unlabeled rest`. `--full 0,1,2` also runs
plain `convnet train --seed S` on all 60,000 labelled images (`full`: the defaults, validation held out; the
wall-time yardstick) and `convnet train --seed S --val-split 0` (`full-noval`: the defaults before validation
became one). Every run is appended to WORKDIR/few_labels.json (a run already there is not repeated) and a table
is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"alone": [], "pool": ["--unlabeled", "rest"]}
FULL = {"full": [], "full-noval": ["--val-split", "0"]}


def run(args: list[str], out: Path) -> dict:
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "convnet", "train", *args, "--out", str(out), "--no-progress",
                        "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"convnet train {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    result = json.loads(p.stdout)
    return {"test_accuracy": result["test"]["accuracy"], "kept": result["kept"], "train_seconds": result["seconds"],
            "wall_seconds": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--sizes", default="100,1000")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="alone,pool")
    p.add_argument("--full", default="", metavar="SEEDS")
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    record = a.workdir / "few_labels.json"
    rows = json.loads(record.read_text()) if record.is_file() else []
    done = {(r["arm"], r["n"], r["seed"]) for r in rows}
    jobs = [(arm, n, seed) for n in map(int, a.sizes.split(",")) for seed in map(int, a.seeds.split(","))
            for arm in a.arms.split(",")]
    jobs = [(arm, 60_000, seed) for seed in map(int, filter(None, a.full.split(","))) for arm in FULL] + jobs
    for arm, n, seed in jobs:
        if (arm, n, seed) in done:
            continue
        args = (["--seed", str(seed), *FULL[arm]] if arm in FULL else
                ["--subset", str(n), "--seed", str(seed), *ARMS[arm]])
        row = {"arm": arm, "n": n, "seed": seed, **run(args, a.workdir / f"{arm}-{n}-{seed}")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        record.write_text(json.dumps(rows, indent=1))
    print("| N | arm | test accuracy, mean (min-max) | seeds | wall s, median |")
    print("| --- | --- | --- | --- | --- |")
    for n in sorted({r["n"] for r in rows}):
        for arm in (*FULL, *ARMS):
            found = [r for r in rows if (r["n"], r["arm"]) == (n, arm)]
            if found:
                acc = [r["test_accuracy"] for r in found]
                print(f"| {n:,} | {arm} | {statistics.fmean(acc):.4f} ({min(acc):.4f}-{max(acc):.4f}) | "
                      f"{len(found)} | {statistics.median(r['wall_seconds'] for r in found):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
