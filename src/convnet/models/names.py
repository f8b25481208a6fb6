"""The models' names, as plain data: what ``convnet models`` lists and what a config's
``model`` is checked against, known without building a model (no torch). The networks
themselves are in :mod:`convnet.models.networks`, each bound to its name here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelName:
    """A registered model, as listed.

    Attributes:
        description: one line.
        parameters: for 10 classes of 1x28x28 images (Fashion-MNIST); None for a model
            registered at run time (not counted until built).
    """

    description: str
    parameters: int | None = None


# The built-in models; tests/test_models.py checks each count against the model it builds.
_NAMES: dict[str, ModelName] = {
    "seed": ModelName("the tutorial's 3-conv CNN (no pooling, no batch norm)", 68_834),
    "fastnet": ModelName("3 conv-BN-ReLU-pool stages (32-64-128), the default on a CPU with bfloat16", 94_186),
    "fastnet-slim": ModelName("fastnet with a first stage of 16 (16-64-128)", 84_794),
    "fastnet-lean": ModelName("fastnet-slim, each stage pooled before its BN and ReLU: the default where training is "
                              "fp32", 84_794),
    "airnet": ModelName("airbench-style GELU net, widths 64-128-256 (1.2 M parameters), the GPU default",
                        1_165_920),
    "airnet-wide": ModelName("airnet with widths 128-256-512 (4.7 M parameters), for the best recipe", 4_654_272),
    "resnet18": ModelName("ResNet-18 in ImageNet form (11.2 M parameters), torchvision's parameter names",
                          11_175_370),
    "resnet20": ModelName("ResNet-20 in CIFAR form, widths 16-32-64 (0.27 M parameters), for 28-64 px images",
                          272_186),
}


def list_models() -> dict[str, str]:
    """Registered model names and a one-line description of each."""
    return {name: m.description for name, m in _NAMES.items()}


def model_name(name: str) -> ModelName | None:
    """The listing of a registered model; None for an unknown name."""
    return _NAMES.get(name)


def add_name(name: str, description: str) -> None:
    """List a model registered at run time (:func:`convnet.models.networks.register_model`)."""
    _NAMES[name] = ModelName(description)
