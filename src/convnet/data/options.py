"""Which data a run trains on, as plain data: :class:`DataOptions`, each field the one
declaration of its option (:mod:`convnet.core.options`), checked before anything is read. No
torch: the command line builds its flags from here; :func:`convnet.data.load.load_data` reads
what the options name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convnet.core.errors import DataError
from convnet.core.options import BENCH, ESTIMATOR, TRAIN, TUNE, TUTORIAL, option
from convnet.data.catalog import DATASETS, named

DEFAULT_DATASET = "fashion-mnist"
REST = "rest"  # --unlabeled rest: the training images --subset leaves out are the pool
LAYOUTS = ("auto", "nchw", "nhwc")  # how a 4-d array is read: --layout
NAMED = frozenset({TRAIN, TUNE, TUTORIAL, BENCH})  # the commands that read a named data set
FOLDERS = frozenset({TRAIN, TUNE})  # the commands that read a folder of images


def parse_image_size(text: str) -> tuple[int, int]:
    """``"32"`` -> ``(32, 32)``; ``"48x64"`` (height x width) -> ``(48, 64)``.

    Raises:
        DataError: anything else.
    """
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise DataError(f"--image-size {text!r}: give N (square) or HxW in pixels, e.g. 32 or 48x64") from None
    if len(parts) > 2:
        raise DataError(f"--image-size {text!r}: give N (square) or HxW in pixels, e.g. 32 or 48x64")
    return h, w


def check_subset(subset: int | None) -> None:
    """The one check of ``--subset`` (None: every image), made before anything is read.

    Raises:
        DataError: not a positive number of images.
    """
    if subset is not None and subset <= 0:
        raise DataError(f"--subset must be a positive number of images, got {subset}")


@dataclass(frozen=True)
class DataOptions:
    """Which data to train on, and how to read it: a named data set, or a folder of images
    (``folder``). Each field's help (``convnet train --help``) says what it does.

    ``cache_dir`` (where downloads and decoded folders are kept; default
    ``~/.cache/convnet``) is for Python callers only.
    """

    dataset: str | None = option(None, "named data set, see `convnet datasets`", choices=tuple(DATASETS),
                                 takes=NAMED, shown=DEFAULT_DATASET)
    data_dir: str | None = option(None, "folder with the named data set's files", takes=NAMED, metavar="DIR",
                                  shown="the cache, then a system copy, then a download")
    folder: str | None = option(None, "a folder of images, one subfolder per class (or train/ and test/ of them)",
                                takes=FOLDERS, flag="--data", metavar="DIR", shown="the named --dataset")
    subset: int | None = option(None, "train on N of the training images, a stratified draw by --seed (with "
                                "--unlabeled rest the others are the unlabelled pool)", takes=FOLDERS, metavar="N",
                                shown="all")
    unlabeled: str | None = option(None, "a folder of unlabelled images (any layout, searched recursively) that "
                                   "training learns from too (any image that is also a labelled one is left out); or "
                                   "rest: the training images --subset leaves out",
                                   takes=FOLDERS, metavar="DIR|rest", shown="labelled images only")
    image_size: tuple[int, int] | None = option(None, "with --data: the size images are converted to",
                                                takes=FOLDERS, metavar="N|HxW", parse=parse_image_size,
                                                shown="the most common, at most 64")
    channels: int | None = option(None, "with --data: 1 grey or 3 colour", choices=(1, 3), takes=FOLDERS,
                                  shown="3 when any image has colour")
    test_split: float = option(0.2, "with --data and no test/ folder: the share held out for testing",
                               takes=FOLDERS)
    skip_bad_images: bool = option(False, "leave out images that cannot be decoded, listed in the run folder "
                                   "(off: stop at the first)", takes=FOLDERS)
    hflip: bool | None = option(None, "whether a mirrored image keeps its class, for flip augmentation and --tta",
                                takes={*FOLDERS, ESTIMATOR}, shown="the data set's: yes, but no for mnist")
    memory_budget_mb: float | None = option(None, "a folder's images larger than this are read from the cache a "
                                            "batch at a time", takes=FOLDERS, flag="--memory-budget", metavar="MB",
                                            shown="half the memory available")
    cache_dir: str | None = None

    @property
    def name(self) -> str:
        """The named data set these options read (when ``folder`` is None)."""
        return self.dataset or DEFAULT_DATASET

    def validate(self) -> None:
        """Check every value before anything is read or written."""
        if self.folder is not None:
            for flag, value in (("--dataset", self.dataset), ("--data-dir", self.data_dir)):
                if value is not None:
                    raise DataError(f"--data {self.folder} (a folder of images) and {flag} {value} cannot be "
                                    "combined; give one")
            if not Path(self.folder).is_dir():
                raise DataError(f"--data {self.folder}: no such folder")
        else:
            ds = named(self.name)
            for flag, value in (("--image-size", self.image_size), ("--channels", self.channels)):
                if value is not None:
                    raise DataError(f"{flag} applies to folders of images (--data DIR); {ds.name} images are "
                                    f"{ds.channels}x{ds.height}x{ds.width}")
        check_subset(self.subset)
        if self.unlabeled == REST and self.subset is None:
            raise DataError("--unlabeled rest makes the training images --subset leaves out the pool: give --subset N")
        if self.unlabeled not in (None, REST):
            pool = Path(self.unlabeled)
            if not pool.is_dir():
                what = "a file, not a folder" if pool.exists() else "no such folder"
                raise DataError(f"--unlabeled {pool}: {what} (give a folder of images, or rest)")
            if self.folder is not None and pool.resolve() == Path(self.folder).resolve():
                raise DataError(f"--unlabeled {pool} is --data itself, whose images are labelled by their class "
                                "folders; put the unlabelled images in a folder of their own, beside it")
            if self.folder is not None and Path(self.folder).resolve() in pool.resolve().parents:
                raise DataError(f"--unlabeled {pool} lies inside --data {self.folder}, where it would be read as a "
                                "class; put the unlabelled images beside the labelled folder, not in it")
        if self.channels not in (None, 1, 3):
            raise DataError(f"--channels must be 1 or 3, got {self.channels}")
        if self.image_size is not None and not (8 <= min(self.image_size) and max(self.image_size) <= 1024):
            raise DataError(f"--image-size must be between 8 and 1024 pixels, got {self.image_size}")
        if not 0 < self.test_split < 1:
            raise DataError(f"--test-split must be a fraction between 0 and 1, got {self.test_split}")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            raise DataError(f"--memory-budget must be >= 0 MB, got {self.memory_budget_mb}")
