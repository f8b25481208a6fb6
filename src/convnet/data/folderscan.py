"""What a folder of images holds, before any image is decoded: its classes, its files and
their labels, whether it comes divided into ``train/`` and ``test/``, and a manifest that
changes whenever a file does.

::

    DIR/cat/001.jpg, DIR/cat/002.png, DIR/dog/…        a class per subfolder (names sorted)
    DIR/train/cat/…, DIR/train/dog/…, DIR/test/cat/…   or a training and a test part

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
    layout: str  # "classes" (one folder per class) or "train-test"
    classes: tuple[str, ...]
    files: list[str]  # paths relative to root, train part first, then test; by class, then by name
    labels: list[int]
    parts: list[int]  # 0: train (or undivided), 1: test
    manifest: str  # SHA-256 over every file's path, size and modification time
    ignored: list[str]  # files passed over: not images by their extension, or outside class folders


def scan_folder(root: str | os.PathLike[str]) -> FolderScan:
    """List a folder of class folders (or ``train/`` and ``test/`` of them).

    Raises:
        DataError: no such folder, fewer than 2 classes, a class folder without images,
            a test class that training lacks, images but no class folders.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder")
    top = _entries(root)
    layout = "train-test" if {"train", "test"} <= set(top.dirs) else "classes"
    parts = [("train", 0), ("test", 1)] if layout == "train-test" else [("", 0)]
    ignored = [f for f in top.files] if layout == "classes" else [*top.files, *(d for d in top.dirs
                                                                                 if d not in ("train", "test"))]
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
    classes = tuple(sorted(per_part[0]))
    if not classes:
        hint = (" (its images lie loose at the top)" if any(Path(f).suffix.lower() in IMAGE_SUFFIXES
                                                            for f in top.files) else "")
        raise DataError(f"--data {root}: no class folders{hint}; put each class's images in a subfolder named after "
                        "the class, e.g. DIR/cat/1.png, DIR/dog/2.png")
    if len(classes) < 2:
        raise DataError(f"--data {root}: only one class folder ({classes[0]}); a classifier needs at least 2, "
                        "one subfolder per class")
    for part, found in per_part.items():
        where = "test/" if part == 1 else "train/" if layout == "train-test" else ""
        for cls, images in found.items():
            if not images:
                raise DataError(f"--data {root}: class folder {where}{cls} holds no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder")
        if part == 1:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f"--data {root}: test/{extra[0]} is a class that train/ does not have; "
                                f"train/ has {', '.join(classes)}")
    files, labels, part_of, digest = [], [], [], hashlib.sha256()
    for part, found in sorted(per_part.items()):
        for label, cls in enumerate(classes):
            for rel, st in found.get(cls, []):
                files.append(rel)
                labels.append(label)
                part_of.append(part)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return FolderScan(root, layout, classes, files, labels, part_of, digest.hexdigest(), sorted(ignored))


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
