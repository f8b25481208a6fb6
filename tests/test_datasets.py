"""Batches of a training split: their sizes and what is left over."""

from __future__ import annotations

from convnet.datasets import batches


def test_batches_cover_everything() -> None:
    assert batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batches(8, 4) == [slice(0, 4), slice(4, 8)]
    assert batches(10, 4, drop_last=True) == [slice(0, 4), slice(4, 8)]
