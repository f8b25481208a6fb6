"""The service's Prometheus metrics, answered at ``GET /metrics`` in Prometheus' text format:
requests by path and status, their latency, the requests in progress, the images of each
ONNX Runtime call, the images predicted, and the model served.

With ``convnet serve --workers N`` every worker writes its values into files of one folder
(prometheus-client's multiprocess mode), and ``/metrics``, whichever worker answers it, sums
them over the workers. prometheus-client chooses that mode when it is first imported, from
the environment variable ``PROMETHEUS_MULTIPROC_DIR``, so :func:`convnet.use.serve.serve` makes
the folder and sets the variable before it starts the workers, and removes both when the
server stops. With one worker the values stay in the process, in a registry of the app's
own: several apps in one process (tests, a notebook) do not collide on the names of
prometheus-client's global registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from convnet.core.errors import ConvnetError

ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when it is imported
CONTENT_TYPE = CONTENT_TYPE_LATEST
# the service's routes; any other path is counted as "other", so that a scan of random
# URLs cannot grow the number of series without bound
PATHS = frozenset({"/predict", "/health", "/ready", "/model", "/metrics", "/", "/docs", "/docs/oauth2-redirect",
                   "/openapi.json"})
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@contextlib.contextmanager
def shared_metrics(folder: Path) -> Iterator[Path]:
    """``folder``, made for the metrics of the workers started inside the block and named in
    ``PROMETHEUS_MULTIPROC_DIR`` for them to inherit; both removed at the end, errors too."""
    folder.mkdir()
    previous = os.environ.get(ENV)
    os.environ[ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def worker_exited(pid: int, folder: Path) -> None:
    """Forget the live gauges of a worker that exited (its counters and histograms stay in the sums)."""
    mark_process_dead(pid, str(folder))


class ServiceMetrics:
    """The metrics of one app (see the module's docstring); docs/serving.md's table lists them.

    Args:
        model: the registered model's name (``convnet.model`` in the file's metadata).
        file: the file or run folder served.
        test_accuracy: the run's test accuracy, None where unknown.
        multiprocess_dir: the folder the workers write their values into; None: one process.
    """

    def __init__(self, model: str, file: str, test_accuracy: float | None, *,
                 multiprocess_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        if multiprocess_dir is None:
            own: CollectorRegistry | None = self.registry
        else:
            if os.environ.get(ENV) != str(multiprocess_dir):  # else every value would stay in this process, unseen
                raise ConvnetError(f"{ENV} must name {multiprocess_dir} before prometheus_client is imported")
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
            own = None  # each value is written to this process's files, and collected from all of them
        self.requests = Counter("convnet_requests", "HTTP requests answered, by path and status",
                                ("path", "status"), registry=own)
        self.latency = Histogram("convnet_request_duration_seconds",
                                 "time from a request's arrival to the last byte of its answer, by path", ("path",),
                                 buckets=LATENCY_BUCKETS_S, registry=own)
        self.in_progress = Gauge("convnet_requests_in_progress", "requests being answered now",
                                 multiprocess_mode="livesum", registry=own)
        self.batch_images = Histogram("convnet_batch_images",
                                      "images per ONNX Runtime call (each worker's warm-up is one call of 1 image)",
                                      buckets=BATCH_BUCKETS, registry=own)
        self.images = Counter("convnet_images_predicted", "images predicted and answered", registry=own)
        self.ready = Gauge("convnet_workers_ready", "workers that have run their first prediction (/ready 200)",
                           multiprocess_mode="livesum", registry=own)
        # answered per worker: with --workers, one series per live worker (label pid, added by
        # prometheus-client), which shows how evenly the kernel spreads the connections
        self.worker_requests = Gauge("convnet_worker_requests", "requests answered by this worker",
                                     multiprocess_mode="liveall", registry=own)
        # prometheus-client's Info does not work in multiprocess mode: an info-style gauge
        # instead (value 1, the facts as labels), the same for every worker ("max")
        info = Gauge("convnet_model_info", "the model served: its name, file and test accuracy (value 1)",
                     ("model", "file", "test_accuracy"), multiprocess_mode="max", registry=own)
        info.labels(model, file, "" if test_accuracy is None else str(test_accuracy)).set(1)  # as /model says it

    def answered(self, path: str, status: int, seconds: float) -> None:
        """Count one request answered."""
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)
        self.worker_requests.inc()

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format (summed over the workers)."""
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware that counts and times every HTTP request, 4xx and 5xx answers too.

    A request is counted just before the last byte of its answer is sent, so a client that
    has its answer finds it in ``/metrics``; one whose app raised counts as a 500.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in PATHS else "other"
        start = time.perf_counter()
        status, counted = 500, False

        async def counting_send(message: Message) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not counted:
                counted = True
                self.metrics.answered(path, status, time.perf_counter() - start)
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:  # the app raised, or the client left before the answer
                self.metrics.answered(path, status, time.perf_counter() - start)
            self.metrics.in_progress.dec()
