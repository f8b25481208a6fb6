"""Validation by default: folders laid out as people lay them out (train/ val/ test/), a
validation split held out otherwise, the best epoch's weights kept and used everywhere,
early stopping, and scoring a run on a new labelled folder."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.core.errors import ConvnetError, DataError
from convnet.data.dataset import InputSpec, Split
from convnet.data.load import load_data
from convnet.data.options import DataOptions
from convnet.training.config import TrainConfig
from convnet.training.events import TrainEvents
from convnet.training.loop import train
from convnet.training.recipes import resolve_config
from convnet.training.state import TrainState
from convnet.use.loadrun import load_run

CLASSES = ("a", "b", "c")


def _images(root: Path, per_class: int, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    """Grey 16x16 images of a bright block whose place depends on the class, on noise."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 50, (16, 16), dtype=np.uint8)
            img[2 + 4 * label:7 + 4 * label, 3:9] = 230
            Image.fromarray(img, "L").save(root / name / f"{seed}-{i:03d}.png")
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("val_name", ["val", "valid", "validation"])
def test_train_and_val_folders_are_splits_and_the_test_split_is_carved_from_train(
        tmp_path: Path, val_name: str, cache: None) -> None:
    root = tmp_path / "photos"
    _images(root / "train", 10, seed=1)
    _images(root / val_name, 4, seed=2)
    ds = load_data(DataOptions(folder=str(root)), progress=False)
    assert ds.classes == CLASSES and ds.origin["layout"] == "train-val"
    assert ds.val is not None and len(ds.val) == 12 and (len(ds.train), len(ds.test)) == (24, 6)
    assert all(f.startswith(f"{val_name}/") for f in ds.files["val"]) and all(
        f.startswith("train/") for f in ds.files["train"] + ds.files["test"])
    assert any("20% of train/ held out for the final score" in note for note in ds.notes)
    kept, line = ds.held_out(0.1, 42)
    assert kept.val is ds.val and "the 12 images of the folder's val/ split" in line  # the folder's own, not carved


def test_train_val_and_test_folders_are_all_used_and_recorded(tmp_path: Path, cache: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "photos"
    _images(root / "train", 10, seed=1)
    _images(root / "val", 3, seed=2)
    _images(root / "test", 5, seed=3)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data", str(root), "--model", "seed", "--epochs", "2",
                 "--out", str(run), "--no-progress"]) == 0
    assert "validation: the 9 images of the folder's val/ split" in capsys.readouterr().out
    split = json.loads((run / runfolder.SPLIT).read_text())
    assert {side: len(files) for side, files in split.items()} == {"train": 30, "val": 9, "test": 15}
    data = json.loads((run / runfolder.CONFIG).read_text())["data"]
    assert (data["train_images"], data["val_images"], data["test_images"]) == (30, 9, 15)
    again = load_run(run, device="cpu").dataset(progress=False)  # read back as recorded
    assert again.val is not None and (len(again.train), len(again.val), len(again.test)) == (30, 9, 15)


def test_train_and_test_folders_train_with_a_validation_split_held_out_of_train(tmp_path: Path, cache: None) -> None:
    root = tmp_path / "photos"
    _images(root / "train", 10, seed=1)
    _images(root / "test", 5, seed=3)
    ds = load_data(DataOptions(folder=str(root)), progress=False)
    assert ds.origin["layout"] == "train-test" and ds.val is None and (len(ds.train), len(ds.test)) == (30, 15)
    held, line = ds.held_out(0.2, 42)
    assert held.val is not None and (len(held.train), len(held.val)) == (24, 6) and "--val-split 0.2" in line
    assert sorted(held.files["train"] + held.files["val"]) == sorted(ds.files["train"])


