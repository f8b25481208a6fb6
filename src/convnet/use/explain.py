"""Why the model decided: heat maps of the evidence for a class over an image.

Integrated gradients (Sundararajan et al., 2017) through Captum's ``IntegratedGradients``:
the gradient of the class's logit, integrated along the straight path from a black image
to the image (:data:`STEPS` steps), times the image; its positive part, summed over the
colour channels and scaled to [0, 1] per image, is the map. Chosen over Grad-CAM by the
sanity check of Adebayo et al. (2018) on data whose evidence is known
(``tests/test_explain.py``: 28x28 noise whose class is a bright 6x6 patch in one of four
corners): the share of a map's mass in the patch's corner was 0.81 for fastnet and 0.99
for the seed model with integrated gradients, 0.41 and 0.00 with Grad-CAM on the last
convolution (0.33-0.47 on any of fastnet's blocks), and the maps of a model whose weights
were re-initialised are unrelated to the trained model's (Spearman 0.05). Maps need
gradients, so they come from a run folder, never an ``.onnx`` file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convnet.core.durable import atomic_write
from convnet.core.errors import ConvnetError, InputError
from convnet.data.dataset import InputSpec, to_float
from convnet.data.inputfiles import input_batches
from convnet.models.networks import uncalibrated
from convnet.use.loadrun import Model
from convnet.use.onnxfile import OnnxModel

STEPS = 32  # points on the path from the black image, per image


def heat_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None = None,
              batch_size: int = 32) -> np.ndarray:
    """Maps ``(N, H, W)`` in [0, 1] of the evidence in uint8 ``images`` ``(N, C, H, W)`` for
    ``targets`` (class indices; default: each image's predicted class), in fp32. An image
    with no positive evidence gets zeros."""
    from captum.attr import IntegratedGradients

    net = uncalibrated(model)[0].eval()  # a temperature divides every logit alike: the same map
    device = next(net.parameters()).device
    method = IntegratedGradients(net)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size].to(device))  # as every forward pass scales them
        with torch.no_grad():
            target = net(x).argmax(1) if targets is None else targets[start:start + batch_size].to(device)
        attribution = method.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=STEPS,
                                       internal_batch_size=STEPS * batch_size)
        maps = attribution.detach().clamp_min(0).sum(1).cpu()  # (n, H, W): the positive evidence
        peak = maps.flatten(1).max(1).values[:, None, None]
        out.append(torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps)).numpy())
    return np.concatenate(out) if out else np.zeros((0, *images.shape[-2:]), np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """An RGB uint8 picture ``(H, W, 3)``: ``image`` (uint8 ``(C, H, W)``) in grey or
    colour, with ``heat`` ``(H, W)`` in [0, 1] laid over it in matplotlib's ``jet`` colours,
    opaque in proportion to the evidence. Integrated gradients are pixel by pixel and
    speckled; for the eye the map is first smoothed (a Gaussian of a twentieth of the
    image's side, 1.4 px at 28x28) and scaled to its peak again."""
    from matplotlib import colormaps
    from scipy.ndimage import gaussian_filter

    heat = gaussian_filter(np.clip(heat, 0, 1).astype(np.float32), sigma=max(heat.shape) / 20)
    heat = heat / heat.max() if heat.max() > 0 else heat
    base = np.repeat(image[:1], 3, 0) if image.shape[0] == 1 else image[:3]
    base = base.transpose(1, 2, 0).astype(np.float32) / 255
    colour = colormaps["jet"](heat)[..., :3]
    weight = alpha * heat[..., None]  # no colour where there is no evidence
    return np.round(255 * ((1 - weight) * base + weight * colour)).astype(np.uint8)


def explained(model: nn.Module, images: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """uint8 ``images`` ``(N, C, H, W)``, each with the heat map of its class in ``targets``
    laid over it: RGB uint8 ``(N, 3, H, W)``, for the grids of mistakes."""
    if len(images) == 0:
        return np.zeros((0, 3, *images.shape[-2:]), np.uint8)
    maps = heat_maps(model, images.cpu(), torch.as_tensor(targets, dtype=torch.long))
    return np.stack([overlay(i, h).transpose(2, 0, 1) for i, h in zip(images.cpu().numpy(), maps, strict=True)])


def check_explain_output(model: Model | None, out: Path) -> None:
    """``--explain DIR``, checked before anything is predicted: a run folder (an ``.onnx``
    file has no gradients), and a folder that is one or can be made."""
    if isinstance(model, OnnxModel):
        raise ConvnetError(f"--explain: {model.path} is an .onnx file, which keeps no gradients to draw heat maps "
                           "from; give the run folder it was exported from")
    if out.exists() and not out.is_dir():
        raise ConvnetError(f"--explain {out}: exists and is not a folder")
    if not out.parent.is_dir():
        raise ConvnetError(f"--explain {out}: folder {out.parent} does not exist")


def write_explanations(model: nn.Module, spec: InputSpec, files: Sequence[str | os.PathLike[str]], out: Path, *,
                       layout: str = "auto") -> int:
    """``convnet predict RUN INPUT... --explain DIR``: one PNG per image in ``DIR``, the
    image with the heat map of its predicted class laid over it, named
    ``NNNNN-NAME.png`` in input order; files that cannot be read are passed over (the
    prediction names them). Returns how many were written."""
    from PIL import Image

    out.mkdir(exist_ok=True)
    written = 0
    for item in input_batches(files, spec, layout=layout):
        if isinstance(item, InputError):
            continue
        maps = heat_maps(model, item.images)
        for name, image, heat in zip(item.names, item.images.numpy(), maps, strict=True):
            base = Path(name).name  # a file's name without its extension; an array's image as "a.npy[3]"
            base = base if base.endswith("]") else base.rsplit(".", 1)[0]
            safe = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-")[:80]
            picture = Image.fromarray(overlay(image, heat))
            atomic_write(out / f"{written:05d}-{safe}.png", lambda f, p=picture: p.save(f, "PNG"))
            written += 1
    return written
