"""The HTTP prediction service: FastAPI on uvicorn, ONNX Runtime behind a batcher.

::

    POST /predict   images as multipart field ``file`` (repeatable) or JSON {"images": [...]}
    GET  /health    200 while the model is loaded and the batcher runs
    GET  /model     input spec, classes, test accuracy, versions, limits
    GET  /docs      the OpenAPI docs (``/openapi.json`` the schema)
    GET  /          a page to try an image (:file:`page.html`, no external scripts)

Concurrent requests are predicted together: a request's images go on a queue, and one
thread takes everything queued (up to ``max_batch`` images; with ``batch_wait_ms`` > 0 it
also waits that long after the first arrival for more), predicts it in one ONNX Runtime
call, and hands each request its rows. The requests that arrive while a batch runs form
the next one, so batches grow with the load without any wait; on 2 cores, where parsing
HTTP costs more than the model, a wait only added latency (README), hence its default 0.
ONNX Runtime is the backend because it was measured faster than PyTorch on small batches
here (README, "Use the model elsewhere"); a run folder is exported to ONNX in memory when
the server starts.

Every bad request is answered 4xx with ``{"error": "..."}`` naming the problem, before
any of it reaches the model; a body over ``max_body_bytes`` is refused (and not kept). A
model that fails in ONNX Runtime (a file changed after its export) is answered 500 with
``{"error": "..."}`` saying why, and the same line on the server's stderr.
Uvicorn handles SIGTERM and Ctrl-C: it stops accepting connections, lets the requests in
flight finish, then the batcher stops.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from convnet.errors import ConvnetError, InputError

TOP_K = 5
DRAIN_FACTOR = 4  # a body over the limit is read and dropped up to 4 times the limit, then cut off
_UPLOAD_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # how Pillow names bytes in its errors
_DIGITS = re.compile(r"[0-9]+")
MULTIPART, JSON = "multipart/form-data", "application/json"


@dataclass(frozen=True)
class ServeOptions:
    """How the service listens and what it accepts.

    Attributes:
        host: address to bind; 127.0.0.1 keeps it on this machine.
        port: TCP port; 0 picks a free one (printed at start).
        max_body_bytes: largest request body read (413 beyond).
        max_images: most images in one request (413 beyond).
        max_batch: most images predicted in one ONNX Runtime call.
        batch_wait_ms: how long the batcher waits for more requests after the first one
            while the batch is not full.
        threads: ONNX Runtime's threads per call (1 leaves the other core to the HTTP side).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 10_000_000
    max_images: int = 256
    max_batch: int = 64
    batch_wait_ms: float = 0.0
    threads: int = 1

    def validate(self) -> None:
        """Check every value before anything is loaded."""
        if not 0 <= self.port <= 65535:
            raise ConvnetError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_body_bytes < 1000:
            raise ConvnetError(f"--max-body-mb must be at least 0.001 MB, got {self.max_body_bytes / 1e6:g}")
        if self.max_images < 1:
            raise ConvnetError(f"--max-images must be at least 1, got {self.max_images}")
        if self.max_batch < 1:
            raise ConvnetError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConvnetError(f"--batch-wait-ms must be between 0 and 1000, got {self.batch_wait_ms:g}")
        if self.threads < 1:
            raise ConvnetError(f"threads must be at least 1, got {self.threads}")


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# --- the model behind the service


