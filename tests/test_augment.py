from __future__ import annotations

import torch

from convnet.training.augment import Draws, apply, augment, draw


def random_translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    return augment(x, "translate", pad, g)


def random_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return augment(x, "flip", 0, g)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_translate_shifts_by_at_most_pad_and_fills_black() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0  # a square well inside the frame
    out = random_translate(x, 2, _gen())
    assert out.shape == x.shape
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # nothing pushed out of the frame
    for img in out[:, 0]:
        ys, xs = img.nonzero(as_tuple=True)
        assert 8 <= int(ys.min()) <= 12 and 8 <= int(xs.min()) <= 12
    shifted = {(int(img.nonzero()[0, 0]), int(img.nonzero()[0, 1])) for img in out[:, 0]}
    assert len(shifted) > 5, "shifts should vary across the batch"
    edge = torch.ones(4, 1, 28, 28)
    assert (random_translate(edge, 3, _gen()) == 0).any(), "padding must be zeros"


def test_translate_zero_pad_is_identity_and_seeded() -> None:
    x = torch.rand(8, 3, 28, 28)
    assert random_translate(x, 0, _gen()) is x  # nothing drawn, nothing done
    assert torch.equal(random_translate(x, 2, _gen(5)), random_translate(x, 2, _gen(5)))


def test_flip_mirrors_about_half() -> None:
    x = torch.rand(400, 1, 28, 28)
    out = random_flip(x, _gen())
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 140 < int(flipped.sum()) < 260


def test_augment_kinds() -> None:
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(augment(x, "none", 2, _gen()), x)
    assert augment(x, "flip-translate", 2, _gen()).shape == x.shape


def test_draws_then_apply_equals_augment() -> None:
    """The step takes draws as inputs (so a CUDA graph can replay it): drawing and
    applying must give what augmenting at once gives, from the same generator state."""
    x = torch.rand(32, 3, 20, 24)
    d = draw(32, "flip-translate", 3, _gen(7), x.device)
    assert d.shifts is not None and d.shifts.shape == (32, 2) and int(d.shifts.max()) <= 6
    assert d.flips is not None and d.flips.dtype == torch.bool
    assert torch.equal(apply(x, d, 3), augment(x, "flip-translate", 3, _gen(7)))
    assert torch.equal(apply(x, Draws(), 3), x)
    none = draw(32, "none", 3, _gen(7), x.device)
    assert none.shifts is None and none.flips is None
