"""Models: a tiny registry and the networks in it.

Every model follows one contract: built by ``create_model(name, num_classes, in_channels,
image_size)``, it takes float images ``(B, C, H, W)`` in [0, 1] of that size (any size of
at least 8x8 pixels, square or not) and returns logits ``(B, num_classes)``. Nothing in a
model knows which device it runs on.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from convnet.core.errors import ConvnetError, RunError
from convnet.core.runfolder import load_tensors
from convnet.models.names import add_name, list_models, model_name

Size = tuple[int, int]  # (H, W) in pixels
ModelFactory = Callable[[int, int, Size], nn.Module]
_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str, description: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make a factory ``f(num_classes, in_channels, (H, W))`` creatable by name
    (and listed by ``convnet models`` in this process)."""

    def add(factory: ModelFactory) -> ModelFactory:
        _MODELS[name] = factory
        add_name(name, description)
        return factory

    return add


def _built_in(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: the network of a built-in model, listed in :mod:`convnet.models.names`."""
    assert model_name(name) is not None, name

    def add(factory: ModelFactory) -> ModelFactory:
        _MODELS[name] = factory
        return factory

    return add


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int | Size = 28, *,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> nn.Module:
    """Build a registered model with freshly initialised weights (from torch's global RNG).

    Args:
        name: a registered name (:func:`list_models`).
        num_classes: outputs (logits) per image.
        in_channels: 1 (grey) or 3 (RGB), or any other count.
        image_size: ``H`` for square images, or ``(H, W)``.
        mean, std: per channel: the model normalizes its input as ``(x - mean) / std``
            (models whose pretrained weights expect it: the residual networks).

    Raises:
        ConvnetError: unknown name (the message lists the valid ones), bad sizes, or a
            normalization the model does not take.
    """
    if name not in _MODELS:
        raise ConvnetError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if num_classes < 2 or in_channels < 1 or min(size) < 8:
        raise ConvnetError(
            f"model {name!r} needs num_classes >= 2, in_channels >= 1 and images of at least 8x8 pixels, "
            f"got {num_classes}, {in_channels}, {size[0]}x{size[1]}"
        )
    model = _MODELS[name](num_classes, in_channels, size)
    if mean is not None and std is not None:
        if not hasattr(model, "set_input_normalization"):
            raise ConvnetError(f"model {name!r} does not normalize its input (mean and std); start from weights of "
                               "a model that does (resnet18, resnet20)")
        model.set_input_normalization(mean, std)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` (a state dict) from loading into ``model``: missing and
    unexpected names, wrong shapes (at most three of each); None when it fits."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if not (missing or unexpected or wrong):
        return None
    parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
             "wrong shape for " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                             for k in wrong[:3]) if wrong else ""]
    return "; ".join(p for p in parts if p)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``, naming what does not fit."""
    state = load_tensors(path)
    problem = weight_mismatch(model, state)
    if problem:
        raise RunError(f"{path}: weights do not fit the model: {problem}")
    model.load_state_dict(state)


def head_name(model: nn.Module) -> str:
    """The classifier head: the name of the model's last linear layer."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def first_conv_name(model: nn.Module) -> str:
    """The name of the model's first convolution: the one that sees the image's channels."""
    return next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference: a copy of ``model`` in which every ``BatchNorm2d`` that follows a
    ``Conv2d`` in an ``nn.Sequential`` is folded into the convolution's weights and bias
    (PyTorch's ``fuse_conv_bn_eval``): the same logits up to rounding, one pass over the
    activations fewer per convolution. ``model`` itself when there is nothing to fold."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def pairs(m: nn.Module) -> list[tuple[str, int]]:
        return [(name, i) for name, seq in m.named_modules() if isinstance(seq, nn.Sequential)
                for i in range(len(seq) - 1) if type(seq[i]) is nn.Conv2d and type(seq[i + 1]) is nn.BatchNorm2d
                and seq[i + 1].track_running_stats]

    if not pairs(model):
        return model
    folded = copy.deepcopy(model).eval()
    for name, i in pairs(folded):
        seq = folded.get_submodule(name)
        seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return folded


@functools.cache
def _fused_op() -> Callable[..., torch.Tensor] | None:
    """oneDNN's convolution with a post-op (``torch.ops.mkldnn._convolution_pointwise``, what
    inductor's CPU backend calls); None where this build of PyTorch has none. Looked up once:
    every fused layer calls it at every batch."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise  # type: ignore[no-any-return]
    except (AttributeError, RuntimeError):
        return None


class ConvReLU(nn.Module):
    """For inference on the CPU: a ``Conv2d`` and the ``ReLU`` after it as one oneDNN call
    (the ReLU applied as each output is written), the same arithmetic as the two apart:
    the output is not written, read back and written again."""

    def __init__(self, conv: nn.Conv2d, padding: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False) if conv.bias is not None else None
        self.padding, self.stride = padding, list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = _fused_op()
        assert op is not None
        return op(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "relu", [None], "")


def _explicit_padding(conv: nn.Conv2d) -> list[int] | None:
    """The convolution's padding as numbers (``"same"`` resolved); None where it cannot be
    (a padding mode other than zeros, or ``"same"`` that pads one side more)."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return [0, 0]
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [t // 2 for t in total] if all(t % 2 == 0 for t in total) else None
    return [int(p) for p in conv.padding]  # type: ignore[union-attr]


def fuse_conv_relu(model: nn.Module) -> nn.Module:
    """For inference on the CPU: a copy of ``model`` in which each ``Conv2d`` that a ``ReLU``
    follows in an ``nn.Sequential`` (after any ``Identity`` that :func:`fold_batchnorm`
    left) is a :class:`ConvReLU`: the same logits to rounding, 1.0–1.6x the prediction speed
    measured (the seed model most, where each ReLU is a pass of its own; docs/performance.md).
    ``model`` itself when there is nothing to fuse, or where PyTorch has no oneDNN."""

    def pairs(m: nn.Module) -> list[tuple[str, int, int, list[int]]]:
        found = []
        for name, seq in m.named_modules():
            if not isinstance(seq, nn.Sequential):
                continue
            for i, conv in enumerate(seq):
                j = i + 1
                while j < len(seq) and isinstance(seq[j], nn.Identity):
                    j += 1
                padding = _explicit_padding(conv) if type(conv) is nn.Conv2d else None
                if padding is not None and j < len(seq) and type(seq[j]) is nn.ReLU:
                    found.append((name, i, j, padding))
        return found

    if _fused_op() is None or not pairs(model):
        return model
    fused = copy.deepcopy(model).eval()
    for name, i, j, padding in pairs(fused):
        seq = fused.get_submodule(name)
        seq[i], seq[j] = ConvReLU(seq[i], padding), nn.Identity()
    return fused


class Calibrated(nn.Module):
    """A trained model whose logits are divided by a temperature fitted after training
    (``convnet train --calibrate``): the same classes, better-calibrated probabilities.
    Applied when a run is opened for use, so every way of predicting has it (the ONNX
    graph too); the weights file holds the model's own weights only."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def uncalibrated(model: nn.Module) -> tuple[nn.Module, float | None]:
    """The model inside a :class:`Calibrated` one and its temperature (None: not calibrated)."""
    return (model.model, model.temperature) if isinstance(model, Calibrated) else (model, None)


class ConvNet(nn.Module):
    """The tutorial's network, layer for layer and in the same creation order, so that
    ``torch.manual_seed(42)`` gives the tutorial's initial weights (and its state-dict
    keys, ``seq.0.weight`` …)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: Size = (28, 28)) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(in_channels=in_channels, out_channels=32, kernel_size=(3, 3), padding="same"),  # (B, 32, H, W)
            nn.ReLU(),
            nn.Conv2d(in_channels=32, out_channels=16, kernel_size=(3, 3), padding="same"),  # (B, 16, H, W)
            nn.ReLU(),
            nn.Conv2d(in_channels=16, out_channels=8, kernel_size=(3, 3), padding="same"),  # (B, 8, H, W)
            nn.ReLU(),
            nn.Flatten(),  # (B, 8*H*W)
            nn.Linear(8 * image_size[0] * image_size[1], num_classes),  # (B, num_classes) logits; softmax: in the loss
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.seq(x)


@_built_in("seed")
def seed(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    return ConvNet(num_classes, in_channels, image_size)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (no bias: batch norm has one) -> batch norm -> ReLU; keeps H and W."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _conv_pool_bn(c_in: int, c_out: int) -> nn.Sequential:
    """:func:`_conv_bn`'s layers with a 2x2 max-pool after the conv: halves H and W."""
    conv, bn, relu = _conv_bn(c_in, c_out)
    return nn.Sequential(conv, nn.MaxPool2d(2), bn, relu)


class FastNet(nn.Module):
    """A small VGG-style CNN: conv-BN-ReLU blocks, max-pooling after each stage, global
    max pooling and one linear layer. About 5x the seed model's compute per image at
    28x28, much better accuracy per second of training. ``pool_first``: each stage
    pools right after its convolution, before the batch norm and ReLU (fewer values to
    normalise; batch norm is then not folded into the convolution for prediction)."""

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int],
                 pool_first: bool = False) -> None:
        super().__init__()
        w1, w2, w3 = widths
        if pool_first:  # conv -> max-pool -> batch norm -> ReLU: the batch norm and ReLU on a quarter of the values
            self.features = nn.Sequential(_conv_pool_bn(in_channels, w1), _conv_pool_bn(w1, w2), _conv_pool_bn(w2, w3))
        else:
            self.features = nn.Sequential(
                _conv_bn(in_channels, w1),  # (B, w1, H, W), e.g. 28x28
                nn.MaxPool2d(2),  # (B, w1, H/2, W/2): 14x14
                _conv_bn(w1, w2),
                nn.MaxPool2d(2),  # (B, w2, H/4, W/4): 7x7
                _conv_bn(w2, w3),
                nn.MaxPool2d(2),  # (B, w3, H/8, W/8): 3x3 (at least 1x1 from 8x8)
            )
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes))

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x))


