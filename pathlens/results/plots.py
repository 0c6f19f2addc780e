"""PNG pictures of results: the heatmap or bar chart of a `Scores`, and the colours every picture shares.

One colour convention for every method: a diverging map centred at 0 with symmetric limits, so white means "no
effect" and red / blue the sign; NaN cells are grey. `colormap()` is that map, used here and by the HTML report.
Figures are built on matplotlib's object API (a `Figure` with an Agg canvas), never through pyplot, so plotting
opens no window and changes no global backend.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

from pathlens.errors import PathlensError

if TYPE_CHECKING:
    from pathlens.results.scores import Scores

__all__ = ["colormap", "plot_scores"]

_MAX_TICKS = 40
"""At most this many tick labels per plot axis; longer axes show every n-th label."""

_CMAP = "RdBu_r"


def colormap() -> Colormap:
    """The diverging colour map shared by heatmaps, bars and the HTML report; NaN cells are grey."""
    return colormaps[_CMAP].with_extremes(bad="0.8")


def plot_scores(
    scores: Scores,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Draw `scores`: a heatmap for 2 dims, a bar chart for 1 dim. Returns the Figure (see `Scores.plot`).

    2-D: rows are `dims[0]`, columns `dims[1]`, tick labels come from the coords (token text for "pos" when
    `pos_labels` is set), and the colourbar is labelled with the metric. Draws into `ax` when given, else into
    a new Figure. When `path` is given the figure is also written there, as PNG unless the path's extension
    names another format.
    """
    if scores.values.ndim not in (1, 2):
        if scores.values.ndim == 0:
            raise PathlensError(f"plot(): this result is one value ({scores.values.item():.6g}); print it instead.")
        raise PathlensError(
            f"plot() draws 1 or 2 dims, this result has {len(scores.dims)} {scores.dims}; reduce it first, e.g. "
            f".sel({scores.dims[-1]}={scores.coords[scores.dims[-1]][0]!r}) or .sum({scores.dims[-1]!r})."
        )
    if scores.values.numel() == 0:
        raise PathlensError(f"plot(): nothing to draw, shape is {scores.shape}.")
    values = scores.values.to(torch.float64).numpy()
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = Normalize(vmin=-limit, vmax=limit)
    if ax is None:
        fig = Figure(figsize=_figsize(scores.shape), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    else:
        owner = ax.get_figure(root=True)
        if owner is None:
            raise PathlensError("plot(ax=...): these axes belong to no figure; create them with fig.add_subplot().")
        fig = owner
    cmap = colormap()
    metric = _plain(scores.metric)
    if values.ndim == 2:
        image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label=metric)
        _ticks(ax, "y", _tick_labels(scores, scores.dims[0]))
        _ticks(ax, "x", _tick_labels(scores, scores.dims[1]))
        ax.set_ylabel(_plain(scores.dims[0]))
    else:
        positions = np.arange(values.size)
        ax.bar(positions, values, color=cmap(norm(values)), edgecolor="0.3", linewidth=0.5)
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.set_xlim(-0.6, values.size - 0.4)
        _ticks(ax, "x", _tick_labels(scores, scores.dims[0]))
        ax.set_ylabel(metric)
    ax.set_xlabel(_plain(scores.dims[-1]))
    ax.set_title(title if title is not None else _default_title(scores))
    if path is not None:
        fig.savefig(os.fspath(path), dpi=150)
    return fig


def _tick_labels(scores: Scores, dim: str) -> list[str]:
    """Tick labels of `dim`: its coords, or the token text of each position for "pos" with `pos_labels`."""
    if dim == "pos" and scores.pos_labels is not None:
        return [_token_text(t) for t in scores.pos_labels]
    return [_plain(str(c)) for c in scores.coords[dim]]


def _ticks(ax: Axes, axis: str, labels: list[str]) -> None:
    """Set the tick labels of one plot axis, thinned to at most `_MAX_TICKS`; long x labels turn vertical."""
    step = max(1, math.ceil(len(labels) / _MAX_TICKS))
    positions = list(range(0, len(labels), step))
    shown = [labels[i] for i in positions]
    if axis == "x":
        rotate = any(len(s) > 3 for s in shown) or len(shown) > 20
        ax.set_xticks(positions, shown, rotation=90 if rotate else 0)
    else:
        ax.set_yticks(positions, shown)


def _figsize(shape: tuple[int, ...]) -> tuple[float, float]:
    """Figure size in inches that keeps cells and tick labels readable for a result of this shape."""
    if len(shape) == 2:
        rows, cols = shape
        return (
            min(16.0, max(5.0, 0.35 * min(cols, 2 * _MAX_TICKS) + 3.0)),
            min(12.0, max(3.5, 0.3 * min(rows, 2 * _MAX_TICKS) + 2.0)),
        )
    return (min(16.0, max(5.0, 0.3 * min(shape[0], 2 * _MAX_TICKS) + 2.0)), 4.0)


def _default_title(scores: Scores) -> str:
    """Method and metric, plus the model and task from `meta` when recorded."""
    parts = [scores.method, scores.metric] + [str(scores.meta[k]) for k in ("model", "task") if k in scores.meta]
    return _plain(" · ".join(parts))


def _plain(text: str) -> str:
    """`text` with "$" escaped so matplotlib shows it literally instead of parsing math."""
    return text.replace("$", r"\$")


def _token_text(token: str) -> str:
    """A token as a readable tick label: control characters escaped, whitespace-only tokens quoted."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not shown.strip():
        shown = repr(token)
    return _plain(shown)
