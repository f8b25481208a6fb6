"""Few labels, many pictures: a pool of unlabelled images trained on too (never counted as
labelled), a pool of other things that does no harm, scikit-learn's -1 for unlabelled, the
suggestions of what to label next (never one of the run's labelled images), a pool that
never holds a labelled image, and bad pools refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.data.dataset import InputSpec, Split
from convnet.estimator import ConvNetClassifier
from convnet.training.config import TrainConfig
from convnet.training.loop import train
from convnet.use.suggest import rank

from .conftest import make_dataset_dir

SPEC = InputSpec(1, 12, 12, ("dark", "light"))


def _brightness(n: int, seed: int) -> Split:
    """The class is the image's brightness."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 180 + torch.randint(0, 60, (n, 1, 12, 12), generator=g)).to(torch.uint8)
    return Split(images, labels)


def _write(folder: Path, images: np.ndarray, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img, "L").save(folder / (names[i] if names else f"{i:04d}.png"))
    return folder


def test_the_pool_is_learnt_from_and_recorded_per_epoch() -> None:
    config = TrainConfig(model="seed", epochs=3, batch_size=16, lr=3e-3, ema=0.9)
    result = train(config, _brightness(64, 0), SPEC, pool=_brightness(256, 1).images)
    assert all(r.pool_used is not None and 0 <= r.pool_used <= 1 for r in result.history)
    assert all(r.pool_confidence is not None and 0 < r.pool_confidence <= 1 for r in result.history)
    assert result.history[-1].pool_used > 0  # the teacher grew sure of some pool images
    plain = train(config, _brightness(64, 0), SPEC)
    assert all(r.pool_used is None for r in plain.history)


def test_a_pool_of_noise_does_not_make_the_run_worse() -> None:
    """Wrong data: images of no class. The teacher is rarely sure of them, so they change little."""
    config = TrainConfig(model="seed", epochs=4, batch_size=16, lr=3e-3, ema=0.9)
    test = _brightness(200, 9)
    noise = torch.randint(0, 256, (512, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))

    def accuracy(pool: torch.Tensor | None) -> float:
        model = train(config, _brightness(64, 0), SPEC, pool=pool).model.eval()
        with torch.no_grad():
            return float((model(test.images.float() / 255).argmax(1) == test.labels).float().mean())

    alone, with_noise = accuracy(None), accuracy(noise)
    assert with_noise >= alone - 0.05, (alone, with_noise)


def test_a_named_set_keeps_n_labels_stratified_and_the_rest_is_the_pool(tmp_path: Path, toy_dir: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy_dir), "--model", "seed", "--epochs", "2",
                 "--subset", "100", "--unlabeled", "rest", "--val-split", "0.1", "--out", str(run),
                 "--no-progress"]) == 0  # validation as asked: drawn from the 100 labelled, never from the pool
    out = capsys.readouterr().out
    assert "unlabelled: 156 images (the training images --subset leaves out)" in out, out
    data = json.loads((run / runfolder.CONFIG).read_text())["data"]
    assert (data["train_images"], data["val_images"], data["pool"]["images"]) == (90, 10, 156)  # 256 in all
    history = json.loads((run / runfolder.HISTORY).read_text())
    assert all(h["pool_used"] is not None for h in history)
    assert out.count(f"pool {history[-1]['pool_used']:.0%}") >= 1  # the epoch line says how much of it was used
    assert main(["report", "--device", "cpu", str(run), "--html", str(tmp_path / "r.html"), "--no-progress"]) == 0
    assert "pool used (confidence)" in (tmp_path / "r.html").read_text()
    from convnet.use.loadrun import load_run

    again = load_run(run, device="cpu").dataset(progress=False)  # the same draw, read again; scoring reads no pool
    assert len(again.train) == 90 and again.val is not None and again.pool is None
    counts = torch.bincount(torch.cat([again.train.labels, again.val.labels]), minlength=10)
    assert counts.min() >= 5  # stratified: every class among the 100, not the first 100 images


