"""Starting weights for a run (``convnet train --init-from SOURCE``): a run folder, a
``.safetensors`` file of a model's weights, or ``hf:REPO`` (a model on the Hugging Face
hub, e.g. ``hf:timm/resnet18.a1_in1k``, found in the hub's cache or downloaded into it),
read (tensors only: nothing runs) and fitted to the new run's model.

Fitting keeps every weight that means the same in the new model and replaces or adapts
the rest, as timm does:

* the classifier head (the model's last linear layer) is kept only when the source names
  its classes and they are the new data's, in the same order; otherwise it starts fresh,
  drawn like any new model's;
* grey to colour, or colour to grey, adapts the first convolution (timm's
  ``adapt_input_conv``): grey weights repeated over three channels and divided by three,
  colour weights summed into one;
* another image size needs nothing for a model with global pooling; a layer whose size
  follows the image size (the seed model's ``Linear(8*H*W)``) is refused, saying why.

A fine-tuned run records where it started (the source and the SHA-256 of its weights)
and inherits nothing else from it but the input normalization its weights were trained
with (a hub model's mean and std), which goes into the run's input spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convnet.core import runfolder
from convnet.core.errors import ConvnetError, RunError
from convnet.data.dataset import InputSpec
from convnet.models.networks import create_model, first_conv_name, head_name, list_models

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Source:
    """Weights to start from, read.

    Attributes:
        name: the source as given (a run folder or a file).
        path: the weights file.
        model: the registered model the weights are for, where the source says (a run's
            config, or the ``model`` entry of a file's metadata); None otherwise.
        classes: the class names of the source's outputs, where it names them (a run).
        tensors: the weights.
        sha256: of the weights file's bytes.
        mean, std: the input normalization the weights were trained with, per channel
            (a hub model's, or a run's that had one); None: none.
    """

    name: str
    path: Path
    model: str | None
    classes: tuple[str, ...] | None
    tensors: dict[str, torch.Tensor]
    sha256: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def open_source(source: PathLike) -> Source:
    """Read the weights ``source`` names: a run folder (its ``model.safetensors``, model,
    classes and normalization), a ``.safetensors`` file (its metadata may name the model)
    or ``hf:REPO[@REVISION]`` (see :func:`hub_weights`).

    Raises:
        RunError: no such folder, file or hub model; not a run folder; not safetensors.
    """
    model, classes, mean, std = None, None, None, None
    if str(source).startswith(HUB):
        path, model, mean, std = hub_weights(str(source))
    else:
        path = Path(source)
        if path.is_dir():
            run = runfolder.open_run(path)
            model, classes, mean, std = run.model_name, run.spec.classes, run.spec.mean, run.spec.std
            path = run.path / runfolder.WEIGHTS
        elif not path.is_file():
            raise RunError(f"--init-from {source}: no such run folder or .safetensors file")
    tensors = runfolder.load_tensors(path)
    if model is None:
        model = runfolder.tensors_metadata(path).get("model")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return Source(str(source), path, model, classes, tensors, digest.hexdigest(), mean, std)


HUB = "hf:"


def hub_weights(name: str) -> tuple[Path, str | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """``hf:REPO[@REVISION]``: the repository's ``model.safetensors`` and, from its
    ``config.json`` (timm's layout), the model it is (``architecture``) and the input
    normalization it was trained with (``pretrained_cfg.mean``/``std``). Found in the hub's
    cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``)
    first; downloaded into it only where it is missing and ``HF_HUB_OFFLINE`` is not set.

    Raises:
        RunError: not in the cache and not downloadable (no network, no such repository),
            naming the repository and the cache it looked in.
    """
    from huggingface_hub import hf_hub_download  # imported here: only a run that starts from the hub needs it

    repo, _, revision = name[len(HUB):].partition("@")
    cache = hub_cache()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

    def fetch(filename: str, required: bool) -> Path | None:
        why = "not in the cache, and HF_HUB_OFFLINE is set"
        for local_only in (True, False) if not offline else (True,):  # the cache first: no network needed
            try:
                return Path(hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache,
                                            local_files_only=local_only))
            except Exception as e:  # noqa: BLE001 (the hub's own errors, OSError, httpx's): named below
                if not local_only:
                    why = f"not in the cache, and the hub did not give it ({type(e).__name__}: " \
                          f"{(str(e).splitlines() or [''])[0][:160]})"
        if not required:
            return None
        raise RunError(f"--init-from {name}: {filename} of {repo} {why}; looked in {cache}; connect to the network "
                       "once, or download it and give the file's path")

    weights = fetch("model.safetensors", required=True)
    config_path = fetch("config.json", required=False)
    assert weights is not None
    model, mean, std = None, None, None
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError):
            config = {}
        config = config if isinstance(config, dict) else {}
        model = config.get("architecture") if isinstance(config.get("architecture"), str) else None
        pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
        if _numbers(pretrained_cfg.get("mean")) and _numbers(pretrained_cfg.get("std")):
            mean, std = tuple(pretrained_cfg["mean"]), tuple(pretrained_cfg["std"])
    return weights, model, mean, std


def hub_cache() -> Path:
    """Where the Hugging Face hub keeps its downloads, as its own library finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)


