"""The HTTP prediction service: FastAPI on uvicorn, ONNX Runtime behind a batcher.

::

    POST /predict   images as multipart field ``file`` (repeatable) or JSON {"images": [...]}
    GET  /health    200 while the model is loaded and the batcher runs
    GET  /ready     200 once a first prediction has run (503 before): for a load balancer
    GET  /model     input spec, classes, test accuracy, versions, limits
    GET  /metrics   Prometheus' text format (:mod:`convnet.use.servemetrics`)
    GET  /docs      the OpenAPI docs (``/openapi.json`` the schema)
    GET  /          a page to try an image (:file:`page.html`, no external scripts)

Concurrent requests are predicted together (:mod:`convnet.use.batcher`). ONNX Runtime is the
backend because it was measured faster than PyTorch on small batches here (docs/serving.md);
a run folder serves its kept export (``RUN/model.onnx``, made from its weights), or is
exported to ONNX in memory when the server starts (:func:`convnet.use.export.export_in_memory`).

Every bad request is answered 4xx with ``{"error": "..."}`` naming the problem, before
any of it reaches the model (:mod:`convnet.use.httpinputs`). A model that fails in ONNX
Runtime (a file changed after its export) is answered 500 with ``{"error": "..."}``
saying why, and the same line on the server's stderr. Uvicorn handles SIGTERM and
Ctrl-C: it stops accepting connections, lets the requests in flight finish, then the
batcher stops.

With ``workers`` > 1 the parent binds the socket and exports a run folder once, then each
worker process (:mod:`convnet.use.workers`) makes its own ONNX Runtime session of those bytes
and answers on the shared socket; the service keeps nothing between requests, so any worker
(or replica) can answer any request.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import math
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from convnet.core.errors import ConvnetError
from convnet.core.version import __version__
from convnet.use.batcher import Batcher
from convnet.use.export import export_in_memory
from convnet.use.httpinputs import JSON, MULTIPART, RequestError, request_images
from convnet.use.loadrun import LoadedRun, open_model
from convnet.use.onnxfile import OnnxModel, open_onnx
from convnet.use.prediction import TOP_K, check_min_confidence, check_top_k, rows_of
from convnet.use.servemetrics import CONTENT_TYPE, CountRequests, ServiceMetrics, shared_metrics, worker_exited
from convnet.use.workers import MAX_WORKERS, as_worker, run_workers


@dataclass(frozen=True)
class ServeOptions:
    """How the service listens and what it accepts.

    Attributes:
        host: address to bind; 127.0.0.1 keeps it on this machine.
        port: TCP port; 0 picks a free one (printed at start).
        max_body_mb: largest request body read, in MB (413 beyond).
        max_images: most images in one request (413 beyond).
        max_batch: most images predicted in one ONNX Runtime call.
        batch_wait_ms: how long the batcher waits for more requests after the first one
            while the batch is not full.
        threads: ONNX Runtime's threads per call (1 leaves the other core to the HTTP side).
        top_k: the most probable classes each answer carries.
        min_confidence: answer ``"unsure"`` (label null) where the most probable class has a
            lower probability; None: always the most probable class.
        workers: processes answering on the one port, each with its own ONNX Runtime session.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_mb: float = 10.0
    max_images: int = 256
    max_batch: int = 64
    batch_wait_ms: float = 0.0
    threads: int = 1
    min_confidence: float | None = None
    workers: int = 1
    top_k: int = TOP_K

    @property
    def max_body_bytes(self) -> int:
        return round(self.max_body_mb * 1e6)

    def validate(self) -> None:
        """Check every value before anything is loaded."""
        check_min_confidence(self.min_confidence)
        if not 0 <= self.port <= 65535:
            raise ConvnetError(f"--port must be between 0 and 65535, got {self.port}")
        if not (math.isfinite(self.max_body_mb) and self.max_body_mb >= 0.001):  # NaN and inf are no byte count
            raise ConvnetError(f"--max-body-mb must be a finite number of at least 0.001 (MB), got "
                               f"{self.max_body_mb:g}")
        if self.max_images < 1:
            raise ConvnetError(f"--max-images must be at least 1, got {self.max_images}")
        if self.max_batch < 1:
            raise ConvnetError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConvnetError(f"--batch-wait-ms must be between 0 and 1000, got {self.batch_wait_ms:g}")
        if self.threads < 1:
            raise ConvnetError(f"threads must be at least 1, got {self.threads}")
        check_top_k(self.top_k)
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConvnetError(f"--workers must be between 1 and {MAX_WORKERS}, got {self.workers}")


