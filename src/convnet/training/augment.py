"""Batched data augmentation: a few tensor operations on a whole batch, on its device.

No per-image Python and no DataLoader: a batch of B images is shifted and flipped with
one gather, so augmentation costs little next to the forward pass even on 2 CPU cores.

The random numbers of a batch are drawn first (:func:`draw`), then applied
(:func:`apply`): the training step takes the draws as inputs, so a step captured in a
CUDA graph replays with new draws each time, from the same generator as an eager step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from convnet.training.config import AUGMENTS  # noqa: F401 (the names of the augmentations, re-exported)


@dataclass
class Draws:
    """One batch's random augmentation: shifts ``(B, 2)`` (rows, columns, in
    ``0..2*pad``) and flips ``(B,)`` (True: mirror), each None when not used."""

    shifts: torch.Tensor | None = None
    flips: torch.Tensor | None = None


def draw(batch: int, kind: str, pad: int, generator: torch.Generator, device: torch.device) -> Draws:
    """The random numbers of augmentation ``kind`` (one of :data:`AUGMENTS`) for ``batch`` images."""
    d = Draws()
    if kind in ("translate", "flip-translate") and pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
        d.shifts = torch.stack([dy, dx], dim=1)  # (B, 2)
    if kind in ("flip", "flip-translate"):
        d.flips = torch.rand(batch, generator=generator, device=device) < 0.5  # (B,)
    return d


def translate(x: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift each image by ``shifts - pad`` pixels in y and x, filling with zeros (black).

    Args:
        x: ``(B, C, H, W)`` images, any dtype.
        shifts: ``(B, 2)`` integers in ``0..2*pad``: the crop's top-left corner in the padded image.
        pad: largest shift in pixels.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + shifts[:, 0].view(b, 1, 1)  # (B, H, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + shifts[:, 1].view(b, 1, 1)  # (B, 1, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C): one gather
    return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory


def flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror left to right the images where ``flips`` ``(B,)`` is True."""
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)


def apply(x: torch.Tensor, draws: Draws, pad: int) -> torch.Tensor:
    """Apply a batch's draws: the shifts, then the flips."""
    if draws.shifts is not None:
        x = translate(x, draws.shifts, pad)
    if draws.flips is not None:
        x = flip(x, draws.flips)
    return x


def augment(x: torch.Tensor, kind: str, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Draw and apply augmentation ``kind`` to a batch ``(B, C, H, W)``."""
    return apply(x, draw(x.shape[0], kind, pad, generator, x.device), pad)