def load_for_serving(source: str | Path, threads: int = 1) -> Any:
    """An :class:`~convnet.onnxfile.OnnxModel` for an .onnx file, or for a run folder
    exported in memory (checked against PyTorch fp32 on random images first)."""
    from convnet.onnxfile import OnnxModel, is_onnx, new_session, open_onnx

    if is_onnx(source):
        return open_onnx(source, threads=threads)
    import torch

    from convnet.engine import Engine
    from convnet.export import MAX_PROBABILITY_DIFFERENCE, export_model, run_metadata, set_metadata
    from convnet.predict import infer, load_model

    model, run = load_model(source, Engine.faithful())
    proto = export_model(model, run.spec, tta=run.tta)
    session = new_session(proto.SerializeToString(), threads)
    probe = torch.randint(0, 256, (32, *run.spec.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = infer(model, probe, engine=Engine.faithful(), tta=run.tta).softmax(dim=1).numpy()
    difference = float(np.abs(session.run(None, {"images": probe.numpy()})[0] - expected).max())
    if difference > MAX_PROBABILITY_DIFFERENCE:
        raise ConvnetError(f"{run.path}: the model exported for serving differs from PyTorch by {difference:.1e} "
                           "on random images; export it with `convnet export` to see the parity figures")
    set_metadata(proto, run_metadata(run, None))
    metadata = {p.key: p.value for p in proto.metadata_props}
    return OnnxModel(run.path, run.spec, metadata, session)


class Batcher:
    """One thread that predicts queued requests together (see the module's docstring)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int, wait_s: float) -> None:
        self.predict, self.max_batch, self.wait_s = predict, max_batch, wait_s
        self.queue: queue.SimpleQueue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="convnet-batcher", daemon=True)
        self.batches = self.images = self.waiting = 0  # counters, for /model

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, K)`` of uint8 ``(n, C, H, W)``, predicted with whatever else is queued."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.queue.put((images, future))
        self.waiting += 1
        try:
            return await future
        finally:
            self.waiting -= 1

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, held, stop = [first], len(first[0]), False
            deadline = time.monotonic() + self.wait_s
            while held < self.max_batch:
                try:  # take what is queued now; wait for more only until the deadline
                    item = self.queue.get_nowait() if self.wait_s == 0 else self.queue.get(
                        timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                held += len(item[0])
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        loop = batch[0][1].get_loop()  # one event loop serves every request
        try:
            probs = self.predict(np.concatenate([images for images, _ in batch]))  # (sum n, K)
        except Exception as e:  # a model failure is answered to every request of the batch
            loop.call_soon_threadsafe(_deliver, [(future, e) for _, future in batch])
            return
        self.batches += 1
        self.images += len(probs)
        answers: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]] = []
        start = 0
        for images, future in batch:
            answers.append((future, probs[start:start + len(images)]))
            start += len(images)
        loop.call_soon_threadsafe(_deliver, answers)  # one wake-up of the event loop per batch


def _deliver(answers: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]]) -> None:
    """Hand each waiting request its rows (or the model's error); on the event loop."""
    for future, value in answers:
        if future.done():  # the client went away
            continue
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)


# --- requests to images


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is longer than ``limit`` bytes: nothing past
    the limit is kept, and at most ``DRAIN_FACTOR * limit`` bytes are read (and dropped) so
    that the client, still sending, can read the answer; a longer body is cut off."""
    declared = request.headers.get("content-length")
    if declared is not None and not _DIGITS.fullmatch(declared):  # not str.isdigit: "²".isdigit() is True
        raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number")
    said, length = "", None
    if declared is not None:
        digits = declared.lstrip("0") or "0"
        length = int(digits) if len(digits) <= 18 else 10**18 + 1  # int() refuses 4,300 digits and more
        said = f" of {length:,} bytes" if length <= 10**18 else " of more than 10^18 bytes"
    too_long = RequestError(413, f"request body{said} is over the limit of {limit:,} bytes (--max-body-mb)")
    if length is not None and length > DRAIN_FACTOR * limit:
        raise too_long  # too long even to drain: the connection is closed under the client
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()  # keep reading, but nothing more, until the drain bound
            if size > DRAIN_FACTOR * limit:
                break
        else:
            chunks.append(chunk)
    if size > limit:
        raise too_long
    return b"".join(chunks)


async def request_images(request: Request, spec: Any, options: ServeOptions) -> np.ndarray:
    """uint8 ``(n, C, H, W)`` in ``spec`` from a multipart or JSON request, checked whole."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in (MULTIPART, JSON):
        raise RequestError(415, f"content type {content_type or 'none'!r} is not accepted; send images as "
                                f"{MULTIPART} (field 'file') or {JSON} ({{\"images\": [...]}})")
    body = await read_body(request, options.max_body_bytes)
    if not body:
        raise RequestError(400, "empty request: send one or more images")
    if kind == JSON:
        return _json_images(body, spec, options.max_images)
    return await _multipart_images(content_type, body, spec, options.max_images)


def _json_images(body: bytes, spec: Any, max_images: int) -> np.ndarray:
    from convnet.inputs import images_from_array

    try:
        data = json.loads(body)
    except RecursionError:  # json's parser recurses once per "[" or "{"
        raise RequestError(400, "body is not usable JSON: its arrays or objects are nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # both ValueErrors, with a position worth showing
        raise RequestError(400, f"body is not valid JSON ({e})") from None
    except ValueError as e:  # e.g. an integer of thousands of digits, which Python refuses to convert
        problem = "a number with too many digits" if "digits" in str(e) else str(e).split(";")[0]
        raise RequestError(400, f"body is not usable JSON ({problem})") from None
    if not isinstance(data, dict) or set(data) != {"images"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise RequestError(400, f"expected a JSON object {{\"images\": [...]}}, got {keys}")
    images = data["images"]
    if not isinstance(images, list) or not images:
        raise RequestError(400, "\"images\" must be a non-empty list of images (pixel arrays)")
    if len(images) > max_images:
        raise RequestError(413, f"{len(images)} images in one request; at most {max_images} (--max-images)")
    try:
        array = np.array(images)
    except (ValueError, OverflowError):  # ragged lists, numbers too large for any dtype
        raise RequestError(400, "\"images\" is not a regular array: every image must have the same shape") from None
    if array.dtype == bool or array.dtype.kind not in "iuf":
        raise RequestError(400, f"\"images\" holds {array.dtype} values; expected numbers, uint8 in [0, 255] "
                                "or floats in [0, 1]")
    if array.ndim == 3 and spec.channels == 3 and array.shape[1:] != (spec.height, spec.width):
        array = array[None]  # a single (H, W, 3) or (3, H, W) image sent without its list
    try:
        return images_from_array(array, "images", spec).numpy()
    except InputError as e:
        raise RequestError(400, str(e).replace("--layout", "a transposed array")) from None


async def _multipart_images(content_type: str, body: bytes, spec: Any, max_images: int) -> np.ndarray:
    from convnet.inputs import load_image

    files = [(filename, data) for _, filename, data in parse_multipart(body, content_type, max_images)]
    if not files:
        raise RequestError(400, "no field 'file' in the form: send images as field 'file' (repeatable)")
    out = np.empty((len(files), *spec.shape), np.uint8)
    for i, (filename, data) in enumerate(files):
        name = filename or f"file {i + 1}"
        if not data:
            raise RequestError(400, f"{name}: empty file")
        try:
            out[i] = (load_image(data, spec) if len(data) < 65536 else
                      await asyncio.to_thread(load_image, data, spec)).numpy()  # big images off the event loop
        except InputError as e:
            problem = _UPLOAD_REPR.sub("the upload", str(e).removeprefix("<image>: "))
            raise RequestError(400, f"{name} (file {i + 1} of {len(files)}): {problem}") from None
    return out


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[tuple[str, str | None, bytes]]:
    """``(field name, file name, content)`` of each part of a multipart/form-data body
    (RFC 7578), held whole in memory (it is at most the body limit). Every part must be a
    field ``file``; more than ``max_files`` of them is refused (413)."""
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise RequestError(400, "malformed multipart form: no boundary in its Content-Type")
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise RequestError(400, "malformed multipart form: no boundary line in the body")
    parts: list[tuple[str, str | None, bytes]] = []
    pos += len(delimiter)
    while not body.startswith(b"--", pos):  # "--boundary--" closes the form
        end = body.find(b"\r\n" + delimiter, pos)
        if not body.startswith(b"\r\n", pos) or end < 0:
            raise RequestError(400, "malformed multipart form: a part is not closed by a boundary line "
                                    "(a truncated body?)")
        head, blank, content = body[pos + 2:end].partition(b"\r\n\r\n")
        if not blank:
            raise RequestError(400, "malformed multipart form: a part without headers")
        name, filename = _disposition(head)
        if name != "file":
            raise RequestError(400, f"unexpected form field {name!r}; send images as field 'file'")
        parts.append((name, filename, content))
        if len(parts) > max_files:
            raise RequestError(413, f"more than {max_files} images in one request; at most {max_files} (--max-images)")
        pos = end + 2 + len(delimiter)
    return parts


def _disposition(head: bytes) -> tuple[str, str | None]:
    """The field name and file name of a part, from its Content-Disposition header."""
    from python_multipart.multipart import parse_options_header

    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            kind, params = parse_options_header(value.strip())
            if kind == b"form-data" and b"name" in params:
                filename = params.get(b"filename")
                return (params[b"name"].decode("utf-8", "replace"),
                        filename.decode("utf-8", "replace") if filename is not None else None)
    raise RequestError(400, "malformed multipart form: a part without a Content-Disposition form-data name")


# --- answers


def prediction_rows(probs: np.ndarray, classes: tuple[str, ...], inputs: np.ndarray | None = None) -> list[dict]:
    """The JSON of each image's prediction: label, class, probability and the top classes."""
    k = min(TOP_K, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n, k), most probable first
    rows = []
    for i, order in enumerate(top.tolist()):
        best = [{"label": j, "class": classes[j], "probability": round(float(probs[i, j]), 6)} for j in order]
        row: dict[str, Any] = {**best[0], "top": best}
        if inputs is not None:
            row["input"] = png_data_url(inputs[i])
        rows.append(row)
    return rows


def png_data_url(image: np.ndarray) -> str:
    """A uint8 ``(C, H, W)`` image as a ``data:image/png`` URL: what the model sees."""
    from PIL import Image

    a = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W) or (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a), "L" if a.ndim == 2 else "RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- the application


def create_app(model: Any, options: ServeOptions) -> FastAPI:
    """The FastAPI application serving ``model`` (an :class:`~convnet.onnxfile.OnnxModel`)."""
    from convnet import __version__

    options.validate()
    batcher = Batcher(model.probabilities, options.max_batch, options.batch_wait_ms / 1000)
    page = resources.files("convnet").joinpath("page.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()  # after uvicorn has let the requests in flight finish

    app = FastAPI(title="convnet", version=__version__, lifespan=lifespan,
                  description=f"Predictions of {model.path.name}: {model.spec.channels}x{model.spec.height}x"
                              f"{model.spec.width} images, {model.spec.num_classes} classes.")

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
        images = await request_images(request, model.spec, options)
        probs = await batcher.submit(images)
        return JSONResponse({"predictions": prediction_rows(probs, model.spec.classes,
                                                            images if include_input else None)})

    @app.get("/health", summary="200 while the model is loaded")
    async def health() -> JSONResponse:
        if not batcher.alive:
            return JSONResponse({"error": "the prediction thread is not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/model", summary="Input spec, classes, test accuracy, versions, limits")
    async def about() -> JSONResponse:
        limits = {"max_body_bytes": options.max_body_bytes, "max_images": options.max_images,
                  "max_batch": options.max_batch, "batch_wait_ms": options.batch_wait_ms}
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
    """What ``convnet serve`` does: load the model, listen, answer until SIGTERM or Ctrl-C."""
    import uvicorn

    options.validate()
    sock = bind(options.host, options.port)  # before the model: a taken port fails at once
    model = load_for_serving(source, options.threads)
    app = create_app(model, options)
    gc.collect()
    gc.freeze()  # the millions of objects torch and onnx left are never collected: shorter pauses under load
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model.path} on http://{shown}:{port}/ (page at /, API docs at /docs); Ctrl-C to stop",
          flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30,
                            timeout_keep_alive=30, backlog=2048)
    # uvicorn answers SIGTERM by finishing the requests in flight, then raises the signal again
    # to the handler it found: this one, so that a stop on request ends with status 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("server stopped", file=sys.stderr, flush=True)