@pytest.mark.parametrize(("folders", "message"), [
    (["val", "a", "b"], "val/ beside 2 class folders reads as neither splits nor classes; lay it out as "
                        "DIR/train/CLASS/"),
    (["test", "a", "b"], "test/ beside 2 class folders reads as neither"),
    (["val", "test"], "test/, val/ reads as neither splits nor classes"),
    (["train", "val", "valid"], "val/ and valid/ are both a validation split; keep one"),
])
def test_split_folders_that_cannot_be_read_as_splits_are_refused(tmp_path: Path, folders: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "photos"
    for name in folders:  # split folders hold class folders; a class folder holds images
        _images(root / name, 3, classes=("x", "y") if name in ("train", "val", "valid", "test") else ("only",))
    with pytest.raises(DataError, match=re.escape(message)):
        load_data(DataOptions(folder=str(root)), progress=False)
    assert main(["train", "--device", "cpu", "--data", str(root), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def _brightness(n: int, seed: int) -> Split:
    """The class is the image's brightness: learnt in an epoch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 180 + torch.randint(0, 60, (n, 1, 12, 12), generator=g)).to(torch.uint8)
    return Split(images, labels)


class _Ruin(TrainEvents):
    """After epoch ``after``, the weights are overwritten with noise: every later epoch is worse."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch == self.after:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.copy_(torch.randn_like(p) * 3)


SPEC = InputSpec(1, 12, 12, ("dark", "light"))


def test_the_best_epochs_weights_are_kept_and_used_by_every_way_of_predicting(tmp_path: Path) -> None:
    config = TrainConfig(model="seed", epochs=4, batch_size=16, lr=3e-3, val_split=0.25)
    run = tmp_path / "run"
    result = train(config, _brightness(128, 0), SPEC, run_dir=runfolder.new_run_dir(run, "x"),
                   events=[_Ruin(after=2)])
    history = [json.loads((run / runfolder.HISTORY).read_text())[i]["val_accuracy"] for i in range(4)]
    assert result.best is not None and result.best["epoch"] == 2 and max(history) == history[1] > history[3]
    kept = json.loads((run / runfolder.CONFIG).read_text())["kept"]
    assert kept["epoch"] == 2 and kept["val_accuracy"] == pytest.approx(history[1])
    weights = runfolder.load_tensors(run / runfolder.WEIGHTS)
    last = {k.removeprefix("model."): v for k, v in runfolder.load_tensors(run / runfolder.CHECKPOINT).items()
            if k.startswith("model.")}
    assert all(torch.equal(weights[k], v) for k, v in result.model.state_dict().items())  # what was returned
    assert not all(torch.equal(weights[k], last[k]) for k in weights)  # not the last epoch's (the checkpoint's)
    images = _brightness(32, 9).images
    loaded = load_run(run, device="cpu")
    expected = result.model.eval()(images.float() / 255).softmax(1).detach().numpy()
    np.testing.assert_allclose(loaded.probabilities(images), expected, atol=1e-5)


def test_patience_stops_once_validation_stops_improving() -> None:
    config = TrainConfig(model="seed", epochs=10, batch_size=16, lr=3e-3, val_split=0.25, patience=2)
    result = train(config, _brightness(128, 0), SPEC, events=[_Ruin(after=2)])
    assert result.best is not None and result.best["epoch"] == 2 and len(result.history) == 4  # 2 epochs past it


def test_faithful_and_the_tutorial_train_on_every_image() -> None:
    assert TrainConfig(faithful=True).val_split == 0.0 and TrainConfig().val_split == 0.1
    assert resolve_config(None, {"faithful": True}).val_split == 0.0
    from convnet.tools.tutorial import ADAM, SGD

    assert SGD.val_split == ADAM.val_split == 0.0
    with pytest.raises(ConvnetError, match="--faithful trains on every training image"):
        from convnet.training.config import check_config

        check_config(resolve_config(None, {"faithful": True, "val_split": 0.1}))


def test_the_default_share_holds_out_nothing_where_too_few_images_would_be_held(tmp_path: Path) -> None:
    from convnet.data.dataset import MIN_VALIDATION_PER_CLASS, Dataset

    def data(per_class: int) -> Dataset:
        labels = torch.arange(3).repeat_interleave(per_class)
        images = torch.zeros((len(labels), 1, 8, 8), dtype=torch.uint8)
        return Dataset("arrays", InputSpec(1, 8, 8, ("a", "b", "c")), Split(images, labels),
                       Split(images[:0], labels[:0]), "")

    enough = 10 * MIN_VALIDATION_PER_CLASS  # per class: a tenth of it held out is the minimum
    held, line = data(enough).held_out(0.1, 0, adapt=True)
    assert held.val is not None and len(held.val) == 3 * MIN_VALIDATION_PER_CLASS and line.startswith("validation:")
    few = data(enough - 10)  # 27 of 270 would be held out: fewer than 10 a class
    none, line = few.held_out(0.1, 0, adapt=True)
    assert none.val is None and len(none.train) == len(few.train)  # every image trains
    assert line.startswith(f"no validation: {math.ceil(0.1 * len(few.train))} held-out images")
    assert f"fewer than {MIN_VALIDATION_PER_CLASS} a class" in line and "--val-split holds some out" in line
    asked, _ = few.held_out(0.1, 0)  # asked for: held out as asked
    assert asked.val is not None and len(asked.val) == math.ceil(0.1 * len(few.train))
    # --patience, --target-accuracy or --calibrate need validation: at least one image of each class, or none
    tiny = data(6)  # 10 % of 18 is 2: fewer than the 3 classes
    held, _ = tiny.held_out(0.1, 0, adapt=True, watched=True)
    assert held.val is not None and torch.equal(torch.bincount(held.val.labels), torch.tensor([1, 1, 1]))
    single = Dataset("arrays", tiny.spec, Split(tiny.train.images[:7], torch.tensor([0] * 6 + [1])), tiny.test, "")
    none, line = single.held_out(0.1, 0, adapt=True, watched=True)
    assert none.val is None and line.startswith("no validation: 7 training images are too few")


def test_evaluate_scores_a_run_on_a_new_labelled_folder_by_class_name(tmp_path: Path, cache: None,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root = _images(tmp_path / "photos", 12, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data", str(root), "--model", "seed", "--epochs", "3",
                 "--out", str(run), "--no-progress"]) == 0
    own = json.loads((run / runfolder.METRICS).read_text())
    new = _images(tmp_path / "new", 5, seed=7, classes=("c", "a"))  # a subset of the classes, in another order
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(new), "--json", "--device", "cpu"]) == 0
    scores = json.loads(capsys.readouterr().out)
    cm = np.array(scores["test"]["confusion_matrix"])
    assert cm.sum() == 10 and cm[0].sum() == 5 and cm[2].sum() == 5 and cm[1].sum() == 0  # rows in the run's order
    assert json.loads((run / runfolder.METRICS).read_text()) == own  # the run's own scores are left as they are
    assert main(["export", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.onnx"), "--data", str(new), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["confusion_matrix"] == scores["test"]["confusion_matrix"]
    other = _images(tmp_path / "other", 2, classes=("a", "zebra"))
    assert main(["evaluate", str(run), "--data", str(other), "--device", "cpu"]) == 1
    assert "class 'zebra' is not one the model knows" in capsys.readouterr().err
