"""Does `convnet bench` flatter or hurt the tutorial's loop by timing it inside convnet's process?

    python benchmarks/tutorial_process.py OUT.json [--repeats 5] [--images 12800]

`convnet bench` times the tutorial's `TrainModelInBatches` and `MakePredictions` in its own process, which the
command line has set up to keep freed memory (`convnet.cli.parser.keep_freed_memory`: glibc's malloc thresholds);
a user runs the tutorial's code in a fresh Python, with the C library's defaults. This times the same two jobs of
`convnet bench` (the seed model, Adam at 0.001, batches of 128, the first `--images` training images for one epoch;
predicting the 10,000 test images) both ways, side by side: in this process, set up as the command line does, and in
a spawned process of their own (spawned, not forked, so nothing of this process's allocator is inherited). Warm-up
excluded, the order alternating, medians printed with the CPU's flags; every timing written to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convnet.cli.parser import keep_freed_memory
from convnet.data.named import load_dataset
from convnet.models.engine import cpu_info
from convnet.models.networks import create_model
from convnet.tools.bench import MakePredictions, tutorial_adam


def jobs(images: torch.Tensor, labels: torch.Tensor, test: torch.Tensor,
         weights: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    """`convnet bench`'s two jobs for the tutorial's side, on float tensors scaled once."""
    x, y, x_test = images.float() / 255.0, labels, test.float() / 255.0
    net = create_model("seed")
    net.load_state_dict(weights)
    net.eval()

    def train() -> None:
        torch.manual_seed(42)
        tutorial_adam(create_model("seed"), x, y, 128)

    def predict() -> None:
        torch.cat(MakePredictions(net, x_test, batch_size=128)).argmax(dim=1)

    return {"train": train, "predict": predict}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def own_process(conn: Any, threads: int, data: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor]) -> None:
    """The jobs in a fresh process: times the one each message names, until it is sent None."""
    torch.set_num_threads(threads)
    mine = jobs(*data, weights)
    while (job := conn.recv()) is not None:
        conn.send(timed(mine[job]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=12_800)
    a = p.parse_args()
    keep_freed_memory()  # this process as the command line sets it up
    ds = load_dataset("fashion-mnist")
    data = (ds.train.images[:a.images], ds.train.labels[:a.images], ds.test.images)
    torch.manual_seed(0)
    weights = create_model("seed").state_dict()
    here = jobs(*data, weights)
    context = multiprocessing.get_context("spawn")
    conn, theirs = context.Pipe()
    child = context.Process(target=own_process, args=(theirs, torch.get_num_threads(), data, weights), daemon=True)
    child.start()

    def there(job: str) -> float:
        conn.send(job)
        return float(conn.recv())

    arms: list[tuple[str, Callable[[], float]]] = [
        ("train, in convnet's process", lambda: timed(here["train"])),
        ("train, its own process", lambda: there("train")),
        ("predict, in convnet's process", lambda: timed(here["predict"])),
        ("predict, its own process", lambda: there("predict")),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in arms}
    try:
        for i in range(1 + a.repeats):
            for name, arm in arms if i % 2 == 0 else arms[::-1]:
                t = arm()
                if i:  # the first round warms up
                    times[name].append(t)
    finally:
        conn.send(None)
        child.join(timeout=30)
    counts = {"train": a.images, "predict": len(ds.test)}
    rates = {name: counts[name.split(",")[0]] / statistics.median(ts) for name, ts in times.items()}
    a.out.write_text(json.dumps({"cpu": cpu_info(), "threads": torch.get_num_threads(), "seconds": times,
                                 "images_per_s": rates}, indent=2))
    print(f"cpu {cpu_info()['name']}, flags {' '.join(cpu_info()['flags'])}; {torch.get_num_threads()} threads, "
          f"median of {a.repeats}")
    for name, rate in rates.items():
        print(f"{name:<32}{rate:>10,.0f} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
