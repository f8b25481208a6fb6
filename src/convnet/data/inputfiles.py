"""Inputs for prediction: the files named on a command line (image files, ``.npy`` arrays,
IDX files, folders of image files) read into uint8 batches in a run's input spec, a
bounded number at a time, each unreadable file's error in its place.

How an array or an image becomes one of the spec's images is :mod:`convnet.data.arrays`' job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convnet.core.errors import DataError, InputError
from convnet.data.arrayfiles import NpyFile, read_idx
from convnet.data.arrays import (
    BATCH_IMAGES,
    SpecLike,
    array_batches,
    as_spec,
    check_layout,
    images_from_array,
    load_image,
)
from convnet.data.dataset import InputSpec
from convnet.data.folderscan import image_files
from convnet.data.imagefiles import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Inputs:
    """Images from one file: names (one per image) and uint8 ``(N, C, H, W)``."""

    path: str
    names: list[str]
    images: torch.Tensor


@dataclass(frozen=True)
class Batch:
    """Up to a batch of images from one or more files, in order: a name for each image
    and uint8 ``(N, C, H, W)``."""

    names: list[str]
    images: torch.Tensor


def load_inputs(paths: Sequence[str | os.PathLike[str]], spec: SpecLike, *,
                layout: str = "auto") -> Iterator[Inputs | InputError]:
    """Read each path whole; yield its images, or the error that names what is wrong with it.

    :func:`input_batches` reads the same inputs in bounded memory, whatever their size.
    """
    check_layout(layout)
    for p in paths:
        try:
            yield load_input(Path(p), spec, layout)
        except InputError as e:
            yield e


def input_batches(paths: Sequence[str | os.PathLike[str]], spec: SpecLike, *,
                  layout: str = "auto", batch_size: int = BATCH_IMAGES) -> Iterator[Batch | InputError]:
    """The images of ``paths`` in batches of at most ``batch_size``, in order, and each
    file's error in its place.

    Memory stays bounded whatever the inputs: a ``.npy`` file is read from disk a batch at
    a time (never whole), and many small image files are gathered into one batch. Every
    check of a file (shape, type, values) is made before its first image is yielded.
    """
    check_layout(layout)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    names: list[str] = []
    parts: list[torch.Tensor] = []
    held = 0  # images in names/parts, not yet yielded
    for p in paths:
        try:
            for chunk_names, chunk in _file_chunks(Path(p), as_spec(spec), layout, batch_size):
                while len(chunk):
                    take = batch_size - held
                    names += chunk_names[:take]
                    parts.append(chunk[:take])
                    held += len(parts[-1])
                    chunk_names, chunk = chunk_names[take:], chunk[take:]
                    if held == batch_size:
                        yield Batch(names, torch.cat(parts))
                        names, parts, held = [], [], 0
        except InputError as e:
            if held:
                yield Batch(names, torch.cat(parts))
                names, parts, held = [], [], 0
            e.path = str(p)
            yield e
    if held:
        yield Batch(names, torch.cat(parts))


@dataclass(frozen=True)
class Expanded:
    """Inputs with every folder replaced by the image files in it.

    Attributes:
        files: the inputs, in order; a folder's image files (sorted, recursive, hidden ones
            left out) in its place.
        passed_over: the files in those folders that are not images, by their extension.
        from_folders: how many of ``files`` came from folders.
    """

    files: list[Path]
    passed_over: list[Path]
    from_folders: int


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> Expanded:
    """Replace each folder among ``paths`` by its image files, as ``convnet train --data``
    finds them; files are kept as they are (a missing one is named when it is read).

    Raises:
        InputError: a folder that cannot be read, or that holds no image files.
    """
    files: list[Path] = []
    passed_over: list[Path] = []
    from_folders = 0
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        try:
            images, others = image_files(p)
        except DataError as e:
            raise InputError(str(e)) from None
        if not images:
            raise InputError(f"{p}: a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or "
                             "below it")
        files += images
        passed_over += others
        from_folders += len(images)
    return Expanded(files, passed_over, from_folders)


def load_input(path: Path, spec: SpecLike, layout: str = "auto") -> Inputs:
    """One file's images, whole: an image file, a ``.npy`` array or an IDX file."""
    names: list[str] = []
    parts: list[torch.Tensor] = []
    for chunk_names, chunk in _file_chunks(Path(path), as_spec(spec), layout, BATCH_IMAGES):
        names += chunk_names
        parts.append(chunk)
    return Inputs(str(path), names, torch.cat(parts))


def _file_chunks(path: Path, spec: InputSpec, layout: str,
                 batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(names, uint8 (n, C, H, W))`` pieces of one file, ``n <= batch_size``; at least one."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    array: np.ndarray | NpyFile
    if suffix == ".npy":
        array = NpyFile(path)
    elif "idx" in path.name or suffix == ".gz" or path.name.endswith("ubyte"):
        try:
            array = read_idx(path)
        except DataError as e:
            raise InputError(str(e)) from None
        layout = "nchw" if array.ndim == 4 else layout
    else:
        yield [str(path)], load_image(path, spec).unsqueeze(0)
        return
    start = 0
    for images in array_batches(array, str(path), spec, layout, batch_size):
        yield [f"{path}[{i}]" for i in range(start, start + len(images))], images
        start += len(images)
    if start == 0:
        raise InputError(f"{path}: holds no images (shape {array.shape})")


def load_array(path: Path, spec: SpecLike, layout: str = "auto") -> torch.Tensor:
    """A ``.npy`` file of images as uint8 ``(N, C, H, W)``; never unpickles anything."""
    return images_from_array(NpyFile(path), str(path), spec, layout)
