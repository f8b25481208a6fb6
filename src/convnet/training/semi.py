"""Learning from unlabelled images too: FixMatch's consistency (Sohn et al., 2020), with the
moving average of the weights as the teacher.

Every step also draws ``RATIO`` times as many images from the unlabelled pool as the batch
holds. The teacher (the weights' moving average; the model itself without one, or without
``EMA_TEACHER``) labels each pool image seen with light augmentation (the recipe's shifts
and flips; with ``TEACHER_MIRROR``, its mean over the image and its mirror); where its most
probable class reaches that class's threshold (:class:`Adaptive`, FreeMatch's, which follow
the teacher's confidence; ``THRESHOLD`` without ``ADAPTIVE``), the student learns that class
from the same image under strong augmentation (:func:`strong`: larger shifts, a cut-out
square of side ``CUTOUT``, or up to it with ``CUTOUT_RANDOM``, contrast and brightness),
weighted by ``WEIGHT`` against the labelled loss. With ``ALIGN`` the teacher's probabilities
are first aligned with the labels' class shares (:class:`Alignment`). Pool images the
teacher is unsure of add nothing. A run with a pool trains longer (``recipes.POOL_EPOCHS``).

The constants were chosen on validation images only (docs/small-data.md, "Few labels").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convnet.training.augment import flip, translate

THRESHOLD = 0.95  # without ADAPTIVE: the teacher's probability from which a pool image's class is learnt (FixMatch's)
WEIGHT = 1.0  # the unlabelled loss against the labelled one
RATIO = 3  # pool images per labelled image in a step
STRONG_PAD = 4  # largest shift of the strong augmentation, in pixels (28x28 images: a seventh)
CUTOUT = 0.5  # the side of the square cut out, as a share of the image's side
CUTOUT_RANDOM = False  # each square's side drawn uniformly up to CUTOUT instead (FixMatch's range, 0 to 0.5)
ALIGN = True  # distribution alignment of the teacher's probabilities (ReMixMatch's)
ALIGN_MOMENTUM = 0.99  # the running mean of the teacher's probabilities: about the last hundred steps
ADAPTIVE = True  # FreeMatch's self-adaptive thresholds (Adaptive) instead of THRESHOLD
ADAPTIVE_MOMENTUM = 0.99  # their running means: about the last hundred steps, as ALIGN_MOMENTUM
EMA_TEACHER = True  # the weights' moving average labels the pool; False: the model being trained (FixMatch's)
TEACHER_MIRROR = False  # the teacher's probabilities averaged over each pool image and its mirror (where mirrors
# keep the class): one more forward pass of the teacher a step


class Alignment:
    """Distribution alignment (Berthelot et al., 2020, ReMixMatch): the teacher's
    probabilities on pool images, multiplied by the labelled images' class shares and
    divided by the running mean of its own probabilities, renormalised, so that a teacher
    that leans towards a few classes early on does not teach the pool only those.
    Graph-safe: the running mean is updated in place."""

    def __init__(self, labels: torch.Tensor, num_classes: int, device: torch.device) -> None:
        counts = torch.bincount(labels.cpu().long(), minlength=num_classes).float()
        self.prior = (counts / counts.sum()).to(device)
        self.running = self.prior.clone()

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        self.running.mul_(ALIGN_MOMENTUM).add_(probs.mean(dim=0), alpha=1 - ALIGN_MOMENTUM)
        aligned = probs * (self.prior / self.running.clamp_min(1e-6))
        return aligned / aligned.sum(dim=1, keepdim=True)


class Adaptive:
    """FreeMatch's self-adaptive thresholds (Wang et al., 2023): a global threshold, the
    running mean of the teacher's largest probability, scaled per class by the running mean
    of its probabilities over the largest. Graph-safe: updated in place."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.running = torch.full((num_classes + 1,), 1 / num_classes, device=device)  # [global, per class...]

    def __call__(self, probs: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        m = ADAPTIVE_MOMENTUM
        self.running[:1].mul_(m).add_(confidence.mean().view(1), alpha=1 - m)
        self.running[1:].mul_(m).add_(probs.mean(dim=0), alpha=1 - m)
        local = self.running[1:] / self.running[1:].max()
        return self.running[0] * local


@dataclass
class StrongDraws:
    """One pool batch's strong augmentation: shifts ``(U, 2)`` in ``0..2*STRONG_PAD``,
    flips ``(U,)`` (None where mirrors change the class), cut-out corners ``(U, 2)``,
    contrast factors and brightness offsets ``(U,)``, the cut-out squares' sides ``(U,)``; named apart
    from the labelled batch's draws."""

    strong_shifts: torch.Tensor
    strong_flips: torch.Tensor | None
    cutouts: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor
    cutout_sides: torch.Tensor


def draw_strong(batch: int, size: tuple[int, int], hflip: bool, generator: torch.Generator,
                device: torch.device) -> StrongDraws:
    """The random numbers of the strong augmentation for ``batch`` pool images of ``size`` (H, W)."""
    h, w = size
    side = max(1, round(CUTOUT * min(h, w)))
    draws = StrongDraws(
        strong_shifts=torch.randint(0, 2 * STRONG_PAD + 1, (batch, 2), generator=generator, device=device),
        strong_flips=torch.rand(batch, generator=generator, device=device) < 0.5 if hflip else None,
        cutouts=torch.stack([torch.randint(-side // 2, h - side // 2, (batch,), generator=generator, device=device),
                             torch.randint(-side // 2, w - side // 2, (batch,), generator=generator, device=device)],
                            dim=1),
        contrast=torch.empty(batch, device=device).uniform_(0.5, 1.5, generator=generator),
        brightness=torch.empty(batch, device=device).uniform_(-0.25, 0.25, generator=generator),
        cutout_sides=torch.full((batch,), side, device=device),
    )
    if CUTOUT_RANDOM:  # the square's centre anywhere in the image, its side 0 to `side`
        draws.cutout_sides = torch.randint(0, side + 1, (batch,), generator=generator, device=device)
        draws.cutouts = draws.cutouts + side // 2 - draws.cutout_sides.view(batch, 1) // 2
    return draws


def strong(x: torch.Tensor, d: StrongDraws) -> torch.Tensor:
    """Strong augmentation of float images ``(U, C, H, W)`` in [0, 1]: shift, mirror, a
    cut-out square (set to the image's mean), contrast about the mean and brightness."""
    x = translate(x, d.strong_shifts, STRONG_PAD)
    if d.strong_flips is not None:
        x = flip(x, d.strong_flips)
    u, _, h, w = x.shape
    side = d.cutout_sides.view(u, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = d.cutouts[:, 0].view(u, 1, 1), d.cutouts[:, 1].view(u, 1, 1)
    hole = ((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)).unsqueeze(1)  # (U, 1, H, W)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (U, 1, 1, 1)
    x = torch.where(hole, mean, x)
    x = (x - mean) * d.contrast.view(u, 1, 1, 1) + mean + d.brightness.view(u, 1, 1, 1)
    return x.clamp(0, 1)
