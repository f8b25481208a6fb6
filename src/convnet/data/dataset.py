"""Data set types: the input spec, splits of images and labels, and ways to divide them.

A split keeps images the way they are stored, uint8 ``(N, C, H, W)``, and scales a batch
to float in [0, 1] only when it is taken (:func:`to_float`): Fashion-MNIST stays at 47 MB
instead of 188 MB and lives whole on a GPU. A data set too large for memory keeps its
images in its cache file (:class:`DiskImages`) and reads a batch at a time.

What a trained model expects of an image is its :class:`~convnet.core.inputspec.InputSpec`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convnet.core.errors import DataError
from convnet.core.inputspec import InputSpec
from convnet.data.arrayfiles import NpyFile
from convnet.data.options import check_subset

# The default validation share holds out nothing where it would hold out fewer images than this a class (on
# average): on 10 images of 10 classes the standard error of an accuracy is 15 points, no way to tell one epoch
# from another, and the images are a tenth of the labels. Measured on 2,000 images no run chose on
# (docs/data.md): 100 Fashion-MNIST labels, 0.751 trained on all of them against 0.696 holding 10 out.
MIN_VALIDATION_PER_CLASS = 10


class DiskImages:
    """uint8 images ``(N, C, H, W)`` left in a ``.npy`` file and read on demand: indexing
    with a slice or with row numbers reads just those rows (one positioned read each), so
    memory stays bounded whatever the file's size. ``rows`` selects and orders a subset.
    """

    def __init__(self, path: str | os.PathLike[str], rows: np.ndarray | None = None) -> None:
        self.file = NpyFile(path)
        if self.file.dtype != np.uint8 or len(self.file.shape) != 4:
            raise DataError(f"{path}: expected uint8 images (N, C, H, W), found {self.file.dtype} {self.file.shape}")
        self.rows = np.arange(len(self.file)) if rows is None else np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.file.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(index, slice):
            rows = self.rows[index]
        else:
            rows = self.rows[np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)]
        return torch.from_numpy(self.file.take(rows))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.file.row_bytes

    def load(self) -> torch.Tensor:
        """These images, read into memory."""
        return torch.from_numpy(self.file.take(self.rows))

    def subset(self, rows: np.ndarray | torch.Tensor) -> DiskImages:
        """The images at ``rows`` of this one, still on disk."""
        out = DiskImages.__new__(DiskImages)
        out.file, out.rows = self.file, self.rows[np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)]
        return out


Images = torch.Tensor | DiskImages


@dataclass(frozen=True)
class Split:
    """Images ``(N, C, H, W)`` uint8 (in memory, or :class:`DiskImages`) and labels ``(N,)`` int64."""

    images: Images
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """The split on ``device``; images on disk stay there (batches move as they are read)."""
        images = self.images if isinstance(self.images, DiskImages) else self.images.to(device)
        return Split(images, self.labels.to(device))

    def take(self, rows: torch.Tensor | np.ndarray | slice) -> Split:
        """The images and labels at ``rows`` (a copy in memory; a view for images on disk)."""
        if isinstance(self.images, DiskImages):
            if isinstance(rows, slice):
                rows = np.arange(len(self))[rows]
            images: Images = self.images.subset(rows)
        else:
            images = self.images[rows]
        labels = self.labels[rows if not isinstance(rows, np.ndarray) else torch.from_numpy(rows)]
        return Split(images, labels)

    def first(self, n: int | None) -> Split:
        """The first ``n`` images (all of them when ``n`` is None)."""
        return self if n is None or n >= len(self) else self.take(slice(0, n))


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set: its input spec, a training and a test split, and a
    validation split where it has one (a folder's ``val/``, or held out by :meth:`held_out`).

    Attributes:
        name: ``fashion-mnist``, ``mnist``, ``cifar10`` or ``folder``.
        spec: channels, size, class names and preprocessing of its images.
        source: where the images were read from (a folder, absolute).
        subset: only the first ``subset`` training images were kept.
        origin: how to load the same data again, recorded in the run's ``config.json``
            (for a folder of images: its layout, image size, channels, split settings).
        notes: things a user should know about how it was read (files passed over …).
        files: for a folder of images, the files of each split (``train``, ``val``,
            ``test``), relative to ``source``, in the order of the splits' images.
        skipped: images left out because they could not be decoded.
        val: the validation split: images held out of training to choose by (None: none).
        pool: unlabelled images in ``spec`` that training learns from too (None: none).
        pool_record: what the run records of the pool: where it is, how many, its hash.
        pool_index: where the pool images lie among the training images a ``--subset``
            left out (``--unlabeled rest``), in the pool's order; None otherwise.
    """

    name: str
    spec: InputSpec
    train: Split
    test: Split
    source: str
    subset: int | None = None
    origin: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    files: dict[str, list[str]] | None = None
    skipped: tuple[str, ...] = ()
    val: Split | None = None
    pool: Images | None = None
    pool_record: dict[str, Any] | None = None
    pool_index: np.ndarray | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.spec.shape

    def held_out(self, fraction: float, seed: int, *, adapt: bool = False,
                 watched: bool = False) -> tuple[Dataset, str]:
        """The data set with its validation split: its own (a folder's ``val/``), else
        ``fraction`` of the training images held out (stratified, chosen by ``seed``); none
        when ``fraction`` is 0. And one line saying which.

        Args:
            adapt: ``fraction`` is a default, not asked for: where it would hold out fewer
                than :data:`MIN_VALIDATION_PER_CLASS` images a class on average, hold out
                none (and say so).
            watched: with ``adapt``, something needs validation (``--patience``,
                ``--target-accuracy``, ``--calibrate``): hold out at least one image of each
                class instead, and none (said) only where a class has a single image.

        Raises:
            DataError: a fraction asked for that leaves a class, or a side, empty.
        """
        if not fraction:
            unused = f"; the {len(self.val):,} images of val/ are not used" if self.val is not None else ""
            return replace(self, val=None, files=files_without(self.files, "val")), \
                f"no validation (--val-split 0): the last epoch's weights are kept{unused}"
        if self.val is not None:
            return self, (f"validation: the {len(self.val):,} images of the folder's val/ split (not --val-split); "
                          "the best epoch's weights are kept")
        if adapt and watched:
            counts = torch.bincount(self.train.labels.cpu())
            classes, n = int((counts > 0).sum()), len(self.train)
            if int(counts[counts > 0].min()) < 2 or n < 2 * classes:
                return replace(self, val=None), (f"no validation: {n:,} training images are too few to hold one of "
                                                 "each class out (a class has a single image); the last epoch's "
                                                 "weights are kept")
            fraction = max(fraction, classes / n)  # at least one image of each class
        elif adapt:
            classes, n = int((torch.bincount(self.train.labels.cpu()) > 0).sum()), len(self.train)
            held = math.ceil(fraction * n)
            if held < MIN_VALIDATION_PER_CLASS * classes:
                return replace(self, val=None), (
                    f"no validation: {held:,} held-out images (--val-split {fraction:g} of {n:,}) could not tell "
                    f"one epoch from another (fewer than {MIN_VALIDATION_PER_CLASS} a class), so all {n:,} train "
                    "and the last epoch's weights are kept; --val-split holds some out anyway")
        kept, held = stratified_split(self.train.labels, fraction, seed, "--val-split")
        files = self.files
        if files is not None:
            files = {**files, "train": [files["train"][i] for i in kept], "val": [files["train"][i] for i in held]}
        line = (f"validation: {len(held):,} of the {len(self.train):,} training images (--val-split {fraction:.3g}, "
                f"stratified, --seed {seed}); the best epoch's weights are kept")
        return replace(self, train=self.train.take(torch.from_numpy(kept)), val=self.train.take(
            torch.from_numpy(held)), files=files, origin={**self.origin, "val_held_out": True,
                                                          "val_split": fraction, "val_seed": seed}), line

    def draw(self, subset: int | None, seed: int, *, rest_as_pool: bool = False) -> Dataset:
        """The data set with ``subset`` of its training images, a stratified draw chosen by
        ``seed`` (in their order); with ``rest_as_pool`` the others become the unlabelled
        pool. ``None``, or as many as there are: all of them.

        Raises:
            DataError: fewer images than classes, or a class too small to be drawn from.
        """
        if subset is None:
            return self
        check_subset(subset)
        n = len(self.train)
        if subset >= n:
            kept, rest = np.arange(n), np.arange(0)
        else:
            from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

            y = self.train.labels.cpu().numpy()
            try:
                kept, rest = train_test_split(np.arange(n), train_size=subset, random_state=seed, stratify=y)
            except ValueError as e:
                raise DataError(f"--subset {subset}: a stratified draw of {subset} of {n:,} images of "
                                f"{len(np.unique(y))} classes is not possible ({e})") from None
            kept, rest = np.sort(kept), np.sort(rest)
        files = self.files
        if files is not None:
            files = {**files, "train": [files["train"][i] for i in kept],
                     **({"pool": [files["train"][i] for i in rest]} if rest_as_pool else {})}
        pool, record, index = self.pool, self.pool_record, self.pool_index
        if rest_as_pool:
            pool, index = self.train.take(torch.from_numpy(rest)).images, rest
            record = {"source": "rest", "images": len(rest)}  # the training images --subset leaves out
        return replace(self, train=self.train.take(torch.from_numpy(kept)), subset=subset, files=files, pool=pool,
                       pool_record=record, pool_index=index, origin={**self.origin, "subset_seed": seed})

    def first(self, subset: int | None) -> Dataset:
        """The data set with only the first ``subset`` training images (the test split whole)."""
        if subset is None:
            return self
        check_subset(subset)
        files = None if self.files is None else {**self.files, "train": self.files["train"][:subset]}
        return replace(self, train=self.train.first(subset), subset=subset, files=files)


