"""Named data sets: where they are found, how they are read, downloaded and verified
(against a local HTTP server on 127.0.0.1 serving fixture files)."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import convnet.data.catalog as catalog
from convnet.core.errors import DataError
from convnet.data.catalog import FASHION_MNIST, DataFile, NamedDataset, download_dataset
from convnet.data.dataset import to_float
from convnet.data.named import load_dataset

from .conftest import make_dataset_dir, write_idx


def test_load_dataset_from_dir(toy_dir: Path) -> None:
    ds = load_dataset("fashion-mnist", toy_dir)
    assert ds.train.images.shape == (256, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.dtype == torch.int64 and ds.test.images.shape == (128, 1, 28, 28)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    x = to_float(ds.train.images[:4])  # the tutorial's X / 255
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert load_dataset("fashion-mnist", toy_dir, subset=10).train.images.shape[0] == 10


def test_load_dataset_uncompressed_files(tmp_path: Path) -> None:
    folder = make_dataset_dir(tmp_path / "plain", gz=False)
    assert len(load_dataset("fashion-mnist", folder).train) == 256


def test_label_count_mismatch(tmp_path: Path) -> None:
    folder = make_dataset_dir(tmp_path / "d")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(255, np.uint8))
    with pytest.raises(DataError, match="256 train images but 255 labels"):
        load_dataset("fashion-mnist", folder)


def test_missing_dir_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("fashion-mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="expected the IDX files"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(DataError, match="unknown data set 'cifar'.*fashion-mnist"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="--subset"):
        load_dataset("fashion-mnist", tmp_path, subset=0)


# --- download, against a local HTTP server


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    with _running(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        yield url, root


@contextlib.contextmanager
def _running(httpd: http.server.ThreadingHTTPServer) -> Iterator[str]:
    """Serve on 127.0.0.1 in a thread; yield the server's address; stop it afterwards."""
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _spec_for(folder: Path, mirrors: tuple[str, ...]) -> NamedDataset:
    """FASHION_MNIST's shape, with the digests of the fixture files in ``folder``."""
    files = {}
    for key, f in FASHION_MNIST.files.items():
        data = (folder / f.name).read_bytes()
        files[key] = DataFile(f.name, hashlib.md5(data).hexdigest(), hashlib.sha256(gzip.decompress(data)).hexdigest())
    return dataclasses.replace(FASHION_MNIST, files=files, mirrors=mirrors, system_dirs=())


def test_download_verifies_and_is_atomic(server: tuple[str, Path], tmp_path: Path) -> None:
    url, root = server
    make_dataset_dir(root / "good")
    spec = _spec_for(root / "good", (url + "missing/", url + "good/"))  # first mirror 404s, second serves
    cache = tmp_path / "cache"
    download_dataset(spec, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f.name for f in spec.files.values())
    for f in spec.files.values():
        assert (cache / f.name).read_bytes() == (root / "good" / f.name).read_bytes()


def test_download_corrupt_file_is_refused_and_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    url, root = server
    make_dataset_dir(root / "good")
    spec = _spec_for(root / "good", (url + "bad/",))
    bad = make_dataset_dir(root / "bad")
    name = spec.files["train_images"].name
    flipped = bytearray(gzip.decompress((bad / name).read_bytes()))
    flipped[-1] ^= 0xFF  # one pixel changed: still valid IDX and gzip, wrong content
    (bad / name).write_bytes(gzip.compress(bytes(flipped)))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="checksum mismatch"):
        download_dataset(spec, cache)
    assert not (cache / name).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "temporary files were left behind"


