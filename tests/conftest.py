"""Shared fixtures: fixed seeds, small synthetic IDX data sets, the real data when present."""

from __future__ import annotations

import gzip
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from convnet.data.catalog import FASHION_MNIST, has_all

SYSTEM_FASHION = Path(FASHION_MNIST.system_dirs[0])

# The suite runs in one process per core (pytest-xdist, `-n auto` in pyproject.toml): each with one thread, and
# so each `convnet` it starts, so that the processes share the cores instead of each spinning on all of them
# (on 2 cores: 5m27s against 8m20s for one process with two threads, and 8m35s with two processes of two).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Tests give convnet a cache of their own through XDG_CACHE_HOME; matplotlib keeps its font cache there too, and
# rebuilding it takes from seconds to a minute per process. Its own folder, found once, is kept for every process.
if "MPLCONFIGDIR" not in os.environ:
    import matplotlib

    os.environ["MPLCONFIGDIR"] = matplotlib.get_cachedir()


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file holding ``array`` (uint8)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_dataset_dir(folder: Path, n_train: int = 256, n_test: int = 128, gz: bool = True) -> Path:
    """Four IDX files of a learnable toy problem: the class is drawn as a bright block
    whose position depends on the label, on noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 5)
            images[i, 4 + r * 12:12 + r * 12, 1 + c * 5:6 + c * 5] = 230
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
    return folder


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    return make_dataset_dir(tmp_path / "toy")


@pytest.fixture
def real_fashion() -> Path:
    """The real Fashion-MNIST (Debian's dataset-fashion-mnist); skipped where absent."""
    if not has_all(SYSTEM_FASHION, FASHION_MNIST):
        pytest.skip(f"Fashion-MNIST not installed in {SYSTEM_FASHION} (apt-get install dataset-fashion-mnist)")
    return SYSTEM_FASHION