def pixel_digests(images: Images, batch: int = 4096) -> list[bytes]:
    """The SHA-256 of each image's pixels (uint8, as the model sees them), in order."""
    out: list[bytes] = []
    for start in range(0, len(images), batch):
        part = images[start:start + batch]
        out.extend(hashlib.sha256(row.tobytes()).digest() for row in np.ascontiguousarray(part.numpy()))
    return out


def pool_without_labelled(dataset: Dataset) -> Dataset:
    """``dataset`` with the pool images that are also among its labelled ones (training,
    validation or test: the same pixels) left out, and a note saying how many: an image is
    labelled or in the pool, never both, and the test images are never learnt from.

    Raises:
        DataError: every pool image is a labelled one.
    """
    if dataset.pool is None or dataset.pool_record is None:
        return dataset
    sides = [("training", dataset.train), ("test", dataset.test)] + \
        ([("validation", dataset.val)] if dataset.val is not None else [])
    labelled = {d: side for side, split in sides for d in pixel_digests(split.images)}
    found = [labelled.get(d) for d in pixel_digests(dataset.pool)]
    keep = np.array([f is None for f in found])
    if keep.all():
        return dataset
    source = dataset.pool_record["source"]
    if not keep.any():
        raise DataError(f"--unlabeled {source}: every image in it is one of the labelled images of {dataset.source}; "
                        "give a folder of images that are not labelled")
    tests = sum(f == "test" for f in found)
    dropped = len(found) - int(keep.sum())
    note = (f"left out {dropped:,} of the {len(found):,} unlabelled images: the same pixels as labelled ones"
            + (f" ({tests:,} of them test images, which must not be learnt from)" if tests else ""))
    rows = np.flatnonzero(keep)
    pool = dataset.pool.subset(rows) if isinstance(dataset.pool, DiskImages) else dataset.pool[torch.from_numpy(rows)]
    return replace(dataset, pool=pool, pool_record={**dataset.pool_record, "labelled_left_out": dropped},
                   notes=(*dataset.notes, note))


