"""The tutorial's whole job against convnet's, each command in its own process as a user runs it.

    python benchmarks/whole_job.py OUT.json [--repeats 3] [--precision auto,fp32] [--epochs 2]

The tutorial's script with Adam, `--epochs` epochs, batch 128, then predicting the 10,000 test and 60,000 training
images (`python benchmarks/tutorial_job.py adam 2`), against `convnet train --recipe tutorial --model seed
--optimizer adam --lr 0.001 --epochs 2 --batch-size 128 --seed 42 --val-split 0`, which also scores both splits,
once per `--precision` (auto: what this CPU trains in; fp32: what a CPU without bfloat16 trains in). The arms
rotate within each repeat; the medians of the whole commands' wall times and their ratios are printed with the
CPU's name and flags, and every run written to OUT.json (the tutorial's own training seconds too: `--epochs 15`
gives its Adam-15 job, the yardstick of `convnet bench --target-accuracy 0.895`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convnet.models.engine import cpu_has_bf16, cpu_info

HERE = Path(__file__).resolve().parent
TUTORIAL_SETTINGS = ["--recipe", "tutorial", "--model", "seed", "--optimizer", "adam", "--lr", "0.001",
                     "--batch-size", "128", "--seed", "42", "--val-split", "0"]


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return wall, p.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto,fp32")
    p.add_argument("--epochs", type=int, default=2)
    a = p.parse_args()
    arms = {"tutorial": [sys.executable, str(HERE / "tutorial_job.py"), "adam", str(a.epochs)]}
    for precision in a.precision.split(","):
        arms[f"convnet {precision}"] = [sys.executable, "-m", "convnet", "train", *TUTORIAL_SETTINGS, "--epochs",
                                        str(a.epochs), "--precision", precision, "--no-progress", "--json"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            names = list(arms)
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                cmd = arms[name] + (["--out", str(Path(tmp) / f"{name.replace(' ', '-')}-{i}")]
                                    if name != "tutorial" else [])
                wall, stdout = timed(cmd)
                row = {"arm": name, "repeat": i, "wall_seconds": wall}
                if name != "tutorial":
                    result = json.loads(stdout)
                    row["test_accuracy"] = result["test"]["accuracy"]
                else:
                    row["test_accuracy"] = float(stdout.split("Test  Accuracy : ")[1].split()[0])
                    row["train_seconds"] = float(stdout.split("train_s=")[1].split()[0])
                rows.append(row)
                print(json.dumps(row), flush=True)
    med = {name: statistics.median(r["wall_seconds"] for r in rows if r["arm"] == name) for name in arms}
    info = {"cpu": cpu_info(), "bf16": cpu_has_bf16(), "epochs": a.epochs, "repeats": a.repeats, "rows": rows,
            "median_wall_seconds": med}
    a.out.write_text(json.dumps(info, indent=1))
    print(f"cpu {info['cpu']['name']}, flags {' '.join(info['cpu']['flags'])}; Adam, {a.epochs} epochs, batch 128, "
          f"then both splits predicted; median of {a.repeats} whole commands")
    print("| arm | wall time (s) | x the tutorial's script |")
    print("| --- | --- | --- |")
    for name in arms:
        print(f"| {name} | {med[name]:.1f} | {med['tutorial'] / med[name]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
