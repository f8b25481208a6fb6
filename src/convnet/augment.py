"""Batched data augmentation: a few tensor operations on a whole batch, on its device.

No per-image Python and no DataLoader: a batch of B images is shifted and flipped with
one gather, so augmentation costs little next to the forward pass even on 2 CPU cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "flip", "translate", "flip-translate")


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in x and y, filling with zeros (black).

    Args:
        x: ``(B, C, H, W)`` images, any dtype.
        pad: largest shift in pixels.
        generator: the source of the shifts, on ``x``'s device.
    """
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy  # (B, H, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx  # (B, 1, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def augment(x: torch.Tensor, kind: str, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Apply the augmentation ``kind`` (one of :data:`AUGMENTS`) to a batch."""
    if kind in ("translate", "flip-translate"):
        x = random_translate(x, pad, generator)
    if kind in ("flip", "flip-translate"):
        x = random_flip(x, generator)
    return x
