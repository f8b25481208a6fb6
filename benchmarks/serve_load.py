"""The load test of `convnet serve` published in the README.

    python benchmarks/serve_load.py MODEL.onnx IMAGE.png [--seconds 10] [--repeats 3] [--workers 1,2]

Starts `convnet serve MODEL` on a free port of 127.0.0.1, runs wrk (Debian: apt-get install wrk) with
single-PNG requests at 1, 8, 32 and 128 concurrent clients and 32-PNG requests at 8 clients, each for
--seconds (after 1 s of warm-up, not counted), and stops the server with SIGTERM; --repeats such
rounds. With several --workers counts, every round starts a server with each count in turn, the order
reversed every other round (1,2 then 2,1, ...), so that a change in the machine's load falls on each
count alike. Prints the median run of each row as one Markdown table (errors summed over all runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convnet.use.loadtest import format_table, measure


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run folder or .onnx file to serve")
    p.add_argument("image", type=Path, help="a PNG file to send")
    p.add_argument("--seconds", type=float, default=10, help="per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds, each with servers of its own and one run per row; the median is shown "
                        "(default: %(default)s)")
    p.add_argument("--clients", default="1,8,32,128", help="concurrency levels (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32,
                   help="images per batch request; 0: no batch row (default: %(default)s)")
    p.add_argument("--workers", default="1", help="worker counts of the servers, taking turns (default: %(default)s)")
    p.add_argument("--server-args", default="", help="extra flags for convnet serve, e.g. '--batch-wait-ms 2'")
    a = p.parse_args()
    workers = [int(n) for n in a.workers.split(",")]
    if "--workers" in a.server_args.split():
        p.error("give the worker counts with --workers, not in --server-args")
    rows, statuses = measure(a.model, a.image.read_bytes(), seconds=a.seconds, repeats=a.repeats,
                             clients=[int(c) for c in a.clients.split(",")], batch=a.batch,
                             server_args=a.server_args.split(), workers=workers)
    print(format_table(rows))
    turns = f" (servers of {a.workers} workers taking turns, reversed every other round)" if len(workers) > 1 else ""
    print(f"{a.repeats} rounds of {a.seconds:g} s per row{turns}, the median by requests/s; server exit statuses "
          f"{', '.join(map(str, statuses))}")
    return 0 if all(s == 0 for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
