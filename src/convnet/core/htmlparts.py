"""HTML parts of the report: its style, its load check, escaped tables and embedded images.

Every value put into a page goes through :func:`table` (escaped) or is marked :class:`Raw`
(already HTML); pictures are embedded as base64, so a page needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1f2328; margin: 0 auto; max-width: 1200px; padding: 1.5em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f6f8fa; }
td.better { color: #1a7f37; } td.worse { color: #cf222e; } .muted { color: #59636e; }
.kv td, .kv th { text-align: left; max-width: 60em; overflow-wrap: anywhere; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
.row { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; } .row figure { flex: 1 1 440px; }
"""

# Written by the page itself once it has loaded: how many images decoded (a test reads these).
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(loaded));
  document.body.setAttribute("data-images-total", String(images.length));
});
"""


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if isinstance(c, Raw) else f"<td>{e(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """A table cell already rendered as HTML."""
