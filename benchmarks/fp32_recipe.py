"""How the `cpu-fp32` recipe was chosen: fastnet's widths against its epochs, for CPUs that train in fp32.

    python benchmarks/fp32_recipe.py speed OUT.json [--repeats 3]
    python benchmarks/fp32_recipe.py choose OUT.json WIDTHS EPOCHS [--seed 0] [--pool-first] [--unpadded 0]
                                                              [--recipe cpu]

`speed` times the fp32 training step (channels-last, batches of 128, SGD with Nesterov momentum: the engine and
optimizer of a CPU without bfloat16) of fastnet at each candidate's widths, and of `fastnet-lean` (16-64-128, each
stage's max-pool before its batch norm and ReLU), median of 30 steps after 5 of warm-up, `--repeats` times.
`choose` trains the `cpu` recipe in fp32 with fastnet at WIDTHS (e.g. 16,64,128) for EPOCHS on Fashion-MNIST's
default validation split (10 % of the training images, stratified by --seed) and records the kept epoch's
validation accuracy: the test split is never read; `--pool-first` builds the candidate as `fastnet-lean` is,
`--unpadded 0` (or `1`, `0,1`...) leaves those stages' convolutions unpadded (28x28 images: maps of 26, 13, 6 and 3
with the first), and `--recipe cpu-fp32` lays the candidate over that recipe (validation every 3rd epoch). The
epochs of each candidate were set so that it trains about as long as fastnet does in 13 epochs, the tutorial's
Adam-15 script's time here (docs/performance.md, "A recipe for fp32"). Each result is appended to OUT.json (a JSON
list).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from convnet.cli.parser import keep_freed_memory
from convnet.data.options import DataOptions
from convnet.models.engine import cpu_info, make_engine
from convnet.models.networks import FastNet, register_model
from convnet.training.config import TrainRequest
from convnet.training.run import train_run

CANDIDATES = ((32, 64, 128), (16, 64, 128), (16, 48, 128), (24, 48, 96), (16, 32, 64))


def step_speed(widths: tuple[int, int, int], pool_first: bool = False, batch: int = 128, steps: int = 30) -> float:
    """Images a second through one fp32 training step of fastnet at ``widths`` (median of ``steps``)."""
    model = FastNet(10, 1, widths, pool_first=pool_first).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.rand(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(steps + 5):
        start = time.perf_counter()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def append(out: Path, record: dict[str, object]) -> None:
    found = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*found, record], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("speed", "choose"))
    parser.add_argument("out", type=Path)
    parser.add_argument("widths", nargs="?", default="16,64,128")
    parser.add_argument("epochs", nargs="?", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pool-first", action="store_true", help="conv, max-pool, batch norm, ReLU in each stage")
    parser.add_argument("--unpadded", default="", help="stages whose convolution has no padding, e.g. 0 or 0,1")
    parser.add_argument("--recipe", default="cpu", help="the recipe the candidate's model and epochs are laid over")
    args = parser.parse_args()
    if args.unpadded and not args.pool_first:  # only fastnet-lean's layout has a convolution first in each stage
        parser.error(f"--unpadded {args.unpadded} needs --pool-first: the stages it names are fastnet-lean's")
    keep_freed_memory()  # as the command line does
    cpu = {**cpu_info(), "threads": torch.get_num_threads()}
    if args.mode == "speed":
        torch.manual_seed(0)
        for widths, pool_first in [(w, False) for w in CANDIDATES] + [((16, 64, 128), True)]:
            speeds = [round(step_speed(widths, pool_first)) for _ in range(args.repeats)]
            print(f"{'-'.join(map(str, widths)):>12}{' pool first' if pool_first else ''}  {speeds} images/s",
                  flush=True)
            append(args.out, {"widths": widths, "pool_first": pool_first, "images_per_s": speeds, "cpu": cpu})
        return
    widths = tuple(int(w) for w in args.widths.split(","))
    name = "fastnet-" + "-".join(map(str, widths)) + ("-pool-first" if args.pool_first else "") + \
        (f"-unpadded-{args.unpadded}" if args.unpadded else "")
    unpadded = [int(k) for k in args.unpadded.split(",") if k]

    def build(classes: int, channels: int, size: tuple[int, int]) -> nn.Module:
        net = FastNet(classes, channels, widths, pool_first=args.pool_first)  # type: ignore[arg-type]
        for stage in unpadded:
            net.features[stage][0].padding = (0, 0)  # with pool_first each stage starts with its convolution
        return net

    register_model(name, f"fastnet at widths {widths}")(build)
    start = time.perf_counter()
    settings = {"model": name, "epochs": args.epochs, "seed": args.seed, "precision": "fp32"}
    request = TrainRequest(settings, DataOptions(dataset="fashion-mnist"), recipe=args.recipe, device="cpu")
    result = train_run(request, engine=make_engine("cpu", precision="fp32")).result
    best = result.best or {}
    record = {"widths": widths, "pool_first": args.pool_first, "unpadded": unpadded, "recipe": args.recipe,
              "epochs": args.epochs, "seed": args.seed,
              "kept": best.get("epoch"),
              "val_accuracy": best.get("val_accuracy"), "seconds": round(time.perf_counter() - start),
              "val_by_epoch": [round(r.val_accuracy or 0.0, 4) for r in result.history], "cpu": cpu}
    print(json.dumps(record), flush=True)
    append(args.out, record)


if __name__ == "__main__":
    main()
