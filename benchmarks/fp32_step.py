"""The fp32 training step on this CPU: what makes it fast where the CPU has no bfloat16.

    python benchmarks/fp32_step.py OUT.json [--repeats 5] [--images 12800]

Times one epoch of `convnet bench`'s training job (the seed model, Adam at 0.001, batches of 128, the first
`--images` Fashion-MNIST training images) through convnet's training loop in fp32 (the engine a CPU without
bfloat16 gets, whatever this CPU has), against the tutorial's own loop, side by side in one process: warm-up
excluded, the order rotated each repeat, medians reported. Variants: channels-last or contiguous memory, batch
size, `torch.compile` (inductor; its compile time reported apart and counted in a whole run's wall time), fused
Adam, and torch's intra-op threads. Writes every timing to OUT.json and prints a table with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from convnet.data.named import load_dataset
from convnet.models import engine as engine_module
from convnet.models.engine import Engine, cpu_info
from convnet.models.networks import create_model
from convnet.tools.bench import TrainModelInBatches
from convnet.training.config import TrainConfig
from convnet.training.loop import train


@dataclass(frozen=True)
class CompiledEngine(Engine):
    """The fp32 engine with the model compiled by inductor."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return torch.compile(super().prepare_model(model))  # type: ignore[return-value]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=12_800)
    p.add_argument("--variants", default="tutorial,cl,contiguous,cl-b256,cl-fused,cl-1thread,cl-compile")
    a = p.parse_args()
    engine_module.cpu_has_bf16 = lambda: False  # the engine of a CPU without bfloat16: fp32 training
    data = load_dataset("fashion-mnist")
    sub = data.train.first(a.images)
    spec = data.spec
    x, y = sub.images.float() / 255.0, sub.labels
    cpu = torch.device("cpu")
    fp32 = Engine.fast(cpu)
    assert fp32.autocast is None
    threads = torch.get_num_threads()

    def config(batch: int = 128) -> TrainConfig:
        return TrainConfig(model="seed", optimizer="adam", lr=1e-3, epochs=1, batch_size=batch, shuffle=True,
                           val_split=0.0)

    def tutorial() -> None:
        torch.manual_seed(0)
        net = create_model("seed", spec.num_classes, 1, (28, 28))
        opt = torch.optim.Adam(net.parameters(), lr=torch.tensor(1 / 1e3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            TrainModelInBatches(net, nn.CrossEntropyLoss(), opt, x, y, batch_size=128, epochs=1)

    def ours(engine: Engine, batch: int = 128) -> None:
        train(config(batch), sub, spec, engine=engine)

    def fused() -> None:
        original = torch.optim.Adam

        def adam(*args, **kwargs):  # type: ignore[no-untyped-def]
            return original(*args, **{**kwargs, "foreach": None, "fused": True})

        torch.optim.Adam = adam  # type: ignore[misc]
        try:
            ours(fp32)
        finally:
            torch.optim.Adam = original  # type: ignore[misc]

    def one_thread() -> None:
        torch.set_num_threads(1)
        try:
            ours(fp32)
        finally:
            torch.set_num_threads(threads)

    variants = {
        "tutorial": tutorial,
        "cl": lambda: ours(fp32),
        "contiguous": lambda: ours(Engine(cpu, channels_last=False, infer_batch_size=128, fold_batchnorm=True)),
        "cl-b256": lambda: ours(fp32, 256),
        "cl-fused": fused,
        "cl-1thread": one_thread,
        "cl-compile": lambda: ours(CompiledEngine(cpu, channels_last=True, infer_batch_size=128, fold_batchnorm=True)),
    }
    chosen = [v for v in a.variants.split(",") if v in variants]
    times: dict[str, list[float]] = {v: [] for v in chosen}
    first: dict[str, float] = {}
    for i in range(a.repeats + 1):
        order = chosen[i % len(chosen):] + chosen[:i % len(chosen)]
        for name in order:
            t = time.perf_counter()
            variants[name]()
            dt = time.perf_counter() - t
            if i == 0:
                first[name] = dt  # warm-up: compile time shows here
            else:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"variant": k, "median_s": med[k], "images_per_s": a.images / med[k], "first_s": first[k],
             "vs_tutorial": med["tutorial"] / med[k] if "tutorial" in med else None, "all_s": times[k]} for k in chosen]
    info = {"cpu": cpu_info(), "torch": torch.__version__, "threads": threads, "images": a.images,
            "repeats": a.repeats, "rows": rows}
    a.out.write_text(json.dumps(info, indent=1))
    print(f"cpu {info['cpu']['name']}, flags {' '.join(info['cpu']['flags'])}; fp32 training (bf16 off), "
          f"torch {torch.__version__}, {threads} threads, median of {a.repeats}")
    print("| variant | images/s | x tutorial | first run (s, warm-up) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        vs = f"{r['vs_tutorial']:.2f}" if r["vs_tutorial"] else ""
        print(f"| {r['variant']} | {r['images_per_s']:,.0f} | {vs} | {r['first_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