def test_download_recompressed_copy_passes(server: tuple[str, Path], tmp_path: Path) -> None:
    """A copy compressed differently (as Debian's is) holds the same content: accepted."""
    url, root = server
    make_dataset_dir(root / "good")
    spec = _spec_for(root / "good", (url + "re/",))
    (root / "re").mkdir()
    for f in spec.files.values():
        raw = gzip.decompress((root / "good" / f.name).read_bytes())
        (root / "re" / f.name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=12345))
    download_dataset(spec, tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_load_dataset_downloads_into_cache(server: tuple[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url, root = server
    make_dataset_dir(root / "good")
    spec = _spec_for(root / "good", (url + "good/",))
    monkeypatch.setitem(catalog.DATASETS, "fashion-mnist", spec)
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache")
    assert ds.source == str(tmp_path / "cache" / "fashion-mnist") and len(ds.train) == 256
    with pytest.raises(DataError, match="not found"):
        load_dataset("fashion-mnist", cache_dir=tmp_path / "empty", download=False)


def test_download_unreachable_mirror_says_what_to_do(tmp_path: Path) -> None:
    spec = dataclasses.replace(FASHION_MNIST, mirrors=("http://127.0.0.1:9/",), system_dirs=())
    with pytest.raises(DataError, match="--data-dir"):
        download_dataset(spec, tmp_path / "cache", timeout_s=2)


def test_real_fashion_mnist(real_fashion: Path) -> None:
    ds = load_dataset("fashion-mnist", real_fashion)
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the tutorial's Y_train[:5]
    assert ds.test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


@pytest.mark.parametrize(
    ("file", "array", "message"),
    [
        ("t10k-images-idx3-ubyte.gz", np.zeros((128, 32, 32), np.uint8), "same size"),
        ("train-labels-idx1-ubyte.gz", np.zeros((256, 2), np.uint8), "3 dimensions"),
        ("train-images-idx3-ubyte.gz", np.zeros((256, 28, 0), np.uint8), "nothing to learn from"),
        ("train-labels-idx1-ubyte.gz", np.full(256, 10, np.uint8), "label 10 is outside 0..9"),
    ],
)
def test_inconsistent_data_sets(tmp_path: Path, file: str, array: np.ndarray, message: str) -> None:
    folder = make_dataset_dir(tmp_path / "d")
    write_idx(folder / file, array)
    with pytest.raises(DataError, match=message):
        load_dataset("fashion-mnist", folder)


def test_empty_training_split_is_refused(tmp_path: Path) -> None:
    folder = make_dataset_dir(tmp_path / "d")
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="train images have shape .0, 28, 28.; there is nothing to learn from"):
        load_dataset("fashion-mnist", folder)


def test_float_labels_are_refused(tmp_path: Path) -> None:
    folder = make_dataset_dir(tmp_path / "d")
    raw = bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 256) + np.zeros(256, ">f4").tobytes()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset("fashion-mnist", folder)


def test_source_is_recorded_as_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset_dir(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("fashion-mnist", "d")
    assert Path(ds.source).is_absolute() and Path(ds.source) == tmp_path / "d"


# --- CIFAR-10's binary version, through the download path


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the files in ``self.server.files`` (name -> bytes), honouring ``Range:
    bytes=N-``; ``self.server.cut`` cuts the first response of each file after that many
    bytes (a broken connection). Every request's Range header is logged."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.ranges.append(self.headers.get("Range"))  # type: ignore[attr-defined]
        data = server.files.get(name)  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        start = 0
        if (r := self.headers.get("Range")) and r.startswith("bytes="):
            start = int(r[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = server.cut.pop(name, None)  # type: ignore[attr-defined]
        self.wfile.write(data[start:cut] if cut is not None else data[start:])


def _cifar_archive(per_batch: int = 20) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A CIFAR-10 binary archive in the real layout (cifar-10-batches-bin/*.bin, records of
    a label byte and 3,072 pixel bytes), with ``per_batch`` images per batch file."""
    import io
    import tarfile

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6 * per_batch, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch).astype(np.uint8)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]
        for k, name in enumerate(names):
            if name.endswith(".txt"):
                raw = b"\n".join(c.encode() for c in catalog.CIFAR10.classes)
            else:
                part = slice(k * per_batch, (k + 1) * per_batch)
                raw = b"".join(bytes([y]) + x.tobytes() for y, x in zip(labels[part], images[part], strict=True))
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue(), images, labels


@pytest.fixture
def range_server() -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    httpd.files, httpd.cut, httpd.ranges = {}, {}, []  # type: ignore[attr-defined]
    with _running(httpd) as url:
        yield url, httpd


def test_cifar10_downloads_resumes_verifies_and_reads(range_server: tuple[str, http.server.ThreadingHTTPServer],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, httpd = range_server
    archive, images, labels = _cifar_archive()
    name = catalog.CIFAR10.files["archive"].name
    httpd.files[name] = archive  # type: ignore[attr-defined]
    httpd.cut[name] = len(archive) // 3  # type: ignore[attr-defined]  # the first attempt breaks off
    spec = dataclasses.replace(catalog.CIFAR10, mirrors=(url,),
                               files={"archive": DataFile(name, hashlib.md5(archive).hexdigest())})
    monkeypatch.setitem(catalog.DATASETS, "cifar10", spec)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="could not download cifar10"):
        load_dataset("cifar10", cache_dir=cache)
    part = cache / "cifar10" / f".{name}.part"
    assert part.is_file() and 0 < part.stat().st_size < len(archive)  # kept, to be continued
    assert not (cache / "cifar10" / name).exists()
    ds = load_dataset("cifar10", cache_dir=cache)  # continues where it broke off
    assert httpd.ranges[-1] == f"bytes={len(archive) // 3}-"  # type: ignore[attr-defined]
    assert (cache / "cifar10" / name).read_bytes() == archive and not part.exists()
    assert ds.spec.shape == (3, 32, 32) and ds.spec.hflip and not ds.spec.dark_background
    assert ds.classes[0] == "airplane" and len(ds.train) == 100 and len(ds.test) == 20
    assert torch.equal(ds.train.images, torch.from_numpy(images[:100]))  # channels first, as stored
    assert torch.equal(ds.test.labels, torch.from_numpy(labels[100:].astype(np.int64)))


def test_cifar10_wrong_archive_is_refused_and_removed(range_server: tuple[str, http.server.ThreadingHTTPServer],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, httpd = range_server
    archive, _, _ = _cifar_archive()
    name = catalog.CIFAR10.files["archive"].name
    httpd.files[name] = archive[:-10] + b"0123456789"  # type: ignore[attr-defined]
    spec = dataclasses.replace(catalog.CIFAR10, mirrors=(url,),
                               files={"archive": DataFile(name, hashlib.md5(archive).hexdigest())})
    monkeypatch.setitem(catalog.DATASETS, "cifar10", spec)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "cifar10").iterdir()), "a wrong download was kept"


def test_cifar10_from_extracted_batches(tmp_path: Path) -> None:
    import io
    import tarfile

    archive, images, _ = _cifar_archive(per_batch=4)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    ds = load_dataset("cifar10", tmp_path)  # the folder above cifar-10-batches-bin
    assert torch.equal(ds.train.images, torch.from_numpy(images[:20]))
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="test_batch.bin: 100 bytes is not a whole number"):
        load_dataset("cifar10", tmp_path)


def test_datasets_command_lists_every_named_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.cli.parser import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "cifar10        32x32, 3 channels, 10 classes, 50,000 + 10,000 images" in out
    assert "mnist          28x28, 1 channel, 10 classes" in out and "flips not allowed" in out
    assert "not here: downloaded from https://www.cs.toronto.edu/~kriz/ on first use (170 MB)" in out
    rows = {d["name"]: d for d in catalog.describe_datasets(tmp_path)}
    assert set(rows) == {"fashion-mnist", "mnist", "cifar10"}
    make_dataset_dir(tmp_path / "mnist")  # a copy in the cache is found
    assert {d["name"]: d["found"] for d in catalog.describe_datasets(tmp_path)}["mnist"]
