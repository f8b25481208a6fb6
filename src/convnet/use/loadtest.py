"""Load tests of ``convnet serve`` on this machine: wrk for the published figures, a
bounded Python client for the test suite.

Every request goes to a loopback address only, and every run is bounded in time (wrk's
``--duration``) or in count and time (:func:`python_load`). :func:`measure` is the
published test (``benchmarks/serve_load.py`` runs it): a server on a free port of
127.0.0.1, single-image PNG requests at 1, 8, 32 and 128 concurrent clients and batch
requests, then SIGTERM; with several worker counts, a server with each in turn.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

BOUNDARY = "convnetloadtestboundary"


@dataclass(frozen=True)
class LoadResult:
    """One load run: ``requests`` answered in ``seconds``, latency percentiles, errors
    (connection errors, timeouts and non-2xx answers), against a server of ``workers`` processes."""

    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    images_per_request: int = 1
    workers: int = 1

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request


def multipart_body(files: Sequence[bytes], names: Sequence[str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with each of ``files`` as field ``file``, and its content type."""
    parts = []
    for i, data in enumerate(files):
        name = names[i] if names else f"image{i}.png"
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def check_loopback(url: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of ``url``; refused unless the host is a loopback address."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"load tests go to this machine only (127.0.0.0/8, ::1), not {host!r}")
    return host, parts.port or 80, parts.path or "/"


# --- wrk


def run_wrk(url: str, body: bytes, content_type: str, *, clients: int, seconds: float,
            images_per_request: int = 1, threads: int = 1) -> LoadResult:
    """Run wrk (POST ``body`` over ``clients`` keep-alive connections for ``seconds``)."""
    check_loopback(url)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{content_type}"\n'
                          f'local f = io.open("{Path(tmp) / "body"}", "rb")\nwrk.body = f:read("*all")\nf:close()\n')
        out = subprocess.run([wrk, "-t", str(min(threads, clients)), "-c", str(clients), "-d", f"{seconds:g}s",
                              "--timeout", "10s", "--latency", "-s", str(script), url],
                             capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return parse_wrk(out, clients, images_per_request)


def parse_wrk(out: str, clients: int, images_per_request: int = 1) -> LoadResult:
    """wrk's report as a :class:`LoadResult`."""
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if total is None:
        raise ValueError(f"unexpected wrk output:\n{out}")
    seconds = float(total.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return LoadResult(clients, int(total.group(1)), seconds, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), errors,
                      images_per_request)


def _wrk_ms(out: str, percentile: str) -> float:
    m = re.search(rf"^\s+{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if m is None:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]


# --- a bounded Python client (no tool to install; slower than wrk, so it measures less)


def python_load(url: str, body: bytes, content_type: str, *, clients: int, requests: int,
                max_seconds: float, images_per_request: int = 1) -> LoadResult:
    """``clients`` keep-alive connections sending ``body`` until ``requests`` are answered
    or ``max_seconds`` pass, whichever comes first."""
    host, port, path = check_loopback(url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    remaining = requests

    async def client(deadline: float) -> None:
        nonlocal errors, remaining
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                start = time.perf_counter()
                writer.write(head + body)
                status = await _read_response(reader)
                latencies.append(time.perf_counter() - start)
                errors += status // 100 != 2
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()

    async def main() -> float:
        start = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(client(start + max_seconds) for _ in range(clients))),
                               max_seconds + 30)
        return time.monotonic() - start

    seconds = asyncio.run(main())
    ms = sorted(x * 1e3 for x in latencies) or [float("nan")]
    return LoadResult(clients, len(latencies), seconds, ms[len(ms) // 2], ms[min(len(ms) - 1, int(len(ms) * 0.99))],
                      errors, images_per_request)


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response with a Content-Length; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                   if k.strip().lower() == "content-length"), 0)
    await reader.readexactly(length)
    return status


# --- the whole measurement


