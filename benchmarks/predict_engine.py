"""PyTorch's prediction on the CPU: batches of 128 against 512, each ReLU fused into its convolution or not.

    python benchmarks/predict_engine.py OUT.json [--models seed,fastnet,fastnet-lean] [--images 30000] [--rounds 8]

Each model (fresh weights, batch norm given statistics that are not the identity) predicts the same random uint8
images through `convnet.models.inference.infer`, the one forward pass every path uses, four ways: batches of 128 or
512, with batch norm folded in as the fast engine does, and with or without each convolution and the ReLU after it
as one oneDNN call (`convnet.models.networks.fuse_conv_relu`). The four ways rotate within each round, in one
process; images/s is the median over the rounds, with the largest probability difference and the labels changed
against the unfused way at 512. Run it with `MALLOC_MMAP_THRESHOLD_=4000000000` to see how much of the gap between
the batch sizes is the C library mapping fresh memory for each large activation, or with `ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2` to take AVX2's kernels on a CPU that has more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from probe_output import write_rows
from torch import nn

from convnet.models.engine import Engine
from convnet.models.inference import infer
from convnet.models.networks import create_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--models", default="seed,fastnet,fastnet-lean")
    p.add_argument("--images", type=int, default=30_000)
    p.add_argument("--rounds", type=int, default=8)
    a = p.parse_args()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (a.images, 1, 28, 28), dtype=torch.uint8)
    cpu = torch.device("cpu")
    ways = {f"{'fused' if fused else 'apart'} {batch}": Engine(cpu, channels_last=True, infer_batch_size=batch,
                                                              fold_batchnorm=True, fuse_relu=fused)
            for batch in (128, 512) for fused in (False, True)}
    rows = []
    for name in a.models.split(","):
        model = Engine.fast(cpu).prepare_model(create_model(name, 10, 1, (28, 28))).eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        reference = infer(model, images, engine=ways["apart 512"]).softmax(1)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for r in range(a.rounds + 1):  # round 0 is the warm-up
            order = list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]
            for way in order:
                start = time.perf_counter()
                probs = infer(model, images, engine=ways[way]).softmax(1)
                if r:
                    times[way].append(time.perf_counter() - start)
                elif way != "apart 512":
                    moved = {"max_probability_difference": float((probs - reference).abs().max()),
                             "labels_changed": int((probs.argmax(1) != reference.argmax(1)).sum())}
                    print(json.dumps({"model": name, "way": way, **moved}))
        row = {"model": name, "images": a.images, "rounds": a.rounds,
               **{f"images_per_s {way}": round(a.images / statistics.median(t)) for way, t in times.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