def test_a_folder_pool_is_recorded_and_resume_refuses_one_that_changed(tmp_path: Path, toy_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    pool = _write(tmp_path / "pool" / "a" / "deeper", rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    run = tmp_path / "run"
    args = ["train", "--device", "cpu", "--data-dir", str(toy_dir), "--model", "seed", "--epochs", "2",
            "--no-progress"]
    assert main([*args, "--unlabeled", str(tmp_path / "pool"), "--out", str(run)]) == 0
    recorded = json.loads((run / runfolder.CONFIG).read_text())["data"]["pool"]
    assert recorded["images"] == 40 and recorded["source"] == str((tmp_path / "pool").resolve())
    config = runfolder.read_json(run / runfolder.CONFIG)
    config["train"]["epochs"] = 3
    from convnet.core.durable import write_json

    write_json(run / runfolder.CONFIG, config)
    _write(pool, rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), ["extra.png"])
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "learnt from 40 unlabelled images" in err and "now holds 41 other ones" in err and err.count("\n") == 1


def test_a_pool_never_holds_a_labelled_image_and_never_a_test_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    photos = make_dataset_dir(tmp_path / "named", n_train=60, n_test=20)
    from convnet.data.named import load_dataset

    named = load_dataset("fashion-mnist", photos)
    pool = _write(tmp_path / "pool", named.train.images[:4, 0].numpy(), [f"train{i}.png" for i in range(4)])
    _write(pool, named.test.images[:3, 0].numpy(), [f"test{i}.png" for i in range(3)])
    _write(pool, np.random.default_rng(2).integers(0, 256, (10, 28, 28), dtype=np.uint8))
    args = ["train", "--device", "cpu", "--data-dir", str(photos), "--model", "seed", "--epochs", "1", "--no-progress"]
    assert main([*args, "--unlabeled", str(pool), "--out", str(tmp_path / "run")]) == 0
    said = capsys.readouterr()
    assert "left out 7 of the 17 unlabelled images: the same pixels as labelled ones (3 of them test images" in said.out
    assert "unlabelled: 10 images" in said.out
    recorded = json.loads((tmp_path / "run" / runfolder.CONFIG).read_text())["data"]["pool"]
    assert recorded["images"] == 17 and recorded["labelled_left_out"] == 7
    only_labelled = _write(tmp_path / "labelled", named.test.images[:3, 0].numpy())
    assert main([*args, "--unlabeled", str(only_labelled), "--out", str(tmp_path / "run2")]) == 1
    err = capsys.readouterr().err
    assert "every image in it is one of the labelled images" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--unlabeled", "{tmp}/nowhere"], "--unlabeled {tmp}/nowhere: no such folder"),
    (["--unlabeled", "rest"], "--unlabeled rest makes the training images --subset leaves out the pool"),
    (["--unlabeled", "{tmp}/empty"], "no image files in it or below it"),
    (["--unlabeled", "{tmp}/photos/inner", "--data", "{tmp}/photos"], "lies inside --data"),
    (["--unlabeled", "{tmp}/photos", "--data", "{tmp}/photos"], "is --data itself, whose images are labelled"),
    (["--unlabeled", "{tmp}/pool/0000.png"], "--unlabeled {tmp}/pool/0000.png: a file, not a folder"),
    (["--unlabeled", "{tmp}/pool", "--faithful"], "--faithful trains on the tutorial's labelled images alone"),
])
def test_bad_pools_are_refused_in_one_line_and_leave_nothing(args: list[str], message: str, tmp_path: Path,
                                                             toy_dir: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "pool", np.zeros((3, 28, 28), np.uint8))
    for cls in ("x", "y"):
        _write(tmp_path / "photos" / cls, np.zeros((3, 28, 28), np.uint8))
    _write(tmp_path / "photos" / "inner", np.zeros((3, 28, 28), np.uint8))
    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    source = [] if "--data" in given else ["--data-dir", str(toy_dir)]
    assert main(["train", "--device", "cpu", *source, *given, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_the_estimator_takes_minus_one_for_unlabelled_images() -> None:
    data, noise = _brightness(120, 0), _brightness(200, 1)
    X = torch.cat([data.images, noise.images])[:, 0].numpy()
    y = np.concatenate([data.labels.numpy(), -np.ones(200, dtype=np.int64)])
    clf = ConvNetClassifier(model="seed", epochs=2, batch_size=16, device="cpu", verbose=0, random_state=0,
                            hflip=False).fit(X, y)
    assert list(clf.classes_) == [0, 1] and -1 not in clf.classes_  # -1 is never a class
    assert all(h["pool_used"] is not None for h in clf.history_)
    assert clf.score(X, y) == pytest.approx(clf.score(X[:120], y[:120]))  # unlabelled rows are not scored
    with pytest.raises(ValueError, match="every label in y is -1"):
        clf.score(X[120:], y[120:])
    with pytest.raises(ValueError, match="y holds one class besides -1"):
        ConvNetClassifier(epochs=1, device="cpu", verbose=0).fit(X, np.where(y == 1, 0, y))


def test_suggestions_spread_over_the_data_and_never_repeat_a_labelled_image(tmp_path: Path, toy_dir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # the ranking: among equally unsure images, copies of one are not all chosen
    probs = np.tile([[0.5, 0.5]], (6, 1))
    features = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]])
    picked = rank(probs, features, 2, method="badge")
    assert sorted(features[picked].argmax(1).tolist()) == [0, 1]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    photos = make_dataset_dir(tmp_path / "named", n_train=120, n_test=40)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(photos), "--model", "seed", "--epochs", "1",
                 "--out", str(run), "--no-progress"]) == 0
    from convnet.data.named import load_dataset

    named = load_dataset("fashion-mnist", photos)
    train_images, test_images = named.train.images[:, 0].numpy(), named.test.images[:, 0].numpy()
    pool = _write(tmp_path / "pool", train_images[:5], [f"seen{i}.png" for i in range(5)])  # pixels it trained on
    _write(pool, test_images[:3], [f"tested{i}.png" for i in range(3)])  # and pixels it is scored on
    rng = np.random.default_rng(1)
    _write(pool, rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), [f"new{i:02d}.png" for i in range(12)])
    capsys.readouterr()
    table, sheet = tmp_path / "suggested.csv", tmp_path / "suggested.html"
    assert main(["suggest", str(run), str(pool), "--n", "8", "--csv", str(table), "--html", str(sheet), "--json",
                 "--device", "cpu"]) == 0
    found = json.loads(capsys.readouterr().out)
    items = [s["item"] for s in found["suggestions"]]
    assert len(items) == 8 and all(i.startswith("new") for i in items) and found["already_labelled"] >= 8
    assert table.read_text().splitlines()[0] == "path,predicted,probability,score"
    assert sheet.read_text().count("<figure>") == 8 and "least sure of, spread over the data" in sheet.read_text()
    assert main(["suggest", str(run), str(pool), "--n", "3", "--device", "cpu", "--no-progress"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()  # the terminal's table says what its order and score mean
    assert head.startswith("3 of 12 unlabelled images") and "spread over the data" in head
    assert "score: how unsure" in head
    assert "8 left out: the run's own labelled images" in head and len(rows) == 3
    shutil.rmtree(pool)
    assert main(["suggest", str(run), "rest", "--device", "cpu"]) == 1
    assert "trained on all of its training images" in capsys.readouterr().err


def test_distribution_alignment_evens_out_a_teacher_that_leans_to_one_class() -> None:
    from convnet.training.semi import Alignment

    align = Alignment(torch.tensor([0, 1, 0, 1]), 2, torch.device("cpu"))  # the labels: half and half
    leaning = torch.tensor([[0.9, 0.1]] * 8)
    for _ in range(500):  # the teacher says class 0 for everything: its running mean leans there
        aligned = align(leaning)
    assert align.running[0] > 0.85
    assert torch.allclose(aligned.sum(1), torch.ones(8))
    assert aligned[0, 0] < 0.9 and aligned[0, 1] > 0.1  # pulled back towards the labels' shares
    assert torch.allclose(Alignment(torch.tensor([0, 1]), 2, torch.device("cpu"))(torch.tensor([[0.5, 0.5]])),
                          torch.tensor([[0.5, 0.5]]))  # a teacher in line with the labels is left as it is


def test_the_thresholds_follow_the_teachers_confidence_and_are_lower_for_classes_it_rarely_picks() -> None:
    from convnet.training.semi import Adaptive

    adaptive = Adaptive(3, torch.device("cpu"))
    unsure = torch.tensor([[0.4, 0.3, 0.3]] * 6)
    first = adaptive(unsure, unsure.max(dim=1).values)
    assert torch.all(first < 0.5)  # an untrained teacher: low thresholds, as its confidence is low
    sure = torch.tensor([[0.97, 0.02, 0.01]] * 5 + [[0.02, 0.97, 0.01]] * 5 + [[0.05, 0.05, 0.9]])
    for _ in range(1000):  # a teacher grown sure, that seldom picks class 2
        later = adaptive(sure, sure.max(dim=1).values)
    assert 0.9 < float(adaptive.running[0]) < 0.97  # the global threshold: its mean confidence
    assert later[0] == later.max() and later[2] < 0.5 * later[0]  # class 2's threshold scaled down


def test_the_strong_augmentation_cuts_out_a_square_of_the_drawn_side(monkeypatch: pytest.MonkeyPatch) -> None:
    from convnet.training import semi

    x = torch.rand(2, 1, 28, 28)
    d = semi.StrongDraws(strong_shifts=torch.full((2, 2), semi.STRONG_PAD), strong_flips=None,
                         cutouts=torch.tensor([[2, 3], [10, 10]]), contrast=torch.ones(2), brightness=torch.zeros(2),
                         cutout_sides=torch.tensor([5, 0]))
    changed = ((semi.strong(x, d) - x).abs() > 1e-5).sum(dim=(1, 2, 3))
    assert changed.tolist() == [25, 0]  # a 5x5 square filled with the image's mean; a side of 0 cuts nothing
    gen = torch.Generator().manual_seed(0)
    fixed = semi.draw_strong(500, (28, 28), False, gen, torch.device("cpu"))
    assert set(fixed.cutout_sides.tolist()) == {14}  # CUTOUT of the side, every time
    monkeypatch.setattr(semi, "CUTOUT_RANDOM", True)
    drawn = semi.draw_strong(500, (28, 28), False, gen, torch.device("cpu"))
    assert drawn.cutout_sides.min() >= 0 and drawn.cutout_sides.max() <= 14 and len(drawn.cutout_sides.unique()) > 10
    centres = drawn.cutouts + drawn.cutout_sides.view(-1, 1) // 2
    assert centres.min() >= 0 and centres.max() < 28  # each square centred inside the image


def _pool_step(pool: torch.Tensor, hflip: bool = False) -> tuple[torch.nn.Module, torch.nn.Module, Callable[[], None]]:
    """A tiny model, its moving average and one training step with ``pool`` (six 2x2 images) to run:
    what the teacher tests hook into."""
    from convnet.training import loop, semi

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    ema = loop.EMA(net, 0.9)
    strong = vars(semi.draw_strong(6, (2, 2), hflip, torch.Generator().manual_seed(0), torch.device("cpu")))
    light = {"pool_flips": torch.zeros(6, dtype=torch.bool)} if hflip else {}

    def step() -> None:
        loop.train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                        loop.make_engine("cpu"), ema, torch.zeros((), dtype=torch.int64), torch.zeros(2), None, 0,
                        None, torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), pool=pool, **light,
                        **{k: v for k, v in strong.items() if v is not None})

    return net, ema.module, step


