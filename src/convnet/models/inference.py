"""Inference: the one forward pass (:func:`infer`, logits for a batch of images) that
training's checks, evaluation, the command line and the API all use, and
:func:`predict`, its labels and probabilities.

Loading a trained run to predict with is :mod:`convnet.use.loadrun`'s job; files and arrays
become images in :mod:`convnet.data.arrays` and :mod:`convnet.data.inputfiles`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convnet.core.errors import InputError
from convnet.data.arrays import as_images
from convnet.data.dataset import DiskImages
from convnet.models.engine import Engine, exact_arithmetic
from convnet.models.networks import fold_batchnorm, fuse_conv_relu

STREAM_BATCH = 128  # images read from disk per forward pass, at most (streaming: --memory-budget)
# Images in one call from which each ReLU is fused into its convolution (Engine.fuse_relu): making the fused copy
# costs 1-3 ms a call (2 AMX cores: one image took 0.64 ms apart and 1.78 fused with the seed model, 4.15 and 7.5 with
# fastnet) and saves 5-17 us an image (docs/performance.md), so it pays from some hundreds of images.
FUSE_FROM = 1024


def infer(model: nn.Module, images: torch.Tensor | DiskImages, *, engine: Engine | None = None,
          batch_size: int | None = None, tta: bool = False) -> torch.Tensor:
    """Logits ``(N, num_classes)`` (float32, on the CPU) for ``images``.

    Args:
        model: any registered model, already on ``engine.device``.
        images: uint8 ``(N, C, H, W)`` in [0, 255] (in memory or on disk) or float in [0, 1].
        engine: device, memory layout and batch size; defaults to the CPU fast path. The
            arithmetic is always fp32 (:func:`~convnet.models.engine.exact_arithmetic`), whatever
            precision the engine trains in: a run predicts the same everywhere.
        batch_size: images per forward pass; defaults to ``engine.infer_batch_size``; at most
            :data:`STREAM_BATCH` for images on disk.
        tta: test-time augmentation: the mean of the logits of each image and its mirror.
    """
    engine = engine or Engine.fast()
    batch_size = batch_size or engine.infer_batch_size
    if isinstance(images, DiskImages):  # streamed to keep memory bounded: read as few at a time as before
        batch_size = min(batch_size, STREAM_BATCH)
    model.eval()
    if engine.fold_batchnorm:
        model = fold_batchnorm(model)  # a copy; the caller's model is left as it is
    if engine.fuse_relu and len(images) >= FUSE_FROM:
        model = fuse_conv_relu(model)  # the same, each convolution and its ReLU as one call
    out = []
    with torch.inference_mode(), exact_arithmetic(engine.device):
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if chunk.dtype == torch.uint8:
                x = engine.batch(chunk)
            else:
                x = chunk.to(engine.device, torch.float32).contiguous(memory_format=engine.memory_format)
            logits = model(x).float()
            if tta:
                logits = (logits + model(x.flip(3)).float()) / 2
            out.append(logits)  # kept on the device: one copy to the host at the end, not one per batch
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out).cpu()


@dataclass(frozen=True)
class Prediction:
    labels: torch.Tensor  # (N,) int64 class indices
    probabilities: torch.Tensor  # (N, num_classes), rows sum to 1


def predict(model: nn.Module, images: torch.Tensor | DiskImages | Any, *, engine: Engine | None = None,
            tta: bool = False) -> Prediction:
    """Class indices and softmax probabilities for ``images`` (see :func:`infer`): a
    ``(N, C, H, W)`` tensor, or any array, tensor or list :func:`convnet.data.arrays.as_images`
    accepts (numpy ``(N, 28, 28)``, channels last, PIL images, file paths)."""
    if not isinstance(images, DiskImages) and not (isinstance(images, torch.Tensor) and images.ndim == 4):
        images = as_images(images, name="images")
    try:
        probs = infer(model, images, engine=engine, tta=tta).softmax(dim=1)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:  # images of another size or channel count than the model's
        raise InputError(f"images of shape {tuple(images.shape[1:])} (C, H, W) do not fit this model: "
                         f"{str(e).splitlines()[0]}") from None
    return Prediction(probs.argmax(dim=1), probs)
