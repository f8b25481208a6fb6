"""fp32 answers through bfloat16 arithmetic: can a CPU's bf16 units (AMX) predict the seed model faster, unchanged?

    python benchmarks/amx_predict.py RUN OUT.json [--repeats 5]

RUN is a seed-model run on Fashion-MNIST (`convnet train --recipe tutorial --epochs 3 --out RUN`). Its 10,000 test
images are predicted four ways, side by side in one process, in batches of 32, 64, 128 and 256, channels-last:
fp32 (oneDNN's direct convolutions, the reference); **one bf16 pass** (oneDNN's `fp32_precision = "bf16"`: fp32
tensors, each product taken in bfloat16, sums in fp32); **the three-term split** (each input and weight written as a
bf16 high part plus a bf16 low part, hi·hi + hi·lo + lo·hi, each convolution in that bf16 mode: fp32's accuracy from
bf16 products); and **each ReLU fused into its convolution** (oneDNN's post-op,
`torch.ops.mkldnn._convolution_pointwise`). Prints images/s (median of `--repeats` after a warm-up), and how far
each one's probabilities and labels move from fp32's, with the CPU's flags; writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from probe_output import write_rows

from convnet.data.named import load_dataset
from convnet.use.loadrun import load_run

Forward = Callable[[torch.Tensor], torch.Tensor]


def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as two fp32 tensors that bfloat16 holds exactly: ``hi + lo`` is ``t`` to about 16 bits."""
    hi = t.bfloat16().float()
    return hi, (t - hi).bfloat16().float()


def forwards(model: torch.nn.Module) -> dict[str, Forward]:
    """The seed model's forward pass (three 3x3 convolutions with ReLU, then a linear layer), four ways."""
    convs = [model.seq[i] for i in (0, 2, 4)]
    linear = model.seq[7]
    weights = [(c.weight.detach().contiguous(memory_format=torch.channels_last), c.bias.detach()) for c in convs]
    halves = [(split(w), b) for w, b in weights]
    fused_op = torch.ops.mkldnn._convolution_pointwise

    def head(x: torch.Tensor) -> torch.Tensor:
        return linear(x.contiguous().flatten(1)).softmax(dim=1)

    def fp32(x: torch.Tensor) -> torch.Tensor:
        for w, b in weights:
            x = F.relu(F.conv2d(x, w, b, padding=1))
        return head(x)

    def three_terms(x: torch.Tensor) -> torch.Tensor:
        for (w_hi, w_lo), b in halves:
            x_hi, x_lo = split(x)
            x = F.relu(F.conv2d(x_hi, w_hi, b, padding=1) + F.conv2d(x_lo, w_hi, None, padding=1)
                       + F.conv2d(x_hi, w_lo, None, padding=1))
        return head(x)

    def fused(x: torch.Tensor) -> torch.Tensor:
        for w, b in weights:
            x = fused_op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
        return head(x)

    return {"fp32": fp32, "bf16 one pass": fp32, "three-term split": three_terms, "fused ReLU": fused}


def bf16_products(on: bool) -> None:
    torch.backends.mkldnn.conv.fp32_precision = "bf16" if on else "none"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    loaded = load_run(a.run, device="cpu")
    images = load_dataset(loaded.run.config["data"]["name"]).test.images
    x = (images.float() / 255).contiguous(memory_format=torch.channels_last)
    ways = forwards(loaded.model.eval())
    rows = []
    with torch.inference_mode():
        reference = torch.cat([ways["fp32"](x[i:i + 500]) for i in range(0, len(x), 500)])
        for name, fn in ways.items():
            bf16_products(name in ("bf16 one pass", "three-term split"))
            probs = torch.cat([fn(x[i:i + 500]) for i in range(0, len(x), 500)])
            row = {"way": name, "max_probability_difference": float((probs - reference).abs().max()),
                   "labels_changed": int((probs.argmax(1) != reference.argmax(1)).sum())}
            for batch in (32, 64, 128, 256):
                times = []
                for _ in range(a.repeats + 1):  # the first is the warm-up
                    start = time.perf_counter()
                    for i in range(0, len(x), batch):
                        fn(x[i:i + batch])
                    times.append(time.perf_counter() - start)
                row[f"images_per_s_at_{batch}"] = round(len(x) / statistics.median(times[1:]))
            rows.append(row)
            print(json.dumps(row))
    bf16_products(False)
    write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