def prediction_rows(probs: np.ndarray, classes: tuple[str, ...], inputs: np.ndarray | None = None,
                    min_confidence: float | None = None, top_k: int = TOP_K) -> list[dict[str, Any]]:
    """The JSON of each image's prediction, rows made by the one builder that ``convnet
    predict`` uses (:func:`~convnet.use.prediction.rows_of`): label, class, probability and the
    top classes; with ``inputs``, each image as the model sees it (a PNG data URL)."""
    rows = [row.to_json() for row in rows_of([""] * len(probs), probs, classes, top_k=top_k,
                                             min_confidence=min_confidence)]
    for i, row in enumerate(rows):
        del row["input"]  # an HTTP request names no files
        if inputs is not None:
            row["input"] = png_data_url(inputs[i])
    return rows


def png_data_url(image: np.ndarray) -> str:
    """A uint8 ``(C, H, W)`` image as a ``data:image/png`` URL: what the model sees."""
    a = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W) or (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else "RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(model: OnnxModel, options: ServeOptions, *, metrics_dir: Path | None = None) -> FastAPI:
    """The FastAPI application serving ``model``; ``metrics_dir``: the folder where the
    workers of one server keep their metrics (None: this process only)."""
    options.validate()
    metrics = ServiceMetrics(model.metadata.get("convnet.model", "unknown"), model.path.name, model.test_accuracy,
                             multiprocess_dir=metrics_dir)
    batcher = Batcher(model.probabilities, options.max_batch, options.batch_wait_ms / 1000,
                      on_batch=metrics.batch_images.observe)
    page = resources.files("convnet.use").joinpath("page.html").read_text(encoding="utf-8")
    ready = asyncio.Event()  # set once the warm-up prediction has run
    not_ready = "warming up: the first prediction has not run yet"  # why /ready answers 503

    async def warm_up() -> None:
        """One prediction of a blank image along a request's path, before /ready says 200."""
        nonlocal not_ready
        try:
            probs = await batcher.submit(np.zeros((1, *model.spec.shape), np.uint8))
            prediction_rows(probs, model.spec.classes, None, options.min_confidence, options.top_k)
        except ConvnetError as e:
            not_ready = f"the first prediction failed: {e}"
            print(f"convnet: error: {not_ready}", file=sys.stderr, flush=True)
            return
        ready.set()
        metrics.ready.set(1)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        warming = asyncio.create_task(warm_up())  # in the background: /health and /ready answer meanwhile
        yield
        warming.cancel()
        metrics.ready.set(0)
        batcher.stop()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title="convnet", version=__version__, lifespan=lifespan,
                  description=f"Predictions of {model.path.name}: {model.spec.channels}x{model.spec.height}x"
                              f"{model.spec.width} images, {model.spec.num_classes} classes.")
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(ConvnetError)
    async def model_failed(request: Request, e: ConvnetError) -> JSONResponse:  # the model's fault, not the request's
        print(f"convnet: error: {e}", file=sys.stderr, flush=True)
        return JSONResponse({"error": str(e)}, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.post("/predict", summary="Classify images", openapi_extra=PREDICT_OPENAPI,
              responses={200: {"description": "one prediction per image, in request order"},
                         400: {"description": "bad image or array: {\"error\": \"...\"}"},
                         413: {"description": "body or image count over the limit"},
                         415: {"description": "neither multipart/form-data nor application/json"}})
    async def predict(request: Request, include_input: bool = False) -> JSONResponse:
        """Images as multipart field `file` (repeatable), or JSON `{"images": [...]}` of pixel
        arrays (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 or floats in [0, 1].
        `include_input=true` adds each image as the model sees it (a PNG data URL)."""
        images = await request_images(request, model.spec, options.max_body_bytes, options.max_images)
        probs = await batcher.submit(images)
        metrics.images.inc(len(images))
        return JSONResponse({"predictions": prediction_rows(probs, model.spec.classes,
                                                            images if include_input else None,
                                                            options.min_confidence, options.top_k)})

    @app.get("/health", summary="200 while the model is loaded")
    async def health() -> JSONResponse:
        if not batcher.alive:
            return JSONResponse({"error": "the prediction thread is not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", summary="200 once the model has run a first prediction; 503 before")
    async def is_ready() -> JSONResponse:
        if not ready.is_set() or not batcher.alive:
            return JSONResponse({"error": not_ready if batcher.alive else "the prediction thread is not running"},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics: requests, latency, batch sizes, images, the model")
    def prometheus() -> Response:  # a plain def: FastAPI runs it on a thread, off the event loop
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/model", summary="Input spec, classes, test accuracy, versions, limits")
    async def about() -> JSONResponse:
        limits = {"max_body_bytes": options.max_body_bytes, "max_images": options.max_images,
                  "max_batch": options.max_batch, "batch_wait_ms": options.batch_wait_ms,
                  "min_confidence": options.min_confidence}
        return JSONResponse({**model.describe(), "backend": "onnxruntime", "server_version": __version__,
                             "limits": limits, "served": {"batches": batcher.batches, "images": batcher.images,
                                        "requests_waiting": batcher.waiting}})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


PREDICT_OPENAPI: dict[str, Any] = {"requestBody": {"required": True, "content": {
    MULTIPART: {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    JSON: {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {}, "description": "pixel arrays in the model's shape"}}}},
}}}


def model_bytes(source: str | Path, threads: int = 1) -> tuple[Path, bytes]:
    """The model to serve as the bytes of an ``.onnx`` file, and what they came from: an
    ``.onnx`` file read (once checked), or a run folder's kept export or one made in memory."""
    model = open_model(source, device="cpu", threads=threads)  # checked against `convnet predict RUN --device cpu`
    return model.path, export_in_memory(model, threads) if isinstance(model, LoadedRun) else model.path.read_bytes()


def load_for_serving(source: str | Path, threads: int = 1) -> OnnxModel:
    """The model to serve, in ONNX Runtime: an ``.onnx`` file, or a run folder exported in memory."""
    path, content = model_bytes(source, threads)
    return open_onnx(path, threads=threads, content=content)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or one clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConvnetError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    except UnicodeError:  # a name the IDNA codec refuses: an empty label ("a..b"), one over 63 characters
        raise ConvnetError(f"--host {host[:80]}: not a valid host name or address") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)  # IPPROTO_TCP: the event loop turns Nagle off only on such sockets
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections on Linux
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConvnetError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(source: str | Path, options: ServeOptions = ServeOptions()) -> None:
    """What ``convnet serve`` does: load the model, listen, answer until SIGTERM or Ctrl-C;
    with ``options.workers`` > 1 in that many worker processes on the one socket.

    Raises:
        ConvnetError: a bad option, a model that cannot be served, a port taken, a worker
            that stopped on its own.
    """
    options.validate()
    sock = bind(options.host, options.port)  # before the model: a taken port fails at once
    if options.workers == 1:
        model = load_for_serving(source, options.threads)
        app = create_app(model, options)
        _announce(model.path, sock, options.workers)
        # uvicorn answers SIGTERM by finishing the requests in flight, then raises the signal again
        # to the handler it found: this one, so that a stop on request ends with status 0
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        _run(app, sock)
    else:
        path, content = model_bytes(source, options.threads)  # a run folder is exported once, here
        _announce(path, sock, options.workers)
        with tempfile.TemporaryDirectory(prefix="convnet-serve-") as tmp, \
                shared_metrics(Path(tmp) / "metrics") as folder:
            model_file = Path(tmp) / "model.onnx"  # read by each worker: a worker's start waits for no pipe
            model_file.write_bytes(content)
            run_workers(_worker, (path, model_file, options, sock, folder, os.getpid()), options.workers,
                        on_exit=lambda pid: worker_exited(pid, folder))
    print("server stopped", file=sys.stderr, flush=True)