def files_without(files: dict[str, list[str]] | None, side: str) -> dict[str, list[str]] | None:
    """A folder's files of each split (``Dataset.files``) less those of ``side`` (``val``, ``pool``)."""
    return None if files is None else {k: v for k, v in files.items() if k != side}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images to float32 in [0, 1], the tutorial's ``X / 255.0``."""
    return images.float() / 255.0


def batches(n: int, batch_size: int, *, drop_last: bool = False) -> Sequence[slice]:
    """Slices ``[0:b], [b:2b], …`` covering ``n`` items; the last may be short."""
    stop = n - n % batch_size if drop_last else n
    return [slice(start, min(start + batch_size, n)) for start in range(0, stop, batch_size)]


def stratified_split(labels: torch.Tensor | np.ndarray, fraction: float, seed: int, flag: str) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """Row numbers ``(kept, held_out)``, ``fraction`` of every class held out, chosen by
    ``seed`` (scikit-learn's ``train_test_split(stratify=...)``); both in ascending order.

    Raises:
        DataError: naming ``flag`` when the fraction is out of range or leaves a class,
            or a side, empty.
    """
    from sklearn.model_selection import train_test_split  # imported here: scikit-learn is slow to import

    if not 0 < fraction < 1:
        raise DataError(f"{flag} must be a fraction between 0 and 1, got {fraction}")
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    counts = np.bincount(y)
    if (counts[counts > 0] < 2).any():
        lonely = int(np.flatnonzero(counts == 1)[0])
        raise DataError(f"{flag} {fraction}: class {lonely} has a single image, which cannot be on both sides; "
                        "add images of it")
    rows = np.arange(len(y))
    try:
        kept, held = train_test_split(rows, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as e:
        raise DataError(f"{flag} {fraction} cannot divide {len(y)} images of {int((counts > 0).sum())} classes: "
                        f"{e}") from None
    return np.sort(kept), np.sort(held)


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out ``fraction`` of ``split`` for validation, stratified, chosen by ``seed``.

    Returns:
        ``(train, validation)``, each in the original order.
    """
    kept, held = stratified_split(split.labels, fraction, seed, "--val-split")
    return split.take(torch.from_numpy(kept)), split.take(torch.from_numpy(held))


def source_path(path: str | os.PathLike[str]) -> str:
    """The folder made absolute, so that a run folder's record of it holds from any working directory."""
    return os.path.abspath(Path(path))
