"""What a folder of images holds, before any image is decoded: its classes, its files and
their labels, whether it comes divided into splits, and a manifest that changes whenever a
file does.

::

    DIR/cat/001.jpg, DIR/cat/002.png, DIR/dog/…        a class per subfolder (names sorted)
    DIR/train/cat/…, DIR/train/dog/…                   or splits: train/, and beside it val/ (or valid/,
    DIR/val/cat/…, DIR/test/cat/…                      validation/) and test/, each optional

A top level with split folders but no ``train/`` (``val/`` beside class folders, say) is
refused: it reads as neither layout.

Image files are recognised by their extension (:data:`~convnet.data.imagefiles.IMAGE_SUFFIXES`);
hidden files (``.DS_Store``) are passed over silently, other files (``notes.txt``) are
passed over and named.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from convnet.core.errors import DataError
from convnet.data.imagefiles import IMAGE_SUFFIXES


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, before any image is decoded."""

    root: Path
    layout: str  # "classes" (one folder per class), or the splits: "train", "train-val", "train-test", ...
    classes: tuple[str, ...]
    files: list[str]  # paths relative to root, by part (train, test, val), then by class, then by name
    labels: list[int]
    parts: list[int]  # TRAIN (or undivided), TEST or VAL
    manifest: str  # SHA-256 over every file's path, size and modification time
    ignored: list[str]  # files passed over: not images by their extension, or outside class folders


TRAIN, TEST, VAL = 0, 1, 2  # the parts of a folder that comes divided into splits
VAL_NAMES = ("val", "valid", "validation")  # a validation split's folder, as people name it


def split_parts(root: Path, dirs: list[str]) -> list[tuple[str, int]]:
    """The split folders at the top of ``root`` and their parts; ``[("", TRAIN)]`` for
    class folders.

    Raises:
        DataError: split folders without ``train/``, or two validation folders.
    """
    vals = [d for d in dirs if d in VAL_NAMES]
    splits = [d for d in dirs if d in ("train", "test", *VAL_NAMES)]
    if len(vals) > 1:
        raise DataError(f"--data {root}: {' and '.join(f'{d}/' for d in vals)} are both a validation split; keep one")
    if "train" not in dirs:
        if splits:
            others = len(dirs) - len(splits)
            beside = f" beside {others} class folder{'s' if others > 1 else ''}" if others else ""
            raise DataError(f"--data {root}: {', '.join(f'{d}/' for d in splits)}{beside} reads as neither "
                            "splits nor classes; lay it out as DIR/train/CLASS/... with val/ and test/ (each "
                            "optional) beside train/, or as DIR/CLASS/... with no split folders")
        return [("", TRAIN)]
    return [("train", TRAIN)] + ([("test", TEST)] if "test" in dirs else []) + ([(vals[0], VAL)] if vals else [])


def scan_folder(root: str | os.PathLike[str]) -> FolderScan:
    """List a folder of class folders (or ``train/``, ``val/``, ``test/`` of them).

    Raises:
        DataError: no such folder, split folders that cannot be read as splits, fewer than 2
            classes, a class folder without images, a test or validation class that training
            lacks, images but no class folders.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    top = _entries(root)
    parts = split_parts(root, top.dirs)
    named = [name for name, _ in parts if name]
    have = {part for name, part in parts if name}
    layout = "-".join(n for n, part in (("train", TRAIN), ("val", VAL), ("test", TEST)) if part in have) or "classes"
    ignored = [f for f in top.files] if not named else [*top.files, *(d for d in top.dirs if d not in named)]
    per_part: dict[int, dict[str, list[tuple[str, os.stat_result]]]] = {}
    for name, part in parts:
        base = root / name if name else root
        class_dirs = _entries(base).dirs
        if name and not class_dirs:
            raise DataError(f"--data {root}: {name}/ holds no class folders; put each class's images in "
                            f"{name}/CLASS/")
        found: dict[str, list[tuple[str, os.stat_result]]] = {}
        for cls in class_dirs:
            images, others = _walk(base / cls, root)
            found[cls] = images
            ignored += others
        if name:
            ignored += [f"{name}/{f}" for f in _entries(base).files]
        per_part[part] = found
    classes = tuple(sorted(per_part[TRAIN]))
    if not classes:
        hint = (" (its images lie loose at the top)" if any(Path(f).suffix.lower() in IMAGE_SUFFIXES
                                                            for f in top.files) else "")
        raise DataError(f"--data {root}: no class folders{hint}; put each class's images in a subfolder named after "
                        "the class, e.g. DIR/cat/1.png, DIR/dog/2.png")
    if len(classes) < 2:
        raise DataError(f"--data {root}: only one class folder ({classes[0]}); a classifier needs at least 2, "
                        "one subfolder per class")
    for name, part in parts:
        found, where = per_part[part], f"{name}/" if name else ""
        for cls, images in found.items():
            if not images:
                raise DataError(f"--data {root}: class folder {where}{cls} holds no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder")
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(f"--data {root}: {where}{extra[0]} is a class that train/ does not have; "
                            f"train/ has {', '.join(classes)}")
    entries, labels, part_of = [], [], []
    for part, found in sorted(per_part.items()):
        for label, cls in enumerate(classes):
            for entry in found.get(cls, []):
                entries.append(entry)
                labels.append(label)
                part_of.append(part)
    return FolderScan(root, layout, classes, [rel for rel, _ in entries], labels, part_of, _manifest(entries),
                      sorted(ignored))


def scan_pool(folder: str | os.PathLike[str]) -> FolderScan:
    """A folder of unlabelled images in any layout (searched recursively, as ``convnet
    predict DIR`` finds them): one part, one class, and a manifest as :func:`scan_folder`'s.

    Raises:
        DataError: a folder that cannot be read, or no image in it.
    """
    root = Path(folder).resolve()
    entries, _ = _walk(root, root)
    entries.sort(key=lambda entry: entry[0])  # by path, as image_files lists them
    if not entries:
        raise DataError(f"--unlabeled {root}: no image files in it or below it")
    return FolderScan(root, "pool", ("pool",), [rel for rel, _ in entries], [0] * len(entries),
                      [TRAIN] * len(entries), _manifest(entries), [])


def _manifest(entries: list[tuple[str, os.stat_result]]) -> str:
    """SHA-256 over each file's path, size and modification time: changes whenever a file does."""
    digest = hashlib.sha256()
    for rel, st in entries:
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Entries:
    dirs: list[str]
    files: list[str]


def _entries(folder: Path) -> _Entries:
    """The visible subfolders and files of ``folder``, sorted."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                (dirs if e.is_dir() else files).append(e.name)
    except OSError as e:
        raise DataError(f"cannot read the folder {folder}: {e.strerror or e}") from None
    return _Entries(sorted(dirs), sorted(files))


def _walk(folder: Path, root: Path) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """Image files under ``folder`` (recursively, hidden ones left out) with their stat,
    and the other files, as paths relative to ``root``."""
    images, others = [], []

    def unreadable(e: OSError) -> None:
        raise DataError(f"cannot read the folder {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    images.append((rel, path.stat()))
                except OSError:  # a dangling link: decoding names it
                    images.append((rel, os.stat_result((0,) * 10)))
            else:
                others.append(rel)
    return images, others


def image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``folder`` (recursively, hidden ones left out) and the other
    files, as ``convnet train --data`` sees them, each list sorted by path.

    Raises:
        DataError: a folder that cannot be read.
    """
    images, others = _walk(folder, folder)
    return [folder / rel for rel in sorted(rel for rel, _ in images)], [folder / rel for rel in sorted(others)]
