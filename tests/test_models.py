from __future__ import annotations

import pytest
import torch
from torch import nn

from convnet.core.errors import ConvnetError
from convnet.models import inference, networks
from convnet.models.engine import Engine
from convnet.models.networks import (
    ConvReLU,
    count_parameters,
    create_model,
    fold_batchnorm,
    fuse_conv_relu,
    list_models,
)


class TutorialConvNet(nn.Module):
    """The tutorial's class, copied as it was printed."""

    def __init__(self) -> None:
        super(TutorialConvNet, self).__init__()  # noqa: UP008
        self.seq = nn.Sequential(
            nn.Conv2d(in_channels=1, out_channels=32, kernel_size=(3, 3), padding="same"),
            nn.ReLU(),
            nn.Conv2d(in_channels=32, out_channels=16, kernel_size=(3, 3), padding="same"),
            nn.ReLU(),
            nn.Conv2d(in_channels=16, out_channels=8, kernel_size=(3, 3), padding="same"),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 28 * 28, 10),
        )

    def forward(self, x_batch: torch.Tensor) -> torch.Tensor:
        return self.seq(x_batch)


def test_seed_model_has_the_tutorials_initial_weights() -> None:
    torch.manual_seed(42)
    ours = create_model("seed").state_dict()
    torch.manual_seed(42)
    theirs = TutorialConvNet().state_dict()
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert str(create_model("seed")).replace("ConvNet", "X") == str(TutorialConvNet()).replace("TutorialConvNet", "X")


@pytest.mark.parametrize("name", list(list_models()))
@pytest.mark.parametrize(("num_classes", "in_channels", "size"),
                         [(10, 1, (28, 28)), (3, 3, (32, 32)), (2, 3, (8, 8)), (5, 1, (40, 24))])
def test_every_model_contract(name: str, num_classes: int, in_channels: int, size: tuple[int, int]) -> None:
    """Every registered model, grey and colour, square and not, down to 8x8 pixels:
    logits of the right shape, finite, and a gradient for every parameter."""
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=size)
    x = torch.rand(4, in_channels, *size)
    logits = model(x)
    assert logits.shape == (4, num_classes)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0]) % num_classes).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize("name", list(list_models()))
def test_every_model_channels_last_matches(name: str) -> None:
    model = create_model(name).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_model_lists_the_valid_ones() -> None:
    with pytest.raises(ConvnetError, match="unknown model 'resnet9000'.*seed"):
        create_model("resnet9000")
    with pytest.raises(ConvnetError, match="num_classes"):
        create_model("seed", num_classes=1)
    with pytest.raises(ConvnetError, match="at least 8x8 pixels, got 10, 1, 7x28"):
        create_model("fastnet", image_size=(7, 28))


def with_statistics(name: str) -> nn.Module:
    """Model ``name`` for 3x24x24 images in eval mode, its batch norms' running statistics not the identity."""
    torch.manual_seed(0)
    model = create_model(name, 10, 3, (24, 24)).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 3, 24, 24) * 2)
    return model.eval()


