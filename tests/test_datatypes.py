"""Data set types: batches of a training split, and the input spec as a run records it."""

from __future__ import annotations

import pytest

from convnet.core.errors import RunError
from convnet.data.dataset import InputSpec, batches


def test_batches_cover_everything() -> None:
    assert batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert batches(8, 4) == [slice(0, 4), slice(4, 8)]
    assert batches(10, 4, drop_last=True) == [slice(0, 4), slice(4, 8)]


def test_a_recorded_input_spec_is_checked_field_by_field() -> None:
    good = {"channels": 3, "height": 32, "width": 24, "classes": ["cat", "dog"], "hflip": False}
    assert InputSpec.from_json(good, "config.json") == InputSpec(3, 32, 24, ("cat", "dog"), hflip=False)
    for key, bad in (("channels", 1.0), ("channels", True), ("channels", 2), ("height", 0), ("classes", ["one"]),
                     ("scale", float("nan")), ("hflip", "no")):
        with pytest.raises(RunError, match=f"input.{key}"):
            InputSpec.from_json({**good, key: bad}, "config.json")
