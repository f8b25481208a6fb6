"""Starting from trained weights: a run folder or a .safetensors file is read and fitted to
the new data (head replaced for other classes, first convolution adapted to other
channels, a size-bound layer refused), the run records where it started, the head trains
alone while the body is frozen, then the body at its own rate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnet.cli.parser import main
from convnet.core import runfolder
from convnet.core.errors import ConvnetError, RunError
from convnet.data.dataset import InputSpec, Split
from convnet.data.named import load_dataset
from convnet.models.networks import create_model, head_name
from convnet.models.pretrained import adapt, adapt_input_conv, fit_weights, model_of, open_source, spec_for
from convnet.training.config import TrainConfig
from convnet.training.events import TrainEvents
from convnet.training.loop import train
from convnet.training.state import TrainState

from .conftest import make_dataset_dir


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fastnet run on the 10-class toy set (grey 28x28), written by the command line."""
    base = tmp_path_factory.mktemp("pretrained")
    data = make_dataset_dir(base / "toy", n_train=128, n_test=64)
    assert main(["train", "--device", "cpu", "--data-dir", str(data), "--model", "fastnet", "--epochs", "1",
                 "--out", str(base / "run"), "--no-progress"]) == 0
    return base / "run"


def test_a_run_is_read_with_its_model_classes_and_digest(source_run: Path, tmp_path: Path) -> None:
    source = open_source(source_run)
    weights = (source_run / runfolder.WEIGHTS).read_bytes()
    assert source.model == "fastnet" and source.classes is not None and len(source.classes) == 10
    assert source.sha256 == hashlib.sha256(weights).hexdigest() and source.path == source_run / runfolder.WEIGHTS
    bare = tmp_path / "bare.safetensors"
    runfolder.save_tensors(bare, source.tensors)  # no metadata: the model must be named
    assert open_source(bare).model is None and open_source(bare).classes is None
    assert model_of(open_source(bare), "fastnet") == "fastnet"
    with pytest.raises(ConvnetError, match="does not say which model .* give it with --model"):
        model_of(open_source(bare), None)
    with pytest.raises(ConvnetError, match="holds a fastnet model; leave out --model seed"):
        model_of(source, "seed")
    with pytest.raises(RunError, match="no such run folder or .safetensors file"):
        open_source(tmp_path / "absent")


def test_other_classes_get_a_fresh_head_and_colour_an_adapted_first_convolution(source_run: Path) -> None:
    source = open_source(source_run)
    spec = InputSpec(3, 20, 24, ("cat", "dog"))  # colour, another size, two classes
    state, record = fit_weights(source, "fastnet", spec)
    model = create_model("fastnet", 2, 3, (20, 24))
    model.load_state_dict(state)  # fits exactly
    head = head_name(model)
    assert state[f"{head}.weight"].shape == (2, 128)
    for key, w in source.tensors.items():  # every other weight kept as it was
        if not key.startswith(head + ".") and key != "features.0.0.weight":
            assert torch.equal(state[key], w), key
    assert torch.allclose(state["features.0.0.weight"], source.tensors["features.0.0.weight"].repeat(1, 3, 1, 1) / 3)
    assert record["sha256"] == source.sha256 and record["model"] == "fastnet" and len(record["changes"]) == 2
    same, record = fit_weights(source, "fastnet", load_run_spec(source_run))  # the same classes: the head is kept
    assert record["changes"] == [] and all(torch.equal(same[k], v) for k, v in source.tensors.items())


def load_run_spec(run: Path) -> InputSpec:
    return runfolder.open_run(run).spec


def test_an_adapted_first_convolution_sees_a_grey_image_in_colour_as_before() -> None:
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.rand(2, 1, 8, 8)
    colour = torch.nn.Conv2d(3, 4, 3)
    colour.weight.data, colour.bias.data = adapt_input_conv(conv.weight.data, 3), conv.bias.data
    assert torch.allclose(colour(x.repeat(1, 3, 1, 1)), conv(x), atol=1e-6)
    back = adapt_input_conv(colour.weight.data, 1)  # colour to grey: the sum over the channels
    assert torch.allclose(back, conv.weight.data, atol=1e-6)


def test_a_layer_whose_size_follows_the_image_is_refused() -> None:
    weights = create_model("seed", 10, 1, 28).state_dict()
    for classes in (10, 2):  # the head kept or replaced: what reaches it is bound to the image size either way
        with pytest.raises(ConvnetError, match=r"the classifier seq.7 takes 6,272 features there but 2,048 here: "
                                               r"the model has no global pooling"):
            adapt(weights, create_model("seed", classes, 1, 16), keep_head=True)
    with pytest.raises(ConvnetError, match="its weights are not this model's"):
        adapt(weights, create_model("fastnet", 10, 1, 28), keep_head=True)


class _Weights(TrainEvents):
    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, state: TrainState) -> None:
        self.after.append({k: v.clone() for k, v in state.model.state_dict().items()})


