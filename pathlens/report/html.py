"""`render_report` / `write_report`: one self-contained HTML page for a circuit study.

The page holds the circuit view, heatmaps of `Scores`, the faithfulness curve, the pathways table, a summary
table and the prompts. It opens offline: styles, drawings (inline SVG) and the one small script are all in the
file, and its Content-Security-Policy forbids loading anything else and running any script but that one (its
hash is in the policy). Every piece of text that comes from the user or the model — title, prompts, token
strings, node, dim and metric names, summary keys and values — is HTML-escaped, so a prompt such as
`<script>alert(1)</script>` shows as text.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import to_hex

from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.report.circuit_view import NEGATIVE, SCRIPT, circuit_section
from pathlens.report.circuit_view import STYLE as CIRCUIT_STYLE
from pathlens.report.markup import esc, fmt, html_table, signed
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.results.plots import colormap

__all__ = ["render_report", "write_report"]

_MAX_LABEL_CHARS = 24
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
_CSP = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{_SCRIPT_HASH}'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 0 1.5rem 3rem; color: #222; background: #fff; }
h1 { font-size: 1.6rem; margin: 1.5rem 0 0.5rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.25rem; }
h3 { font-size: 1rem; margin: 1.4rem 0 0.3rem; }
nav a { margin-right: 1rem; }
.caption { color: #555; font-size: 0.9rem; margin: 0.2rem 0 0.6rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.4rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
ol.prompts li { margin: 0.3rem 0; }
code, .token { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap; }
svg { font-family: inherit; }
svg text { font-size: 11px; fill: #333; }
svg .node { cursor: default; }
"""