def spec_for(source: Source, spec: InputSpec) -> InputSpec:
    """``spec`` with the input normalization of ``source``'s weights, for ``spec``'s
    channels (a colour one averaged for grey images); ``spec`` itself when it has none."""
    if source.mean is None or source.std is None:
        return spec
    mean, std = source.mean, source.std
    if len(mean) != spec.channels:
        mean, std = (sum(mean) / len(mean),) * spec.channels, (sum(std) / len(std),) * spec.channels
    return replace(spec, mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std))


def model_of(source: Source, asked: str | None) -> str:
    """The model a run started from ``source`` trains: the source's; ``asked`` (``--model``)
    must agree with it, or name it where the source does not.

    Raises:
        ConvnetError: ``--model`` differs from the source's, or neither names a registered model.
    """
    if source.model is not None and asked is not None and asked != source.model:
        raise ConvnetError(f"--init-from {source.name} holds a {source.model} model; leave out --model {asked} "
                           "(a run started from trained weights trains their model)")
    name = source.model or asked
    if name is None:
        raise ConvnetError(f"--init-from {source.name}: the file does not say which model its weights are for; "
                           f"give it with --model (one of: {', '.join(list_models())})")
    if name not in list_models():
        raise ConvnetError(f"--init-from {source.name}: its model {name!r} is not registered here; "
                           f"registered: {', '.join(list_models())}")
    return name


def fit_weights(source: Source, model_name: str, spec: InputSpec,
        seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The source's weights fitted to ``model_name`` built for ``spec``, and what the run
    records of them (``config.json``'s ``init``). A fresh head is drawn from ``seed`` (the
    run's), leaving torch's global random state as it was.

    Raises:
        ConvnetError: a weight that cannot be fitted, named with the reason.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(model_name, spec.num_classes, spec.channels, (spec.height, spec.width))
    state, notes = adapt(source.tensors, model, keep_head=source.classes == spec.classes, source=source.name)
    record = {"source": source.name, "weights": str(source.path.resolve()), "sha256": source.sha256,
              "model": model_name, "changes": notes}
    return state, record


def adapt(weights: Mapping[str, torch.Tensor], model: nn.Module, *, keep_head: bool,
          source: str = "the weights") -> tuple[dict[str, torch.Tensor], list[str]]:
    """``weights`` fitted to ``model``: its head kept (``keep_head``) or left as ``model``
    drew it, its first convolution adapted to ``model``'s input channels.

    Returns:
        The state dict for ``model`` and one line for each change made.

    Raises:
        ConvnetError: a weight missing, unexpected, or of a shape that cannot be fitted.
    """
    own = model.state_dict()
    head, conv = head_name(model), first_conv_name(model)
    state, notes = {}, []
    counters = ("num_batches_tracked",)  # batch norm's step counters: some published weights leave them out
    missing = sorted(k for k in set(own) - set(weights) if not k.endswith(counters))
    unexpected = sorted(k for k in set(weights) - set(own) if not k.endswith(counters))
    if missing or unexpected:
        raise ConvnetError(f"--init-from {source}: its weights are not this model's (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    for key, target in own.items():
        if key not in weights:  # a step counter
            state[key] = target
            continue
        w = weights[key]
        if key == f"{head}.weight" and w.shape[1:] != target.shape[1:]:
            raise ConvnetError(f"--init-from {source}: the classifier {head} takes {w.shape[1]:,} features there but "
                               f"{target.shape[1]:,} here: the model has no global pooling, so what reaches its head "
                               "follows the image size; train on images of the source's size (--image-size) or "
                               "start from a model with global pooling")
        if key.startswith(head + "."):
            if keep_head and w.shape == target.shape:
                state[key] = w
                continue
            state[key] = target  # a fresh head, as the new model drew it
            if key == f"{head}.weight":
                notes.append(f"classifier head {head} replaced ({w.shape[0]} -> {target.shape[0]} classes, "
                             "fresh weights)" if w.shape != target.shape else
                             f"classifier head {head} replaced (other classes, fresh weights)")
        elif key == f"{conv}.weight" and w.shape[1] != target.shape[1] and w.shape[2:] == target.shape[2:]:
            state[key] = adapt_input_conv(w, target.shape[1])
            notes.append(f"first convolution {conv} adapted from {w.shape[1]} to {target.shape[1]} channels")
        elif w.shape != target.shape:
            raise ConvnetError(f"--init-from {source}: {key} is {tuple(w.shape)} there but {tuple(target.shape)} "
                               "here: this layer's size follows the image size (the model has no global pooling), "
                               "so train on images of the source's size (--image-size) or start from a model with "
                               "global pooling")
        else:
            state[key] = w
    return state, notes


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first convolution's weight ``(out, c, kh, kw)`` for ``channels`` input channels:
    colour to grey sums over the channels; otherwise the weights are repeated over the
    new channels and scaled by ``c / channels``, so a grey image repeated into colour
    gives the same activations (timm's ``adapt_input_conv``)."""
    c = weight.shape[1]
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-channels // c)  # ceil
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (c / channels)
