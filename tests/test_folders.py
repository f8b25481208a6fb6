"""Folders of images: layouts, formats and modes, bad files, the cache, recorded splits,
colour, data larger than the memory budget, and a real data set (scikit-learn's digits)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.core.errors import DataError
from convnet.data.folderscan import scan_folder
from convnet.data.imagefiles import default_size
from convnet.data.load import load_data
from convnet.data.options import DataOptions, parse_image_size


def convnet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convnet", *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own (the library reads XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "convnet" / "folders"


def _blocks(label: int, n: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Grey images of a bright block whose place depends on the label, on noise."""
    rng = np.random.default_rng(seed + label)
    out = []
    for _ in range(n):
        img = rng.integers(0, 50, (size, size), dtype=np.uint8)
        r, c = divmod(label, 2)
        img[2 + r * 7:7 + r * 7, 2 + c * 7:7 + c * 7] = 230
        out.append(img)
    return out


def _folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("a", "b", "c")) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(_blocks(label, per_class)):
            Image.fromarray(img, "L").save(root / name / f"{i:03d}.png")
    return root


# --- layouts


def test_class_folders_are_sorted_and_non_images_passed_over(tmp_path: Path, cache: Path) -> None:
    root = _folder(tmp_path / "d")
    (root / "notes.txt").write_text("what these are")
    (root / "b" / ".DS_Store").write_bytes(b"\0\1")
    (root / "b" / "readme.md").write_text("b images")
    (root / ".hidden").mkdir()
    scan = scan_folder(root)
    assert scan.classes == ("a", "b", "c") and scan.layout == "classes" and len(scan.files) == 36
    assert scan.ignored == ["b/readme.md", "notes.txt"]  # hidden files pass silently
    ds = load_data(DataOptions(folder=str(root)), progress=False)
    assert ds.spec.shape == (1, 16, 16) and ds.classes == ("a", "b", "c")
    assert (len(ds.train), len(ds.test)) == (28, 8)  # 0.2 of 36, rounded up, as scikit-learn does
    assert sorted(torch.bincount(ds.test.labels).tolist()) == [2, 3, 3]  # stratified
    assert any("passed over 2 files" in n and "notes.txt" in n for n in ds.notes)
    assert set(ds.files["test"]).isdisjoint(ds.files["train"])


