"""The ending the single-process probes share: their rows written as JSON with the CPU and threads, and both printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from convnet.models.engine import cpu_info


def write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` to ``out`` as ``{"cpu", "threads", "rows"}``, and the CPU's name, flags and threads printed."""
    info = cpu_info()
    out.write_text(json.dumps({"cpu": info, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"CPU: {info}; {torch.get_num_threads()} threads")
