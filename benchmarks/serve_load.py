"""The load test of `convnet serve` published in the README.

    python benchmarks/serve_load.py MODEL.onnx IMAGE.png [--seconds 10] [--repeats 3]

Starts `convnet serve MODEL` on a free port of 127.0.0.1, runs wrk (Debian: apt-get install wrk) with
single-PNG requests at 1, 8, 32 and 128 concurrent clients and 32-PNG requests at 8 clients, each for
--seconds, --repeats times, prints the median run of each row as a Markdown table (errors summed over
all runs) and stops the server with SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convnet.loadtest import format_table, measure


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run folder or .onnx file to serve")
    p.add_argument("image", type=Path, help="a PNG file to send")
    p.add_argument("--seconds", type=float, default=10, help="per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the median is shown (default: %(default)s)")
    p.add_argument("--clients", default="1,8,32,128", help="concurrency levels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="images per batch request (default: %(default)s)")
    p.add_argument("--server-args", default="", help="extra flags for convnet serve, e.g. '--batch-wait-ms 2'")
    a = p.parse_args()
    rows, status = measure(a.model, a.image.read_bytes(), seconds=a.seconds, repeats=a.repeats,
                           clients=[int(c) for c in a.clients.split(",")], batch=a.batch,
                           server_args=a.server_args.split())
    print(format_table(rows))
    print(f"{a.repeats} runs of {a.seconds:g} s per row, the median by requests/s; server exit status {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
