"""Progress output that fits where it runs: a live bar with throughput and ETA in a
terminal or notebook (tqdm's auto mode picks the notebook widget there), nothing in a
log file or CI, where each epoch prints its own line instead."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm


def is_interactive(stream: TextIO) -> bool:
    """True in a terminal or a notebook, where a bar redrawn in place reads well."""
    if "ipykernel" in sys.modules:
        return True
    return hasattr(stream, "isatty") and stream.isatty()


class Bar:
    """A bar over ``total`` items (images, or bytes with ``unit="B"``); silent where
    output is not interactive or ``enabled`` is False."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "img", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self._bar = tqdm(
            total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
            leave=False, dynamic_ncols=True, file=stream, disable=not (enabled and is_interactive(stream)),
            mininterval=0.25,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
        )

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