def test_train_and_test_folders(tmp_path: Path, cache: Path) -> None:
    _folder(tmp_path / "d" / "train", per_class=8)
    _folder(tmp_path / "d" / "test", per_class=3)
    ds = load_data(DataOptions(folder=str(tmp_path / "d")), progress=False)
    assert len(ds.train) == 24 and len(ds.test) == 9
    assert all(f.startswith("test/") for f in ds.files["test"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: (r / "a").mkdir(parents=True) or _folder(r, classes=("b",)), "class folder a holds no images"),
        (lambda r: _folder(r, classes=("only",)), "only one class folder \\(only\\)"),
        (lambda r: r.mkdir() or Image.new("L", (8, 8)).save(r / "x.png"), "no class folders \\(its images lie loose"),
        (lambda r: r.mkdir(), "no class folders"),
        (lambda r: _folder(r / "train", classes=("a", "b")) and _folder(r / "test", classes=("a", "z")),
         "test/z is a class that train/ does not have"),
    ],
    ids=["empty class", "one class", "loose images", "empty folder", "unknown test class"],
)
def test_folder_layout_errors(tmp_path: Path, cache: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "d"
    make(root)
    with pytest.raises(DataError, match=message):
        load_data(DataOptions(folder=str(root)), progress=False)
    assert not cache.exists() or not any(cache.iterdir()), "a refused folder left a cache behind"


def test_size_settings() -> None:
    assert parse_image_size("32") == (32, 32) and parse_image_size("48x64") == (48, 64)
    for bad in ("big", "32x", "1x2x3"):
        with pytest.raises(DataError, match="--image-size"):
            parse_image_size(bad)
    assert default_size([(28, 28), (28, 28), (30, 20)]) == (28, 28)
    assert default_size([(480, 640), (480, 640), (28, 28)]) == (48, 64)  # the longer side capped at 64


# --- formats, modes, sizes and a broken file


def _mixed(root: Path) -> Path:
    """Each format and mode Pillow reads, of several sizes, in two classes; one image broken."""
    rng = np.random.default_rng(1)
    for cls in ("red", "blue"):
        (root / cls).mkdir(parents=True)
    rgb = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "red" / "a.jpg", quality=90)
    Image.fromarray(rgb, "RGB").convert("CMYK").save(root / "red" / "b.jpg")
    Image.fromarray(rgb, "RGB").convert("RGBA").save(root / "red" / "c.png")
    Image.fromarray(rgb, "RGB").convert("P").save(root / "red" / "d.gif")
    Image.fromarray(rgb, "RGB").save(root / "red" / "e.webp")
    Image.fromarray(rgb[:10], "RGB").save(root / "red" / "wide.bmp")  # 20x10: padded, not stretched
    grey16 = (rng.integers(0, 65535, (20, 20))).astype(np.uint16)
    Image.fromarray(grey16).save(root / "blue" / "a.png")  # 16-bit grey (mode I;16)
    Image.fromarray(grey16.astype(np.uint8), "L").save(root / "blue" / "b.tiff")
    Image.fromarray(grey16.astype(np.uint8), "L").convert("1").save(root / "blue" / "c.png")
    Image.fromarray(rgb, "RGB").convert("LA").save(root / "blue" / "d.png")
    Image.fromarray(rgb, "RGB").resize((40, 40)).save(root / "blue" / "big.png")
    good = (root / "blue" / "a.png").read_bytes()
    (root / "blue" / "broken.png").write_bytes(good[: len(good) // 2])  # cut in half
    return root


def test_a_broken_image_stops_everything_by_default(tmp_path: Path, cache: Path) -> None:
    root = _mixed(tmp_path / "d")
    out = tmp_path / "run"
    assert main(["train", "--device", "cpu",
                 "--data", str(root), "--out", str(out), "--epochs", "1", "--no-progress"]) == 1
    assert not out.exists(), "a refused run left its folder behind"
    assert not cache.exists() or not any(cache.iterdir()), "a refused run left a cache folder behind"


def test_a_truncated_palette_image_is_named_not_a_traceback(tmp_path: Path, cache: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Reading a palette's colours (to choose the channels) decodes part of the file."""
    root = _folder(tmp_path / "d")
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").convert("P").save(tmp_path / "p.png")
    whole = (tmp_path / "p.png").read_bytes()
    (root / "a" / "cut.png").write_bytes(whole[: len(whole) // 2])
    assert main(["train", "--device", "cpu", "--data", str(root), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot decode a/cut.png" in err, err
    assert not (tmp_path / "run").exists()


def test_broken_image_message(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _mixed(tmp_path / "d")
    (root / "red" / "bad.jpg").write_text("not a picture")
    assert main(["train", "--device", "cpu", "--data", str(root), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("convnet: error: ")
    assert "cannot decode blue/broken.png" in err and "and 1 other image" in err and "--skip-bad-images" in err


def test_skip_bad_images_trains_and_lists_them(tmp_path: Path, cache: Path) -> None:
    root = _mixed(tmp_path / "d")
    out = tmp_path / "run"
    p = convnet("train", "--device", "cpu",
                "--data", str(root), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                "--skip-bad-images", "--test-split", "0.3", "--no-progress",
                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert "left out 1 image that cannot be decoded" in p.stdout
    assert (out / runfolder.SKIPPED).read_text() == "blue/broken.png\n"
    config = json.loads((out / runfolder.CONFIG).read_text())
    assert config["input"]["channels"] == 3 and (config["input"]["height"], config["input"]["width"]) == (20, 20)
    split = json.loads((out / runfolder.SPLIT).read_text())
    everything = split["train"] + split.get("val", []) + split["test"]  # 8 images: too few to validate on
    assert len(everything) == 11 and "blue/broken.png" not in everything


def test_every_mode_becomes_the_specs_channels(tmp_path: Path, cache: Path) -> None:
    root = _mixed(tmp_path / "d")
    (root / "blue" / "broken.png").unlink()
    for channels in (1, 3):
        ds = load_data(DataOptions(folder=str(root), channels=channels, image_size=(12, 16)), progress=False)
        assert ds.train.images.shape[1:] == (channels, 12, 16) and ds.train.images.dtype == torch.uint8


# --- the cache


def test_cache_is_used_rebuilt_on_change_and_never_trusted_damaged(tmp_path: Path, cache: Path) -> None:
    root = _folder(tmp_path / "d")
    options = DataOptions(folder=str(root))

    def load() -> tuple[torch.Tensor, tuple[str, ...]]:
        ds = load_data(options, progress=False)
        return torch.cat([ds.train.images, ds.test.images]), ds.notes

    first, notes = load()
    assert any("decoded 36 images" in n for n in notes)
    again, notes = load()
    assert not any("decoded" in n for n in notes) and torch.equal(first, again)  # from the cache
    (folder,) = cache.iterdir()
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "a" / "000.png")  # a changed file
    os.utime(root / "a" / "000.png", ns=(1, 1))
    _, notes = load()
    assert any("decoded 36 images" in n for n in notes)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "b" / "new.png")  # an added file
    _, notes = load()
    assert any("decoded 37 images" in n for n in notes)
    (root / "b" / "new.png").unlink()  # a removed file
    _, notes = load()
    assert any("decoded 36 images" in n for n in notes)
    images = folder / "images.npy"
    raw = bytearray(images.read_bytes())
    raw[-5] ^= 0xFF  # one pixel changed on disk
    images.write_bytes(bytes(raw))
    fixed, notes = load()
    assert any("damaged: rebuilt" in n for n in notes) and any("decoded 36" in n for n in notes)
    (folder / "index.json").write_text("{ not json")
    _, notes = load()
    assert any("decoded 36" in n for n in notes)
    index = json.loads((folder / "index.json").read_text())
    index["labels"] = index["labels"][:-1]  # an index that parses but does not add up
    (folder / "index.json").write_text(json.dumps(index))
    _, notes = load()
    assert any("decoded 36" in n for n in notes)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files were left behind"
    assert len(list(cache.iterdir())) == 1, "each setting has one cache folder, rebuilt in place"


# --- colour, and the recorded split


def test_colour_is_kept_where_it_is_the_only_cue(tmp_path: Path, cache: Path) -> None:
    """Two classes of the same grey level (ITU-R 601 luma) and different hue: a grey model
    cannot tell them apart, a colour one can."""
    rng = np.random.default_rng(0)
    colours = {"orange": (200, 100, 40), "azure": (25, 152, 227)}  # both luma 123 in Pillow's integer formula
    for name, rgb in colours.items():
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(60):
            noise = rng.integers(-20, 21, (12, 12, 1))
            img = (np.array(rgb) + noise).astype(np.uint8)  # the same noise on every channel: the lumas stay equal
            Image.fromarray(img, "RGB").save(tmp_path / "d" / name / f"{i}.png")
    scores = {}
    for channels in ("auto", "1"):
        out = tmp_path / f"run-{channels}"
        args = ["train", "--device", "cpu",
                "--data", str(tmp_path / "d"), "--out", str(out), "--recipe", "tutorial", "--model",
                "fastnet", "--optimizer", "adam", "--lr", "0.003", "--epochs", "15", "--batch-size", "16",
                "--no-progress"]
        assert main(args + ([] if channels == "auto" else ["--channels", channels])) == 0
        config = json.loads((out / runfolder.CONFIG).read_text())
        accuracy = json.loads((out / runfolder.METRICS).read_text())["test"]["accuracy"]
        scores[channels] = (config["input"]["channels"], accuracy)
    assert scores["auto"][0] == 3 and scores["auto"][1] >= 0.95, scores
    assert scores["1"][0] == 1 and scores["1"][1] <= 0.75, scores


@pytest.mark.parametrize(("flags", "said"), [([], True), (["--hflip"], False), (["--no-hflip"], False),
                                            (["--recipe", "tutorial"], False)])
def test_a_folder_trained_on_mirrored_images_says_so_unless_told(flags: list[str], said: bool, tmp_path: Path,
                                                                 cache: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A folder's images may or may not keep their class when mirrored (photos do, digits do not): where the user
    did not say, the run says which way it read them."""
    root = _folder(tmp_path / "d", per_class=10)
    assert main(["train", "--device", "cpu", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "8", "--no-progress", *flags]) == 0
    assert ("mirrored images are trained on and predicted with" in capsys.readouterr().out) == said


def test_evaluate_gives_the_same_numbers_from_the_recorded_split(tmp_path: Path, cache: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d", per_class=20)
    out = tmp_path / "run"
    assert main(["train", "--device", "cpu",
                 "--data", str(root), "--out", str(out), "--recipe", "tutorial", "--model", "fastnet",
                 "--epochs", "3", "--batch-size", "8"]) == 0
    trained = json.loads((out / runfolder.METRICS).read_text())
    assert f"training fastnet on 48 images of {root} (" in capsys.readouterr().out  # the folder named, as read
    assert main(["train", "--device", "cpu", "--resume", str(out)]) == 1  # complete: the new run it suggests
    # trains on the folder
    assert capsys.readouterr().err.rstrip().endswith(f"convnet train --data {root} --init-from {out}")
    assert main(["evaluate", "--device", "cpu", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == trained
    assert len(list(cache.iterdir())) == 1, "evaluate decoded the folder again instead of reading the run's cache"
    Image.fromarray(_blocks(0, 1, seed=9)[0]).save(root / "b" / "late.png")  # the folder grows afterwards
    assert main(["evaluate", "--device", "cpu", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == trained
    (root / json.loads((out / runfolder.SPLIT).read_text())["test"][0]).unlink()
    assert main(["evaluate", "--device", "cpu", str(out)]) == 1
    assert "of the run's test split is gone" in capsys.readouterr().err


# --- larger than the memory budget

PER_CLASS = 1_000  # images of each of the two classes, 64x64 colour: a 23 MiB cache, eleven times the budget


def test_streaming_keeps_memory_bounded(tmp_path: Path) -> None:
    """A 23 MiB cache (2,000 colour images of 64x64) with a memory budget of 2 MB: a whole
    epoch over all of it, and the final scoring of both splits, read it a batch at a time.
    The peak of the memory Python and numpy allocate after the imports (tracemalloc: the images
    read, the folder's index) stays under half the cache's size, where the same run holding
    the images in memory peaks above it.
    Peak RSS is printed too, not asserted: glibc's arenas move it by up to 200 MB from one
    run to the next. (The model is a tiny one registered for the test, so that the epoch is
    short: the data, not the arithmetic, is what is measured.)"""
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / str(label)).mkdir(parents=True)
        for i in range(PER_CLASS):
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img[..., label] = 255  # the class in one channel
            Image.fromarray(img, "RGB").save(root / str(label) / f"{i}.png", compress_level=0)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    build = subprocess.run([sys.executable, "-c", "from convnet.data.load import load_data; "
                            "from convnet.data.options import DataOptions; "
                            f"load_data(DataOptions(folder={str(root)!r}, memory_budget_mb=0), progress=False)"],
                           capture_output=True, text=True, timeout=600, env=env)  # the cache, decoded once
    assert build.returncode == 0, build.stderr
    peak, held = {}, {}
    for budget in ("2", "100000"):
        # the library call, not the command line: the command line tells glibc to keep freed memory
        # (cli.keep_freed_memory), which makes peak RSS a measure of the allocator's history; and the
        # peak of this process's own memory (VmHWM), not ru_maxrss, which Linux carries over from the
        # forking process (here pytest's) through exec
        script = (
            "import tracemalloc\n"
            "import sklearn.model_selection, torch\n"
            "from torch import nn\n"
            "from convnet.training.config import TrainRequest\n"
            "from convnet.tools.experiment import run_training\n"
            "from convnet.data.options import DataOptions\n"
            "from convnet.models.networks import register_model\n"
            "torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # the optimizer's first use imports torch._dynamo\n"
            "tracemalloc.start()  # after the imports: tracing them takes ten times as long, and they hold no images\n"
            "register_model('tiny', 'a test model')(lambda k, c, size: nn.Sequential(\n"
            "    nn.Conv2d(c, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k)))\n"
            "run_training(TrainRequest(settings={'model': 'tiny', 'epochs': 1, 'batch_size': 32, 'tta': False,\n"
            "                                     'augment': 'none', 'ema': 0.0},\n"
            f"    data=DataOptions(folder={str(root)!r}, memory_budget_mb={budget}), device='cpu',\n"
            f"    out={str(tmp_path / budget)!r}, progress=False))\n"
            "print('HELD', tracemalloc.get_traced_memory()[1])\n"
            "print('PEAK', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n")
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, p.stderr
        peak[budget] = int(p.stdout.split("PEAK")[-1]) / 1024  # MiB
        held[budget] = int(p.stdout.split("HELD")[-1].split()[0]) / 2**20  # MiB
        assert ("a batch at a time" in p.stdout) == (budget == "2"), p.stdout
        assert "decoded" not in p.stdout, p.stdout  # both read the cache built above
        metrics = json.loads((tmp_path / budget / runfolder.METRICS).read_text())
        assert metrics["train"]["accuracy"] > 0.9, metrics["train"]  # every image was read: the class is learnt
        data = json.loads((tmp_path / budget / runfolder.CONFIG).read_text())["data"]
        assert (data["train_images"], data["val_images"], data["test_images"]) == (  # no subset; 0.1 validation
            1.44 * PER_CLASS, 0.16 * PER_CLASS, 0.4 * PER_CLASS), data
    cache_mib = 2 * PER_CLASS * 3 * 64 * 64 / 2**20  # 23 MiB
    # what streaming saves is the images themselves: in memory the peak holds them all; streamed, it holds a
    # batch and the blocks the cache's checksum is read in (4 MiB each), well under half of them
    assert held["100000"] > cache_mib and held["2"] < 0.5 * cache_mib, held
    print(f"peak allocated by Python and numpy: {held['2']:.0f} MiB streaming, {held['100000']:.0f} MiB in memory; "
          f"peak RSS: {peak['2']:.0f} MiB streaming, {peak['100000']:.0f} MiB in memory ({cache_mib:.0f} MiB cache)")


# --- a real data set: scikit-learn's handwritten digits


def test_real_digits_reach_95_percent(tmp_path: Path) -> None:
    """1,797 real 8x8 digits as PNG class folders: `convnet train --data` reaches at least
    0.95 on the test split it carves, and predicts a PNG with the folder's class names."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    root = tmp_path / "digits"
    for i, (img, y) in enumerate(zip(digits.images, digits.target, strict=True)):
        (root / names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(img * 255 / 16).astype(np.uint8), "L").save(root / names[y] / f"{i:04d}.png")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    p = convnet("train", "--device", "cpu", "--data", str(root), "--no-hflip", "--out", str(out), "--no-progress",
                env=env)
    assert p.returncode == 0, p.stderr
    metrics = json.loads((out / runfolder.METRICS).read_text())
    assert metrics["test"]["accuracy"] >= 0.95, metrics["test"]["accuracy"]
    assert sum(metrics["test"]["report"][n]["support"] for n in names) == 360  # the carved 20 %
    sample = root / "seven" / sorted(os.listdir(root / "seven"))[0]
    p = convnet("predict", "--device", "cpu", str(out), str(sample), "--json", env=env)
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(p.stdout)
    assert row["class"] == sorted(names)[row["label"]]  # classes are the folder names, sorted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{root}", "--data-dir", "{root}"], "--data .* and --data-dir .* cannot be combined"),
        (["--image-size", "32"], "--image-size applies to folders of images"),
        (["--data", "{root}", "--image-size", "big"], "--image-size 'big': give N"),
        (["--data", "{root}", "--image-size", "4"], "--image-size must be between 8 and 1024"),
        (["--data", "{root}", "--test-split", "1.5"], "--test-split must be a fraction"),
        (["--data", "{root}/missing"], "--data .*missing: no such folder"),
        (["--data", "{root}", "--memory-budget", "-1"], "--memory-budget must be >= 0"),
        (["--data", "{root}", "--dataset", "mnist"], "--data .* and --dataset mnist cannot be combined"),
        (["--data", "{root}", "--no-hflip", "--augment", "flip"], "change class when mirrored"),
        (["--dataset", "mnist", "--tta"], "change class when mirrored"),
    ],
)
def test_folder_flags_are_checked_before_anything_is_read(tmp_path: Path, cache: Path, args: list[str], message: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "d")
    out = tmp_path / "run"
    argv = ["train", "--device", "cpu", "--out", str(out), "--no-progress", *(a.format(root=root) for a in args)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists() and not cache.exists(), "a refused command left something behind"


def test_no_hflip_leaves_the_recipes_flips_out(tmp_path: Path, cache: Path) -> None:
    root = _folder(tmp_path / "d")
    out = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data", str(root), "--no-hflip", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    config = json.loads((out / runfolder.CONFIG).read_text())
    assert config["train"]["augment"] == "translate" and config["train"]["tta"] is False  # the cpu recipe's, less flips
    assert config["input"]["hflip"] is False


def test_an_unreadable_folder_is_named(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path / "d")

    def refused(path: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", refused)  # as for a folder of another user's, without root
    with pytest.raises(DataError, match="cannot read the folder .*: Permission denied"):
        scan_folder(root)
