"""Files written whole or not at all: every file convnet writes (a run's config, history,
weights and checkpoint, its plots and report, an image cache, an ONNX file) goes through
:func:`atomic_write`, so a crash at any moment leaves the previous version whole."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from convnet.core.errors import ConvnetError, RunError


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` so that it is either old or new, never half.

    Raises:
        RunError: the folder cannot be written in (disk full, no permission); the
            previous version of ``path`` is kept.
    """
    with atomic_file(path) as f:
        write(f)


@contextlib.contextmanager
def atomic_file(path: Path, *, text: bool = False) -> Iterator[IO[Any]]:
    """A file to write ``path`` through, put in place only when the block ends without
    an exception: a file written a row at a time (a CSV of predictions) is whole or absent.
    ``text``: a UTF-8 text file (newlines as written), else bytes.

    Raises:
        RunError: the folder cannot be written in (disk full, no permission); the
            previous version of ``path`` is kept.
    """
    path = Path(path)
    try:
        # a temporary file in the same folder: the rename below stays on one file system, so it is atomic
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RunError(f"cannot write in {path.parent}: {e.strerror or e}; choose another --out") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb") as f:
            yield f
        replace_durably(Path(tmp), path)
    except BaseException as e:  # Ctrl-C included: never leave the temporary file behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, a folder in the way, …
            raise RunError(f"cannot write {path}: {e.strerror or e}; its previous version is kept") from None
        raise


def check_output_file(path: Path, flag: str) -> None:
    """Refuse, before anything is computed, an output path that cannot become a file:
    a folder, a file in a folder that does not exist or cannot be written in.

    Raises:
        ConvnetError: naming ``flag``, the path and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise ConvnetError(f"{flag} {path}: is a folder; give a file name in it")
    if not path.parent.is_dir():
        raise ConvnetError(f"{flag} {path}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise ConvnetError(f"{flag} {path}: folder {path.parent} is not writable")


def replace_durably(tmp: Path, final: Path) -> None:
    """Move the finished file ``tmp`` over ``final`` so that a crash leaves one or the
    other whole: its bytes reach the disk before the rename (else the new name could
    point at a file never written), and the rename itself is made durable by syncing the
    folder (else it could be undone on power loss)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