def render_report(
    title: str,
    *,
    circuit: Graph | None = None,
    heatmaps: Sequence[tuple[str, Scores]] = (),
    curve: Mapping[str, Any] | None = None,
    pathways: Sequence[Mapping[str, Any]] = (),
    prompts: Sequence[str] = (),
    summary: Mapping[str, Any] | None = None,
) -> str:
    """A complete HTML5 document: the `circuit` view first (`pathlens.report.circuit_view`: nodes by layer sized
    by importance, edges coloured by sign, the `pathways` highlighted, a control for how many edges are drawn,
    the node-level view beside it) with its strongest edges, then the `summary` table, the faithfulness `curve`
    (a `Curve.as_dict()`), the `pathways` (rows of `pathlens.circuits.discover.pathways`), one heatmap per
    (name, `Scores`) of 1 or 2 dims, and the `prompts`. Sections that are not given (or empty) are left out."""
    sections: list[tuple[str, str, str]] = []
    if circuit is not None:
        sections.append(("circuit", "Circuit", circuit_section(circuit, pathways)))
    if summary:
        sections.append(("summary", "Summary", _summary_table(summary)))
    if curve:
        sections.append(("faithfulness", "Faithfulness", _curve_section(curve, circuit)))
    if pathways:
        sections.append(("pathways", "Pathways", _pathways_table(pathways)))
    if heatmaps:
        body = "\n".join(_heatmap_section(i, name, scores) for i, (name, scores) in enumerate(heatmaps))
        sections.append(("heatmaps", "Heatmaps", body))
    if prompts:
        items = "\n".join(f'<li><code class="token">{esc(p)}</code></li>' for p in prompts)
        sections.append(("prompts", f"Prompts ({len(prompts)})", f'<ol class="prompts">\n{items}\n</ol>'))
    nav = " ".join(f'<a href="#{key}">{esc(heading)}</a>' for key, heading, _ in sections)
    body = "\n".join(
        f'<section id="{key}">\n<h2>{esc(heading)}</h2>\n{content}\n</section>' for key, heading, content in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">\n'
        f"<title>{esc(title)}</title>\n<style>{_STYLE}{CIRCUIT_STYLE}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{esc(title)}</h1>\n<nav>{nav}</nav>\n</header>\n"
        f"{body}\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_report(
    path: str | os.PathLike[str],
    title: str,
    *,
    circuit: Graph | None = None,
    heatmaps: Sequence[tuple[str, Scores]] = (),
    curve: Mapping[str, Any] | None = None,
    pathways: Sequence[Mapping[str, Any]] = (),
    prompts: Sequence[str] = (),
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """`render_report(...)` written to `path` as UTF-8, atomically (`pathlens.results.io.write_text`: a
    temporary file, fsynced, then `os.replace`); returns the path."""
    document = render_report(
        title, circuit=circuit, heatmaps=heatmaps, curve=curve, pathways=pathways, prompts=prompts, summary=summary
    )
    return write_text(Path(os.fspath(path)).expanduser(), document)


# ---- text ---------------------------------------------------------------------------------------------


def _token_label(token: str) -> str:
    """A token string as readable text: control characters shown as escapes, whitespace-only tokens quoted."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return repr(token) if not shown.strip() else shown


def _short(text: str) -> str:
    """`text` cut to `_MAX_LABEL_CHARS` characters, with an ellipsis when cut."""
    return text if len(text) <= _MAX_LABEL_CHARS else text[: _MAX_LABEL_CHARS - 1] + "…"


# ---- tables -------------------------------------------------------------------------------------------


def _summary_table(summary: Mapping[str, Any]) -> str:
    """A key / value table."""
    rows = [
        [(esc(key), False), (esc(fmt(value)), isinstance(value, Real) and not isinstance(value, bool))]
        for key, value in summary.items()
    ]
    return html_table(["key", "value"], rows)


def _pathways_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rank, the path's nodes joined by →, its score and its own faithfulness."""
    cells = []
    for row in rows:
        own = row.get("faithfulness")
        cells.append(
            [
                (esc(row.get("rank", "")), True),
                (f'<span class="token">{esc(" → ".join(str(n) for n in row.get("nodes", ())))}</span>', False),
                (esc(fmt(row["score"])) if "score" in row else "", True),
                (esc(fmt(own)) if own is not None else "—", True),
            ]
        )
    caption = (
        '<p class="caption">Top input → logits paths through the circuit; score: product of |edge score| along '
        "the path (exact edge effects: each edge alone patched in the full model); faithfulness: normalized "
        "faithfulness of the circuit made of that path's edges alone.</p>"
    )
    return caption + "\n" + html_table(["rank", "path", "score", "faithfulness"], cells)


# ---- faithfulness curve -------------------------------------------------------------------------------


def _curve_section(curve: Mapping[str, Any], circuit: Graph | None) -> str:
    """Caption and an SVG line chart of normalized faithfulness against edges kept (log x)."""
    sizes = [int(s) for s in curve.get("sizes", [])]
    values = [float(v) for v in curve.get("faithfulness", [])]
    if not sizes or len(sizes) != len(values):
        raise PathlensError("render_report: curve needs equal-length 'sizes' and 'faithfulness' lists.")
    total = int(curve.get("edges_total", max(sizes)))
    parts = [f"{len(sizes)} circuit sizes, 1 to {total} edges (log scale)"]
    if isinstance(curve.get("area"), Real):
        parts.append(f"area under the curve {curve['area']:.3f} (against the fraction of edges kept)")
    marker = circuit.n_edges if circuit is not None and circuit.kept is not None else None
    if marker:
        parts.append(f"dashed line: the circuit ({marker} edges)")
    return f'<p class="caption">{esc(" · ".join(parts))}</p>\n{_curve_svg(sizes, values, total, marker)}'


def _curve_svg(sizes: list[int], values: list[float], total: int, marker: int | None) -> str:
    """The line chart: log x from 1 edge to `total`, y spanning at least 0..1, a dashed line at `marker`."""
    width, height, left, right, top, bottom = 480.0, 260.0, 52.0, 16.0, 14.0, 40.0
    x_max = math.log10(max(total, max(sizes), 2))
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([1.0, *finite])
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def px(size: float) -> float:
        return left + (width - left - right) * math.log10(max(size, 1)) / x_max

    def py(value: float) -> float:
        return top + (height - top - bottom) * (hi - value) / (hi - lo)

    parts = [
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>',
    ]
    for level in (0.0, 1.0):
        parts.append(
            f'<line x1="{left}" y1="{py(level):.1f}" x2="{width - right}" y2="{py(level):.1f}" stroke="#bbb" '
            f'stroke-dasharray="{"" if level else "3 3"}"/>'
            f'<text x="{left - 6}" y="{py(level) + 4:.1f}" text-anchor="end">{level:g}</text>'
        )
    ticks = sorted({10**i for i in range(int(x_max) + 1)} | {total})
    for tick in ticks:
        parts.append(
            f'<line x1="{px(tick):.1f}" y1="{height - bottom}" x2="{px(tick):.1f}" y2="{height - bottom + 4}" '
            f'stroke="#333"/><text x="{px(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick}</text>'
        )
    if marker:
        parts.append(
            f'<line x1="{px(marker):.1f}" y1="{top}" x2="{px(marker):.1f}" y2="{height - bottom}" stroke="#888" '
            'stroke-dasharray="5 3"/>'
        )
    points = [(px(s), py(v), s, v) for s, v in zip(sizes, values, strict=True) if math.isfinite(v)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="{NEGATIVE}" stroke-width="1.8"/>')
    parts += [
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{NEGATIVE}"><title>{s} edges: {v:.4f}</title></circle>'
        for x, y, s, v in points
    ]
    parts.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" text-anchor="middle">edges kept</text>'
        f'<text transform="translate(14,{(top + height - bottom) / 2:.1f}) rotate(-90)" text-anchor="middle">'
        "normalized faithfulness</text>"
    )
    return (
        f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="faithfulness curve">\n'
        + "\n".join(parts)
        + "\n</svg>"
    )


# ---- heatmaps -----------------------------------------------------------------------------------------


def _axis_labels(scores: Scores, dim: str) -> tuple[list[str], list[str]]:
    """(tick labels, tooltip labels) of a dim: token text for "pos" when `pos_labels` is set."""
    coords = [str(c) for c in scores.coords[dim]]
    if dim == "pos" and scores.pos_labels is not None:
        tokens = [_token_label(t) for t in scores.pos_labels]
        return [_short(t) for t in tokens], [f"pos {c} {t!r}" for c, t in zip(coords, scores.pos_labels, strict=True)]
    return [_short(c) for c in coords], [f"{dim} {c}" for c in coords]


def _heatmap_section(index: int, name: str, scores: Scores) -> str:
    """Title, caption (method, metric, dims, model, task) and the SVG grid of one result."""
    if scores.values.ndim not in (1, 2) or scores.values.numel() == 0:
        raise PathlensError(
            f"render_report: heatmap {name!r} has dims {scores.dims} and shape {scores.shape}; a heatmap needs 1 or "
            "2 non-empty dims, reduce it first with .sel() or .sum()."
        )
    meta = [str(scores.meta[k]) for k in ("model", "task") if k in scores.meta]
    caption = " · ".join([scores.method, f"metric {scores.metric}", " × ".join(scores.dims), *meta])
    return (
        f'<h3>{esc(name)}</h3>\n<p class="caption">{esc(caption)}</p>\n'
        f'<div class="scroll">{_heatmap_svg(index, name, scores)}</div>'
    )


def _heatmap_svg(index: int, name: str, scores: Scores) -> str:
    """A grid of cells (rows: dims[0] top to bottom, columns: the last dim) coloured by a diverging map centred
    at 0 with symmetric limits; grey cells are NaN. Each cell's tooltip gives its labels and value."""
    values = scores.values.to(torch.float64).numpy()
    if values.ndim == 1:
        values = values[None, :]
        row_ticks, row_tips = [""], [""]
    else:
        row_ticks, row_tips = _axis_labels(scores, scores.dims[0])
    col_ticks, col_tips = _axis_labels(scores, scores.dims[-1])
    n_rows, n_cols = values.shape
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    colours = colormap()(np.clip(values / limit, -1.0, 1.0) / 2 + 0.5)
    colours[~np.isfinite(values)] = colormap().get_bad()
    cell_w = min(40.0, max(10.0, 640.0 / n_cols))
    cell_h = min(28.0, max(10.0, 320.0 / n_rows))
    rotate = n_cols > 12 or any(len(t) > 3 for t in col_ticks)
    left = 14.0 + 6.5 * max(len(t) for t in row_ticks) + (16.0 if values.shape[0] > 1 else 0.0)
    bottom = (12.0 + 6.0 * max(len(t) for t in col_ticks) if rotate else 20.0) + 18.0
    top, bar = 8.0, 96.0
    grid_w, grid_h = n_cols * cell_w, n_rows * cell_h
    width, height = left + grid_w + bar, top + grid_h + bottom
    col_step = max(1, math.ceil(n_cols / 80))
    row_step = max(1, math.ceil(n_rows / 40))
    parts = []
    for i in range(n_rows):
        for j in range(n_cols):
            where = ", ".join(t for t in (row_tips[i], col_tips[j]) if t)
            value = values[i, j]
            shown = signed(float(value)) if math.isfinite(value) else "nan"
            parts.append(
                f'<rect x="{left + j * cell_w:.1f}" y="{top + i * cell_h:.1f}" width="{cell_w:.1f}" '
                f'height="{cell_h:.1f}" fill="{to_hex(colours[i, j])}"><title>{esc(where)}: {esc(shown)}</title></rect>'
            )
    for i in range(0, n_rows, row_step):
        if row_ticks[i]:
            parts.append(
                f'<text x="{left - 4:.1f}" y="{top + (i + 0.5) * cell_h + 4:.1f}" text-anchor="end" '
                f'xml:space="preserve">{esc(row_ticks[i])}</text>'
            )
    for j in range(0, n_cols, col_step):
        x, y = left + (j + 0.5) * cell_w, top + grid_h + 12
        place = f'transform="translate({x + 4:.1f},{y - 6:.1f}) rotate(-90)" text-anchor="end"'
        if not rotate:
            place = f'x="{x:.1f}" y="{y + 2:.1f}" text-anchor="middle"'
        parts.append(f'<text {place} xml:space="preserve">{esc(col_ticks[j])}</text>')
    if values.shape[0] > 1 and scores.values.ndim == 2:
        parts.append(
            f'<text transform="translate(12,{top + grid_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
            f"{esc(scores.dims[0])}</text>"
        )
    parts.append(
        f'<text x="{left + grid_w / 2:.1f}" y="{height - 4:.1f}" text-anchor="middle">{esc(scores.dims[-1])}</text>'
    )
    parts.append(_colour_bar(f"heat{index}", left + grid_w + 14, top, max(grid_h, 60.0), limit, scores.metric))
    return (
        f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{esc(name)}">\n' + "\n".join(parts) + "\n</svg>"
    )


def _colour_bar(ident: str, x: float, y: float, height: float, limit: float, metric: str) -> str:
    """A vertical colour bar from -limit (bottom) to +limit (top), labelled with the metric."""
    cmap = colormap()
    stops = "".join(f'<stop offset="{k / 10:.1f}" stop-color="{to_hex(cmap(1.0 - k / 10))}"/>' for k in range(11))
    return (
        f'<defs><linearGradient id="{ident}-bar" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>'
        f'<rect x="{x:.1f}" y="{y:.1f}" width="12" height="{height:.1f}" fill="url(#{ident}-bar)" stroke="#999"/>'
        f'<text x="{x + 16:.1f}" y="{y + 9:.1f}">{esc(signed(limit))}</text>'
        f'<text x="{x + 16:.1f}" y="{y + height / 2 + 4:.1f}">0</text>'
        f'<text x="{x + 16:.1f}" y="{y + height:.1f}">{esc(signed(-limit))}</text>'
        f'<text transform="translate({x + 74:.1f},{y + height / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"{esc(_short(metric))}</text>"
    )