def test_the_pool_is_labelled_by_the_moving_average_or_by_the_model_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    from convnet.training import semi

    for ema_teacher in (True, False):
        monkeypatch.setattr(semi, "EMA_TEACHER", ema_teacher)
        net, average, step = _pool_step(torch.zeros(6, 1, 2, 2, dtype=torch.uint8))
        calls: list[str] = []
        net.register_forward_hook(lambda *_, calls=calls: calls.append("model"))
        average.register_forward_hook(lambda *_, calls=calls: calls.append("average"))
        step()
        # the first pass labels the pool (the moving average, or the model itself); the second trains the model
        assert calls == (["average", "model"] if ema_teacher else ["model", "model"])


def test_the_teacher_may_label_each_pool_image_with_its_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    from convnet.training import semi

    for mirror, hflip in ((False, True), (True, True), (True, False)):
        monkeypatch.setattr(semi, "TEACHER_MIRROR", mirror)
        _, average, step = _pool_step(torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2) * 10, hflip)
        seen: list[torch.Tensor] = []
        average.register_forward_hook(lambda _m, inputs, _out, seen=seen: seen.append(inputs[0].clone()))
        step()
        if mirror and hflip:  # the pool seen twice by the teacher: as drawn, then mirrored
            assert len(seen) == 2 and torch.equal(seen[1], seen[0].flip(3)) and not torch.equal(seen[1], seen[0])
        else:  # once; never mirrored where mirrors change the class
            assert len(seen) == 1
