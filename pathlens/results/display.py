"""Notebook display of results: small self-contained HTML pieces (a fact list, a table, a heat grid, a line plot
as inline SVG) that `Scores`, `Graph` and `Curve` assemble in their `_repr_html_`. No scripts, no styles from a
CDN; every piece of text goes through `html.escape`, so a token or label such as "<script>" shows as text."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["diverging_colour", "html_block", "html_table", "line_svg", "provenance"]

_TABLE = "border-collapse:collapse;font:12px monospace;margin:4px 0"
_CELL = "border:1px solid #ddd;padding:1px 6px;text-align:right"

#: meta keys shown as provenance, in this order, when a result has them.
PROVENANCE_KEYS = ("model", "task", "n_prompts", "direction", "ablation", "discovery", "ranked_by", "faithfulness")


def esc(value: Any) -> str:
    """`value` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def provenance(method: str, metric: str, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) pairs saying where a result came from: method, metric, then the known meta keys."""
    facts = [("method", method), ("metric", metric)]
    for key in PROVENANCE_KEYS:
        value = meta.get(key)
        if isinstance(value, float):
            facts.append((key, f"{value:.4g}"))
        elif isinstance(value, (str, int)):
            facts.append((key, str(value)))
    return facts


def html_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], styles: Iterable[str] | None = None) -> str:
    """A compact table; `styles`, one per row, are extra inline CSS for that row's last cell (e.g. a colour)."""
    head = "".join(f'<th style="{_CELL}">{esc(h)}</th>' for h in header)
    body = []
    for row, style in zip(rows, styles if styles is not None else _forever(""), strict=False):
        cells = [f'<td style="{_CELL}">{esc(v)}</td>' for v in row[:-1]]
        cells.append(f'<td style="{_CELL};{style}">{esc(row[-1])}</td>' if row else "")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _forever(item: str) -> Iterable[str]:
    while True:
        yield item


def html_block(title: str, facts: Sequence[tuple[str, str]], *parts: str) -> str:
    """A titled block: the facts as one line of "name: value" pairs, then the given (already escaped) parts."""
    line = " · ".join(f"<b>{esc(k)}</b>: {esc(v)}" for k, v in facts)
    return f'<div style="font:12px sans-serif"><div><b>{esc(title)}</b></div><div>{line}</div>{"".join(parts)}</div>'


def diverging_colour(value: float, largest: float) -> str:
    """CSS background for `value` on a red (+) / blue (−) scale with white at 0, full colour at ±`largest`."""
    if not math.isfinite(value) or largest <= 0:
        return "background:#eee"
    t = min(1.0, abs(value) / largest)
    fade = round(255 * (1 - t))
    return f"background:rgb(255,{fade},{fade})" if value > 0 else f"background:rgb({fade},{fade},255)"


def line_svg(xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str) -> str:
    """A small inline-SVG line plot (log x axis when every x is positive) with a grey line at y = 1."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    log = all(x > 0 for x, _ in points)
    px = [math.log10(x) if log else x for x, _ in points]
    if not points:
        return ""
    w, h, pad = 320, 140, 24
    x0, x1 = min(px), max(px)
    y0, y1 = min(0.0, *(y for _, y in points)), max(1.0, *(y for _, y in points))

    def sx(x: float) -> float:
        return pad + (w - 2 * pad) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def sy(y: float) -> float:
        return h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, (_, y) in zip(px, points, strict=True))
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2"/>' for x, (_, y) in zip(px, points, strict=True))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" style="font:10px sans-serif">'
        f'<line x1="{pad}" x2="{w - pad}" y1="{sy(1.0):.1f}" y2="{sy(1.0):.1f}" stroke="#aaa"/>'
        f'<polyline points="{line}" fill="none" stroke="#2e6da4"/><g fill="#2e6da4">{dots}</g>'
        f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle">{esc(x_label)}{" (log)" if log else ""}</text>'
        f'<text x="4" y="12">{esc(y_label)} ({y0:.2g}..{y1:.2g})</text></svg>'
    )
