"""Worker processes that answer on one listening socket, started, watched and stopped together
(``convnet serve --workers N``).

The parent binds the socket, so ``--port 0`` gives one port for all, and starts the workers
with the *spawn* method: each is a fresh interpreter, which makes its own ONNX Runtime
session and thread pools (a fork would copy the parent's threads half-way through their
work) and reads ``PROMETHEUS_MULTIPROC_DIR`` when it imports prometheus-client. The kernel
hands each new connection to one of the workers waiting on the socket.

SIGTERM or Ctrl-C to the parent is sent on to every worker as one SIGTERM, and uvicorn in each
lets the requests in flight finish; the parent waits for all of them. A worker that stops on
its own is an error: the parent stops the others and says which one, with its exit status.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from convnet.core.errors import ConvnetError

MAX_WORKERS = 64  # each worker is a Python process with its own model: hundreds of MB
STOP_TIMEOUT_S = 60.0  # uvicorn's 30 s for the requests in flight, then its own shutdown; then SIGKILL
PARENT_CHECK_S = 1.0  # how often a worker checks that its parent is still there


def run_workers(target: Callable[..., None], args: tuple[Any, ...], count: int,
                on_exit: Callable[[int], None] = lambda pid: None) -> None:
    """Run ``target(*args, index)`` in ``count`` worker processes until SIGTERM or Ctrl-C to
    this one, then stop them all after their requests in flight; ``on_exit(pid)`` is called
    for each worker that exited. ``args`` must pickle (a socket does).

    Raises:
        ConvnetError: a worker stopped on its own (the others are stopped first).
        KeyboardInterrupt: after Ctrl-C, once every worker has stopped.
    """
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=target, args=(*args, i), name=f"convnet-worker-{i}") for i in range(count)]
    signals: list[int] = []

    def stop_all() -> None:
        for w in workers:
            if w.pid is not None and w.exitcode is None:
                os.kill(w.pid, signal.SIGTERM)

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        stop_all()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    failed: tuple[int, int, int | None] | None = None  # (index, pid, exit status) of a worker that stopped on its own
    try:
        # each worker starts with Ctrl-C ignored, which a new process keeps (see as_worker); a
        # Ctrl-C meanwhile waits, blocked, for this process's handler to be back
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for w in workers:
                if signals:
                    break
                w.start()
        finally:
            signal.signal(signal.SIGINT, on_signal)
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        if signals:  # a signal while the workers started: the last one may have missed it
            stop_all()
        running: dict[int, tuple[int, Any]] = {w.sentinel: (i, w) for i, w in enumerate(workers) if w.pid is not None}
        deadline: float | None = None
        while running:
            if (signals or failed) and deadline is None:
                deadline = time.monotonic() + STOP_TIMEOUT_S
            if deadline is not None and time.monotonic() > deadline:  # what is left will not stop by itself
                for _, w in running.values():
                    w.kill()
            for sentinel in wait(list(running), timeout=1.0):  # a second at most: a signal does not end the wait
                index, w = running.pop(sentinel)
                w.join()
                on_exit(w.pid)
                if not signals and failed is None:
                    failed = (index, w.pid, w.exitcode)
                    stop_all()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed is not None:
        index, pid, status = failed
        raise ConvnetError(f"worker {index} (pid {pid}) stopped on its own ({_exit_status(status)}); "
                           f"stopped the other {count - 1} and the server")
    if signal.SIGINT in signals and signal.SIGTERM not in signals:
        raise KeyboardInterrupt


def as_worker(parent: int) -> None:
    """Set up this process as a worker of ``parent``: call it first thing in the worker.

    A terminal's Ctrl-C goes to the terminal's process group; a worker leaves it (and starts
    with SIGINT ignored, from :func:`run_workers`, until it has), so it waits for the parent's
    SIGTERM and is never signalled twice: uvicorn takes a Ctrl-C after a SIGTERM as "drop the
    requests in flight". SIGTERM exits with status 0: at once before uvicorn runs, and after
    uvicorn's graceful stop, which raises the signal again to this handler. If the parent goes
    away (killed), the worker stops too, rather than keep the port.
    """
    os.setpgrp()
    signal.signal(signal.SIGTERM, _exit)

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent:  # again every second: uvicorn may not be listening for it yet
                os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="convnet-parent-watch", daemon=True).start()


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