@_built_in("fastnet")
def fastnet(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    return FastNet(num_classes, in_channels, (32, 64, 128))


@_built_in("fastnet-slim")
def fastnet_slim(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    # The first stage costs most memory traffic and the second convolution most arithmetic at 32 wide: 16 trains
    # 1.4x as fast in fp32 (2 cores, batch 128) for about the same accuracy per second (docs/performance.md).
    return FastNet(num_classes, in_channels, (16, 64, 128))


@_built_in("fastnet-lean")
def fastnet_lean(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    # fastnet-slim with each stage's max-pool moved before its batch norm and ReLU (as airnet's stages): those then
    # see a quarter of the values, and the fp32 step is 1.18x as fast (2 cores, batch 128; docs/performance.md).
    return FastNet(num_classes, in_channels, (16, 64, 128), pool_first=True)


def _conv_bn_gelu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class AirNet(nn.Module):
    """A GPU-sized network in the manner of airbench: a conv-BN-GELU stem, three blocks of
    conv, 2x2 max-pool, BN, GELU, conv, BN, GELU, then a global max pool and a linear
    layer (logits scaled by 1/4, which steadies the start of training)."""

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                                 nn.MaxPool2d(2, ceil_mode=True),  # (B, c_out, ceil(H/2), ceil(W/2))
                                 nn.BatchNorm2d(c_out), nn.GELU(), *_conv_bn_gelu(c_out, c_out))

        w1, w2, w3 = widths
        self.stem = nn.Sequential(*_conv_bn_gelu(in_channels, w1 // 2))  # (B, w1/2, H, W)
        self.blocks = nn.Sequential(block(w1 // 2, w1), block(w1, w2), block(w2, w3))  # (B, w3, H/8, W/8)
        self.head = nn.Linear(w3, num_classes, bias=False)

    def forward(self, x):  # type: ignore[no-untyped-def]
        features = self.blocks(self.stem(x)).amax(dim=(2, 3))  # (B, w3): global max pool
        return self.head(features) / 4


@_built_in("airnet")
def airnet(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    return AirNet(num_classes, in_channels, (64, 128, 256))


@_built_in("airnet-wide")
def airnet_wide(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    return AirNet(num_classes, in_channels, (128, 256, 512))


# --- residual networks, with torchvision's and timm's parameter names (conv1, bn1, layer1.0.conv1, ..., fc), so
# that their published weights load as they are (convnet train --init-from)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN stages and a shortcut (a 1x1 conv-BN where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(c_out)) if stride != 1 or c_in != c_out else None

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    """A residual network of :class:`BasicBlock` stages, with global average pooling.

    ``imagenet=True`` is ResNet-18's form (a 7x7 stride-2 stem and a 3x3 max pool: images
    reach the blocks at a quarter of their size); otherwise the CIFAR form (a 3x3 stem at
    full size, for 28-64 px images). Input normalization (:meth:`set_input_normalization`,
    from a run's input spec: the pretrained weights' mean and std) happens inside the
    model, as buffers outside the state dict, so that every use of the model applies it.
    """

    def __init__(self, num_classes: int, in_channels: int, blocks: tuple[int, ...], widths: tuple[int, ...],
                 imagenet: bool) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(1, in_channels, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.ones(1, in_channels, 1, 1), persistent=False)
        stem = widths[0]
        self.conv1 = (nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False) if imagenet
                      else nn.Conv2d(in_channels, stem, 3, padding=1, bias=False))
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
        c_in = stem
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True), 1):
            stage = [BasicBlock(c_in if j == 0 else width, width, 2 if i > 1 and j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            c_in = width
        self.stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def set_input_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Normalize every image as ``(x - mean) / std`` per channel before the first layer."""
        c = self.input_mean.shape[1]
        self.input_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.input_std.copy_(torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, x):  # type: ignore[no-untyped-def]
        x = (x - self.input_mean) / self.input_std  # (B, C, H, W), identity unless set
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)  # (B, width, H/2^k, W/2^k)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


@_built_in("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    return ResNet(num_classes, in_channels, (2, 2, 2, 2), (64, 128, 256, 512), imagenet=True)


@_built_in("resnet20")
def resnet20(num_classes: int, in_channels: int, image_size: Size) -> nn.Module:
    return ResNet(num_classes, in_channels, (3, 3, 3), (16, 32, 64), imagenet=False)