def _announce(path: Path, sock: socket.socket, workers: int) -> None:
    """The one line saying where the service listens (``--port 0``: the port chosen)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    how = f" with {workers} workers" if workers > 1 else ""
    print(f"serving {path} on http://{shown}:{port}/{how} (page at /, API docs at /docs); Ctrl-C to stop",
          flush=True)


def _worker(path: Path, model_file: Path, options: ServeOptions, sock: socket.socket, metrics_dir: Path,
            parent: int, index: int) -> None:
    """One worker of ``convnet serve --workers N``, in its own process: its own ONNX Runtime
    session of ``model_file`` (the model served from ``path``), answering on the shared socket
    until SIGTERM."""
    as_worker(parent)
    try:
        model = open_onnx(path, threads=options.threads, content=model_file.read_bytes())
        app = create_app(model, options, metrics_dir=metrics_dir)
    except ConvnetError as e:
        print(f"convnet: error: worker {index}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    _run(app, sock)


def _run(app: FastAPI, sock: socket.socket) -> None:
    """Answer on ``sock`` until SIGTERM or Ctrl-C (uvicorn lets the requests in flight finish)."""
    import uvicorn

    gc.collect()
    gc.freeze()  # the millions of objects torch and onnx left are never collected: shorter pauses under load
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                            timeout_keep_alive=30, backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])