def start_server(model: str | os.PathLike[str], *extra: str, workers: int = 1,
                 timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``convnet serve MODEL --port 0 --workers N`` in a child process; returns it and its base
    URL once every worker is ready (has run a first prediction: ``/ready`` and, for several,
    ``convnet_workers_ready`` in ``/metrics``)."""
    proc = subprocess.Popen([sys.executable, "-m", "convnet", "serve", str(model), "--port", "0",
                             "--workers", str(workers), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "serving FILE on http://127.0.0.1:PORT/ ..." once it listens
    m = re.search(r"on (http://\S+/)", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
    url = m.group(1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if _ready(url, workers):
                return proc, url
        except OSError:  # not listening yet, or 503: not ready yet
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError(f"the server did not get ready: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.2)


def _ready(url: str, workers: int) -> bool:
    """Whether ``/ready`` says 200 and, with several workers, ``/metrics`` counts them all ready
    (``/ready`` is one worker's answer)."""
    with urllib.request.urlopen(url + "ready", timeout=5) as r:
        if r.status != 200:
            return False
    if workers == 1:
        return True
    with urllib.request.urlopen(url + "metrics", timeout=5) as r:
        found = re.search(r"^convnet_workers_ready (\S+)$", r.read().decode(), re.M)
    return found is not None and float(found.group(1)) >= workers


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then wait for the server to finish what it was doing; its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


WARMUP_S = 1.0  # wrk at 8 clients on each new server before the measured runs, not counted


def measure(model: str | os.PathLike[str], png: bytes, *, seconds: float = 10, repeats: int = 3,
            clients: Sequence[int] = (1, 8, 32, 128), batch: int = 32, server_args: Sequence[str] = (),
            workers: Sequence[int] = (1,)) -> tuple[list[LoadResult], list[int]]:
    """The published load test: ``repeats`` rounds; in each, for every count of ``workers``,
    a server for ``model`` (``convnet serve --workers N``) on a free port of 127.0.0.1, a
    warm-up, then wrk for ``seconds`` with single-PNG requests at each of ``clients`` and
    ``batch``-PNG requests at 8 clients (none with ``batch`` 0), then SIGTERM. The worker
    counts take turns, in reverse order every other round (1, 2, then 2, 1, ...), so that
    the machine's load drifting during the measurement weighs on each alike. Returns the
    median run of each row by requests/s (by worker count, then row; errors summed over the
    rounds) and the exit status of every server."""
    single, ctype = multipart_body([png])
    plan = [(c, single, 1) for c in clients]
    if batch:
        plan.append((8, multipart_body([png] * batch)[0], batch))
    runs: dict[tuple[int, int], list[LoadResult]] = {}
    statuses = []
    for round_ in range(repeats):
        for n in (workers if round_ % 2 == 0 else workers[::-1]):
            proc, url = start_server(model, *server_args, workers=n)
            try:
                run_wrk(url + "predict", single, ctype, clients=8, seconds=WARMUP_S)
                for row, (c, body, per) in enumerate(plan):
                    result = run_wrk(url + "predict", body, ctype, clients=c, seconds=seconds, images_per_request=per)
                    runs.setdefault((n, row), []).append(replace(result, workers=n))
            finally:
                statuses.append(stop_server(proc))
    return [median_result(runs[n, row]) for n in workers for row in range(len(plan))], statuses


def format_table(rows: Sequence[LoadResult]) -> str:
    """The rows as the Markdown table of docs/serving.md (a workers column where a server had more than one)."""
    by_workers = any(r.workers != 1 for r in rows)
    lines = ["| " + ("workers | " if by_workers else "") + "request | clients | requests/s | images/s | p50 ms | "
             "p99 ms | errors |", "| --- " * (7 + by_workers) + "|"]
    for r in rows:
        kind = "1 PNG" if r.images_per_request == 1 else f"{r.images_per_request} PNGs"
        lines.append("| " + (f"{r.workers} | " if by_workers else "") + f"{kind} | {r.clients} | "
                     f"{r.requests_per_s:,.0f} | {r.images_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
                     f"{r.errors} |")
    return "\n".join(lines)


def median_result(results: Sequence[LoadResult]) -> LoadResult:
    """The run with the median throughput (its own latencies with it); errors summed over all runs."""
    ordered = sorted(results, key=lambda r: r.requests_per_s)
    return replace(ordered[len(ordered) // 2], errors=sum(r.errors for r in results))