def test_the_head_trains_alone_while_frozen_then_the_body_at_its_own_rate(source_run: Path) -> None:
    data = load_dataset("fashion-mnist", runfolder.open_run(source_run).config["data"]["source"])
    two = data.train.labels < 2
    spec = InputSpec(1, 28, 28, ("a", "b"))
    split = Split(data.train.images[two], data.train.labels[two])
    state, _ = fit_weights(open_source(source_run), "fastnet", spec)
    seen = _Weights()
    config = TrainConfig(model="fastnet", optimizer="sgd", lr=0.05, momentum=0.9, epochs=2, batch_size=16,
                         freeze_epochs=1, body_lr=0.1, weight_decay=5e-4)
    train(config, split, spec, init=state, events=seen)
    first, second = seen.after
    body = [k for k in state if not k.startswith("head.") and k.endswith("weight")]
    assert all(torch.equal(first[k], state[k]) for k in body)  # frozen: not a single weight moved
    assert not torch.equal(first["head.2.weight"], state["head.2.weight"])  # the head learned
    assert any(not torch.equal(second[k], first[k]) for k in body)  # then the body too
    assert not torch.equal(first["features.0.1.running_mean"], state["features.0.1.running_mean"])  # BN statistics
    with pytest.raises(ConvnetError, match="--freeze-epochs trains the head of a model that starts from trained"):
        train(config, split, spec)


def test_fine_tuning_from_the_command_line_records_its_source(source_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (photos / name).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
            img[:, :, label * 2] += 150  # red cats, blue dogs
            Image.fromarray(img).save(photos / name / f"{i}.png")
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(["train", "--device", "cpu", "--data", str(photos), "--init-from", str(source_run), "--epochs", "3",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "starting from" in printed and "adapted from 1 to 3 channels" in printed and "(10 -> 2 classes" in printed
    config = json.loads((out / runfolder.CONFIG).read_text())
    assert config["init"]["sha256"] == hashlib.sha256((source_run / runfolder.WEIGHTS).read_bytes()).hexdigest()
    assert config["train"]["model"] == "fastnet" and config["train"]["freeze_epochs"] == 1
    assert config["train"]["body_lr"] == 0.1 and "test_data" not in config["data"]
    refused = tmp_path / "refused"
    assert main(["train", "--device", "cpu", "--data", str(photos), "--init-from", str(source_run), "--model", "seed",
                 "--out", str(refused)]) == 1
    assert "leave out --model seed" in capsys.readouterr().err and not refused.exists()
    assert main(["train", "--device", "cpu", "--resume", str(out), "--init-from", str(source_run)]) == 1
    assert "leave out --init-from" in capsys.readouterr().err


def _hub_cache(root: Path, repo: str, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> Path:
    """A folder laid out as the Hugging Face hub's cache, holding one repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    runfolder.save_tensors(snapshot / "model.safetensors", tensors)
    (snapshot / "config.json").write_text(json.dumps(config))
    return root


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_a_hub_model_starts_a_run_with_its_normalization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from convnet.use.export import export_run
    from convnet.use.loadrun import load_run

    torch.manual_seed(0)
    imagenet = create_model("resnet18", 1000, 3, 224).state_dict()  # as timm's resnet18 weights are laid out
    cache = _hub_cache(tmp_path / "hub", "timm/resnet18.toy", imagenet, {
        "architecture": "resnet18", "num_classes": 1000,
        "pretrained_cfg": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": [3, 224, 224]}})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the tests never reach the network
    source = open_source("hf:timm/resnet18.toy")
    assert source.model == "resnet18" and source.mean == tuple(IMAGENET_MEAN) and source.classes is None
    photos = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (photos / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(photos / name / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--device", "cpu", "--data", str(photos), "--init-from", "hf:timm/resnet18.toy",
                 "--epochs", "2", "--batch-size", "8", "--out", str(run), "--no-progress"]) == 0
    assert "classifier head fc replaced (1000 -> 2 classes" in capsys.readouterr().out
    loaded = load_run(run, device="cpu")
    assert loaded.spec.mean == tuple(IMAGENET_MEAN) and loaded.spec.std == tuple(IMAGENET_STD)
    assert torch.allclose(loaded.model.input_mean.flatten(), torch.tensor(IMAGENET_MEAN))  # predict normalizes
    assert export_run(run, tmp_path / "m.onnx", progress=False).parity.passed  # and so does the exported graph
    grey = InputSpec(1, 24, 24, ("a", "b"))  # grey images: the colour normalization averaged
    assert spec_for(source, grey).mean == (sum(IMAGENET_MEAN) / 3,) and spec_for(source, grey).std is not None


def test_a_hub_model_that_is_not_in_the_cache_names_the_cache(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match=r"hf:timm/absent: model.safetensors of timm/absent not in the cache, and "
                                       r"HF_HUB_OFFLINE is set; looked in .*empty-cache"):
        open_source("hf:timm/absent")
