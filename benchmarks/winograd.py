"""Winograd's F(2x2, 3x3) against oneDNN's direct convolutions, for fastnet-lean's two large convolutions.

    python benchmarks/winograd.py OUT.json [--repeats 20] [--compile]

Winograd's algorithm (Lavin and Gray, 2016) computes a 3x3 convolution with 2.25 times fewer multiplications: each
4x4 tile of the input and each 3x3 kernel is transformed, the transforms are multiplied as 16 matrix products
(one per tile position), and the result transformed back to a 2x2 output tile. Here it is built from PyTorch's
own operators (autograd gives its backward: the transforms are linear, so gradients stay in the Winograd domain),
for the shapes of fastnet-lean's second and third convolutions at a batch of 128, channels-last, fp32 (what a
CPU without bfloat16 trains with). Timed side by side in one process against `torch.nn.functional.conv2d`
(oneDNN's direct kernels), medians of `--repeats` after a warm-up: forward alone, forward and backward, and the
parts of the Winograd forward; with `--compile`, also the input and output transforms compiled by inductor (each
fused into one loop; it needs a C++ compiler), with their compile time. Checks the two agree, writes OUT.json and
prints a table with the CPU's flags.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from probe_output import write_rows

# The kernel transform's matrix; the input's (B^T) and output's (A^T) are applied as the sums they stand for.
_G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float32)


def _transform(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """B^T d along one axis: four slices (d0..d3) to four (d0-d2, d1+d2, d2-d1, d1-d3)."""
    d0, d1, d2, d3 = rows
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _untransform(m: torch.Tensor) -> torch.Tensor:
    """A^T m along the first axis: four (m0..m3) to two stacked (m0+m1+m2, m1-m2-m3)."""
    return torch.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])


def tiles(x: torch.Tensor) -> torch.Tensor:
    """The input transform B^T d B of every 4x4 tile (stride 2) of ``x`` (N, C, H, W), padded as a 'same' 3x3
    convolution: ``(16, N*T*S, C)``, T x S tiles."""
    n, c, h, w = x.shape
    t, s = (h + 1) // 2, (w + 1) // 2
    xh = F.pad(x, (1, 2 * s + 1 - w, 1, 2 * t + 1 - h)).permute(0, 2, 3, 1)  # (N, 2T+2, 2S+2, C), channels-last
    rows = _transform([xh[:, k:k + 2 * t:2] for k in range(4)])  # each (N, T, 2S+2, C)
    out = [v for r in rows for v in _transform([r[:, :, k:k + 2 * s:2] for k in range(4)])]  # 16 x (N, T, S, C)
    return torch.stack(out).reshape(16, n * t * s, c)


def kernels(w: torch.Tensor) -> torch.Tensor:
    """The kernel transform G g G^T: ``(16, C, O)``."""
    o, c = w.shape[:2]
    return torch.einsum("ik,ockl,jl->ijco", _G, w, _G).reshape(16, c, o)


def untile(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The output transform A^T m A of the 16 products ``(16, N*T*S, O)``: ``(N, O, H, W)``, channels-last."""
    t, s, o = (h + 1) // 2, (w + 1) // 2, m.shape[-1]
    rows = _untransform(m.reshape(4, 4, n, t, s, o))  # (2, 4, N, T, S, O)
    y = torch.stack([_untransform(r) for r in rows])  # (2, 2, N, T, S, O)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, 2 * t, 2 * s, o)[:, :h, :w]
    return y.permute(0, 3, 1, 2)


def winograd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A 'same' 3x3 convolution of ``x`` (N, C, H, W) by ``w`` (O, C, 3, 3), no bias, by Winograd's F(2x2, 3x3)."""
    n, _, h, wd = x.shape
    return untile(torch.bmm(tiles(x), kernels(w)), n, h, wd)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(c: int, o: int, size: int, repeats: int, compiled: bool) -> list[dict[str, object]]:
    """Median times of the direct and Winograd convolutions of ``c`` to ``o`` channels at ``size`` x ``size``."""
    x = torch.randn(128, c, size, size).to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(o, c, 3, 3) * 0.05).to(memory_format=torch.channels_last).requires_grad_()
    xd, wd = x.detach(), w.detach()
    direct = F.conv2d(xd, wd, padding=1)
    error = float((winograd(xd, wd) - direct).abs().max() / direct.abs().max())
    if error > 1e-5:
        raise SystemExit(f"Winograd disagrees with the direct convolution: relative error {error:.2e}")
    grad = torch.randn_like(direct)

    def conv2d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, padding=1)

    def step(conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = w.grad = None
            conv(x, w).backward(grad)
        return run

    v, u = tiles(xd), kernels(wd)
    m = torch.bmm(v, u)
    timed = {"direct forward": lambda: conv2d(xd, wd), "Winograd forward": lambda: winograd(xd, wd),
             "direct forward+backward": step(conv2d), "Winograd forward+backward": step(winograd),
             "  input transform": lambda: tiles(xd), "  kernel transform": lambda: kernels(wd),
             "  16 products": lambda: torch.bmm(v, u), "  output transform": lambda: untile(m, 128, size, size)}
    if compiled:
        start = time.perf_counter()
        fused_tiles, fused_untile = torch.compile(tiles, dynamic=False), torch.compile(untile, dynamic=False)
        fused_tiles(xd), fused_untile(m, 128, size, size)
        print(f"{c:3d}->{o} at {size}x{size}  inductor compiled both transforms in {time.perf_counter() - start:.1f} s")
        timed["  input transform, compiled"] = lambda: fused_tiles(xd)
        timed["  output transform, compiled"] = lambda: fused_untile(m, 128, size, size)
    rows: list[dict[str, object]] = []
    for name, fn in timed.items():
        with torch.enable_grad() if "backward" in name else torch.no_grad():
            ms = median_ms(fn, repeats)
        rows.append({"conv": f"{c}->{o} at {size}x{size}", "what": name.strip(), "ms": ms})
        print(f"{c:3d}->{o} at {size}x{size}  {name:28s} {ms:7.2f} ms", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also time the transforms compiled by inductor")
    a = p.parse_args()
    torch.manual_seed(0)
    # fastnet-lean's second and third convolutions, batch 128
    rows = [r for c, o, size in ((16, 64, 14), (64, 128, 7)) for r in measure(c, o, size, a.repeats, a.compile)]
    write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
