"""Small HTML pieces every report page uses: escaping, short number formatting and tables.

Every piece of text that reaches a page goes through `esc`, so a prompt such as `<script>alert(1)</script>`
shows as text wherever it appears (element content or a quoted attribute value).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

__all__ = ["esc", "fmt", "html_table", "signed"]


def esc(text: Any) -> str:
    """`text` as HTML-escaped text, safe in element content and in quoted attribute values."""
    return html.escape(str(text), quote=True)


def fmt(value: Any) -> str:
    """A value as short plain text: floats to 4 significant digits, lists and dicts compact."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return f"{float(value):.4g}"
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        return fmt(value.item())
    if isinstance(value, Sequence):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def signed(value: float) -> str:
    """A score with its sign, 4 significant digits."""
    return f"{value:+.4g}"


def html_table(header: Sequence[str], rows: Sequence[Sequence[tuple[str, bool]]]) -> str:
    """An HTML table in a horizontally scrolling box; each cell is (already escaped html, is_numeric)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, num in row) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'
