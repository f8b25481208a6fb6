"""Progress output that fits where it runs: a live bar with images/s and ETA in a
terminal or notebook, one clean line per epoch in a log file or CI."""

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
    """A bar over ``total`` images; silent where output is not interactive."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self._bar = tqdm(
            total=total, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
            file=stream, disable=not (enabled and is_interactive(stream)), mininterval=0.25,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]",
        )

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
