"""Request bodies to images: what ``POST /predict`` accepts, checked before any of it
reaches the model.

A body is read up to its limit (413 beyond, and not kept); JSON ``{"images": [...]}`` of
pixel arrays and multipart forms of image files (field ``file``) become uint8
``(n, C, H, W)`` in the model's input spec, converted as ``convnet predict`` converts them.
Every bad request raises :class:`RequestError`: a 4xx status and a message naming the
problem.
"""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from convnet.core.errors import InputError
from convnet.data.arrays import images_from_array, load_image
from convnet.data.dataset import InputSpec

DRAIN_FACTOR = 4  # a body over the limit is read and dropped up to 4 times the limit, then cut off
_UPLOAD_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # how Pillow names bytes in its errors
_DIGITS = re.compile(r"[0-9]+")
MULTIPART, JSON = "multipart/form-data", "application/json"



class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


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


async def request_images(request: Request, spec: InputSpec, max_body_bytes: int, max_images: int) -> np.ndarray:
    """uint8 ``(n, C, H, W)`` in ``spec`` from a multipart or JSON request, checked whole:
    a body of at most ``max_body_bytes``, at most ``max_images`` images."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in (MULTIPART, JSON):
        raise RequestError(415, f"content type {content_type or 'none'!r} is not accepted; send images as "
                                f"{MULTIPART} (field 'file') or {JSON} ({{\"images\": [...]}})")
    body = await read_body(request, max_body_bytes)
    if not body:
        raise RequestError(400, "empty request: send one or more images")
    if kind == JSON:
        return _json_images(body, spec, max_images)
    return await _multipart_images(content_type, body, spec, max_images)


def _json_images(body: bytes, spec: InputSpec, max_images: int) -> np.ndarray:
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


async def _multipart_images(content_type: str, body: bytes, spec: InputSpec, max_images: int) -> np.ndarray:
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
            if "cannot identify image file" in problem:  # PIL's words for bytes that are no image it reads
                problem = "not an image file convnet can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)"
            raise RequestError(400, f"{name} (file {i + 1} of {len(files)}): {problem}") from None
    return out


def parse_multipart(body: bytes, content_type: str, max_files: int) -> list[tuple[str, str | None, bytes]]:
    """``(field name, file name, content)`` of each part of a multipart/form-data body
    (RFC 7578), held whole in memory (it is at most the body limit). Every part must be a
    field ``file``; more than ``max_files`` of them is refused (413).

    The parts are found by their boundary lines here; their headers are parsed by
    python-multipart (``parse_options_header``). Its streaming ``MultipartParser`` was
    measured in this function's place: 23 us per single-image body instead of 8, 540 us
    instead of 190 for 32 images, and 5-8 % fewer single-image requests per second under
    load (docs/serving.md), over the 5 % this project accepts for a library."""
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
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-disposition":
            kind, params = parse_options_header(value.strip())
            if kind == b"form-data" and b"name" in params:
                filename = params.get(b"filename")
                return (params[b"name"].decode("utf-8", "replace"),
                        filename.decode("utf-8", "replace") if filename is not None else None)
    raise RequestError(400, "malformed multipart form: a part without a Content-Disposition form-data name")


