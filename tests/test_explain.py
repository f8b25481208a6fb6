"""Heat maps: a sanity check on data where the evidence is known (Adebayo et al., 2018),
and `convnet predict RUN --explain DIR`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from convnet.data.dataset import InputSpec, Split
from convnet.models.networks import create_model
from convnet.training.config import TrainConfig
from convnet.training.loop import train
from convnet.use.explain import heat_maps, overlay

SPEC = InputSpec(channels=1, height=28, width=28, classes=("top left", "top right", "bottom left", "bottom right"),
                 hflip=False)


def corner_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """28x28 noise whose class is decided only by a bright 6x6 patch placed in one of the
    four 14x14 corners (the class)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 120, (n, 1, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        top, left = 14 * (c // 2) + rng.integers(0, 9), 14 * (c % 2) + rng.integers(0, 9)
        images[i, 0, top:top + 6, left:left + 6] = 255
    return torch.from_numpy(images), torch.from_numpy(labels)


def corner_share(maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each map's share of its mass in the corner that holds the patch."""
    shares = []
    for heat, c in zip(maps, labels, strict=True):
        top, left = 14 * (c // 2), 14 * (c % 2)
        shares.append(heat[top:top + 14, left:left + 14].sum() / max(heat.sum(), 1e-12))
    return np.array(shares)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    images, labels = corner_images(1200, 0)
    config = TrainConfig(model="fastnet", optimizer="adam", lr=2e-3, epochs=4, batch_size=64, seed=0)
    return train(config, Split(images, labels), SPEC).model.eval()


def test_the_maps_find_the_evidence_and_depend_on_the_weights(trained: torch.nn.Module) -> None:
    images, labels = corner_images(200, 1)
    with torch.no_grad():
        accuracy = (trained(images.float() / 255).argmax(1) == labels).float().mean()
    assert accuracy > 0.95  # the model learnt where to look
    maps = heat_maps(trained, images)
    assert maps.shape == (200, 28, 28) and maps.min() >= 0 and maps.max() <= 1
    share = corner_share(maps, labels.numpy())
    assert share.mean() >= 0.7, share.mean()  # most of the evidence lies in the patch's corner

    torch.manual_seed(5)
    fresh = create_model("fastnet", 4, 1, 28).eval()  # the same network, its weights re-initialised
    random_maps = heat_maps(fresh, images, targets=labels)
    rho = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(maps, random_maps, strict=True)]
    assert np.nanmean(rho) < 0.5, np.nanmean(rho)  # the maps are not the image's edges: they follow the weights


def test_an_overlay_is_the_image_where_there_is_no_evidence() -> None:
    image = np.full((1, 28, 28), 100, np.uint8)
    heat = np.zeros((28, 28))
    heat[:3, :3] = 1.0
    picture = overlay(image, heat)
    assert picture.shape == (28, 28, 3) and picture.dtype == np.uint8
    assert (picture[10:, :] == 100).all() and (picture[:, 10:] == 100).all()  # smoothed, but only nearby
    assert np.abs(picture[1, 1].astype(int) - 100).max() > 50  # the evidence, in colour


def test_predict_explain_writes_a_picture_per_image_and_refuses_an_onnx_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.cli.parser import main

    from .conftest import make_dataset_dir

    toy = make_dataset_dir(tmp_path / "toy", n_train=64, n_test=32)
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data-dir", str(toy), "--model", "seed", "--epochs", "1", "--out",
                 str(run), "--no-progress"]) == 0
    pngs = tmp_path / "in"
    pngs.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)).save(pngs / f"{i}.png")
    (pngs / "bad.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["predict", "--device", "cpu", str(run), str(pngs), "--explain", str(tmp_path / "maps")]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"3 heat maps (integrated gradients, the predicted class) in {tmp_path / 'maps'}"
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["00000-0.png", "00001-1.png", "00002-2.png"]
    assert Image.open(tmp_path / "maps" / "00000-0.png").size == (28, 28)

    assert main(["export", str(run)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run / "model.onnx"), str(pngs / "0.png"), "--explain", str(tmp_path / "m2")]) == 1
    err = capsys.readouterr().err
    assert "keeps no gradients" in err and err.count("\n") == 1 and not (tmp_path / "m2").exists()