@pytest.mark.parametrize("name", sorted(list_models()))
def test_folding_batchnorm_keeps_the_logits_and_the_model(name: str) -> None:
    model = with_statistics(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    x = torch.rand(16, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the model itself was changed"
    followed = [m for m in model.modules() if isinstance(m, nn.Sequential)
                for a, b in zip(m, list(m)[1:], strict=False) if type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d]
    kept = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert kept == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - len(followed)
    assert (folded is model) == (not followed)


@pytest.mark.parametrize("name", sorted(list_models()))
def test_fusing_each_convolution_with_its_relu_keeps_the_logits_and_the_model(name: str) -> None:
    model = with_statistics(name).to(memory_format=torch.channels_last)
    folded = fold_batchnorm(model)
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    fused = fuse_conv_relu(folded)
    x = torch.rand(16, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), folded(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in before.items()), "the model itself was changed"
    followed = [m for m in folded.modules() if isinstance(m, nn.Sequential)
                for a, b in zip(m, [c for c in m if not isinstance(c, nn.Identity)][1:], strict=False)
                if type(a) is nn.Conv2d and type(b) is nn.ReLU]
    assert sum(isinstance(m, ConvReLU) for m in fused.modules()) == len(followed)
    assert (fused is folded) == (not followed)


def test_the_seed_model_predicts_with_its_convolutions_and_relus_fused() -> None:
    torch.manual_seed(0)
    model = create_model("seed").eval()  # padding "same": resolved to 1 pixel for the fused call
    fused = fuse_conv_relu(model)
    assert [type(m).__name__ for m in fused.seq][:6] == ["ConvReLU", "Identity"] * 3
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_without_onednn_nothing_is_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networks, "_fused_op", lambda: None)
    model = create_model("seed").eval()
    assert fuse_conv_relu(model) is model


@pytest.mark.parametrize(("padding", "dilation", "expected"), [
    ("same", 1, [1, 1]), ("same", 2, [2, 2]), ("valid", 1, [0, 0]), (2, 1, [2, 2]), ((1, 0), 1, [1, 0])])
def test_a_convolutions_padding_is_written_out_for_the_fused_call(padding: object, dilation: int,
                                                                  expected: list[int]) -> None:
    conv = nn.Conv2d(2, 4, 3, padding=padding, dilation=dilation)  # type: ignore[arg-type]
    assert networks._explicit_padding(conv) == expected
    assert networks._explicit_padding(nn.Conv2d(2, 4, 4, padding="same")) is None  # one side more: not fused
    assert networks._explicit_padding(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")) is None


def test_fastnet_lean_is_fastnet_slim_with_each_pool_before_its_batch_norm() -> None:
    """With batch norm at the identity (as initialised, in eval mode) max-pooling commutes with it and with ReLU,
    so the same convolutions give the same logits; trained statistics make the two differ."""
    torch.manual_seed(0)
    slim, lean = create_model("fastnet-slim").eval(), create_model("fastnet-lean").eval()
    convs = [m for m in lean.modules() if isinstance(m, nn.Conv2d)]
    for mine, theirs in zip(convs, [m for m in slim.modules() if isinstance(m, nn.Conv2d)], strict=True):
        mine.weight.data.copy_(theirs.weight.data)
    lean.head.load_state_dict(slim.head.state_dict())
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), slim(x))
        for stage in lean.features:
            assert [type(m) for m in stage] == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]
            stage[2].running_var.fill_(4.0)
        assert not torch.allclose(lean(x), slim(x))


def test_resnet18_has_torchvisions_parameter_names_and_shapes() -> None:
    """So that published ImageNet weights load as they are: checked against the names and shapes that
    torchvision's own resnet.py gives (tests/fixtures/torchvision_resnet18.json)."""
    import json
    from pathlib import Path

    reference = json.loads((Path(__file__).parent / "fixtures" / "torchvision_resnet18.json").read_text())
    ours = [[k, list(v.shape)] for k, v in create_model("resnet18", 1000, 3, 224).state_dict().items()]
    assert ours == reference["parameters"]
    small = create_model("resnet20", 10, 3, 32).state_dict()
    assert {"conv1.weight", "layer3.2.conv2.weight", "layer2.0.downsample.0.weight", "fc.weight"} <= set(small)


def test_input_normalization_is_inside_the_model_and_outside_its_weights() -> None:
    torch.manual_seed(0)
    plain = create_model("resnet20", 4, 3, 16).eval()
    normalized = create_model("resnet20", 4, 3, 16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5)).eval()
    normalized.load_state_dict(plain.state_dict())  # the same weights: the buffers are not part of them
    assert set(plain.state_dict()) == set(normalized.state_dict())
    x = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), plain((x - mean) / std))
    with pytest.raises(ConvnetError, match="model 'fastnet' does not normalize its input"):
        create_model("fastnet", 4, 3, 16, mean=(0.5,) * 3, std=(0.2,) * 3)


@pytest.mark.parametrize("name", list(list_models()))
def test_the_listing_counts_each_models_parameters_as_built(name: str) -> None:
    """`convnet models` lists each size without building a model (no torch): the counts it keeps are the built ones."""
    from convnet.models.names import model_name

    listed = model_name(name)
    assert listed is not None and listed.parameters == count_parameters(create_model(name))


def test_prediction_fuses_only_in_calls_large_enough_to_pay_for_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    fused: list[int] = []
    real = inference.fuse_conv_relu
    monkeypatch.setattr(inference, "fuse_conv_relu", lambda m: fused.append(1) or real(m))
    torch.manual_seed(0)
    model = create_model("seed").eval()
    images = torch.randint(0, 256, (inference.FUSE_FROM, 1, 28, 28), dtype=torch.uint8)
    engine = Engine.fast(torch.device("cpu"))
    few = inference.infer(model, images[:3], engine=engine)
    assert not fused, "a call of 3 images made a fused copy"
    many = inference.infer(model, images, engine=engine)
    assert fused == [1]
    torch.testing.assert_close(few, many[:3], rtol=1e-5, atol=1e-5)
