"""`Scores`: the one result type every pathlens method returns.

Activation patching, attribution patching, ablations and every later method hand back the same thing: a float
tensor whose axes carry names ("layer", "head", "pos", "site", ...) and whose cells carry labels (layer 3,
head 7, position 5 / token " Mary", site "blocks.3.attn"). A user who has learned to read one method's output
reads every other method's the same way: `.top(k)` for the strongest cells, `.to_frame()` for pandas, `.plot()`
for a heatmap, `.corr()` to compare two methods cell by cell, and `.save()` / `.load()` to keep the result.

Saved results are two plain files: `<name>.safetensors` holds only the values and `<name>.json` holds the
labels and provenance (written atomically by `pathlens.results.io`). Nothing is pickled, so loading a result
never runs code. Pictures are drawn by `pathlens.results.plots`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pathlens.errors import PathlensError
from pathlens.results.display import diverging_colour, esc, html_block, html_table, provenance
from pathlens.results.io import load_pair, save_pair
from pathlens.results.plots import plot_scores

__all__ = ["Scores"]

_FORMAT_NAME = "pathlens.Scores"
_HEADER_KEYS = ("dims", "coords", "metric", "method", "meta", "pos_labels", "values_sha256")
_RESERVED_DIMS = ("value", "pos_label")
_REPR_TOP = 5
_HTML_TOP = 10
_HTML_GRID_MAX = 48  # 2-D results up to this many cells a side are drawn as a heat grid in notebooks


@dataclass(eq=False, repr=False)
class Scores:
    """A float tensor with named dims and labelled cells, plus what produced it.

    Attributes:
        values: float tensor of shape `tuple(len(coords[d]) for d in dims)`; one score per cell. Stored
            detached and on the CPU, so a result never holds on to an autograd graph or GPU memory.
        dims: dim names in axis order, e.g. ("layer", "head") or ("layer", "pos") or ("site",).
        coords: labels of every dim's cells, `coords[d][i]` labelling index i of axis `dims.index(d)`.
            Labels are ints (layer, head, neuron, pos) or strings (site names); within one dim they are
            unique and all of one kind, so `.sel(layer=3)` is unambiguous.
        metric: what a value measures, e.g. "logit_diff".
        method: what computed the values, e.g. "patch:denoise", "atp", "relp".
        meta: JSON-serializable extras (model, task, seed, baselines, ...) saved alongside the values. Tuples
            become lists and 0-d tensors / numpy scalars become Python numbers, so a saved result loads back
            equal.
        pos_labels: optional token text of each "pos" cell (same length as `coords["pos"]`), shown in plots
            and tables; only allowed when "pos" is a dim.
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    coords: dict[str, list]
    metric: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    pos_labels: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.values, torch.Tensor):
            raise PathlensError(
                f"Scores.values must be a torch.Tensor, got {type(self.values).__name__}; wrap it with "
                "torch.as_tensor(..., dtype=torch.float32)."
            )
        if not self.values.is_floating_point():
            raise PathlensError(
                f"Scores.values must be a float tensor, got dtype {self.values.dtype}; convert it with .float()."
            )
        self.values = self.values.detach().cpu()
        self.dims = _check_dims(self.dims, self.values)
        self.coords = _check_coords(self.coords, self.dims, self.values)
        for name in ("metric", "method"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise PathlensError(
                    f"Scores.{name} must be a non-empty string, got {getattr(self, name)!r}; e.g. "
                    + ("metric='logit_diff'." if name == "metric" else "method='patch:denoise'.")
                )
        if not isinstance(self.meta, dict):
            raise PathlensError(f"Scores.meta must be a dict, got {type(self.meta).__name__}.")
        self.meta = _jsonable(self.meta, "meta")
        self.pos_labels = _check_pos_labels(self.pos_labels, self.dims, self.coords)

    @property
    def shape(self) -> tuple[int, ...]:
        """Sizes of the dims, in `dims` order."""
        return tuple(self.values.shape)

    def to_frame(self) -> pd.DataFrame:
        """All cells as a long-form DataFrame, one row per cell in row-major (C) order.

        Columns: one per dim holding the cell's label, then "pos_label" right after "pos" when `pos_labels`
        is set, then "value" (float64, exact for every float dtype torch stores).
        """
        return self._frame(np.arange(self.values.numel()))

    def top(self, k: int = 10, by: Literal["abs", "value", "neg"] = "abs") -> pd.DataFrame:
        """The k strongest cells as a DataFrame with the columns of `to_frame()`, strongest first.

        by="abs" ranks by |value| (largest effect either way), "value" by value descending (most positive
        first), "neg" by value ascending (most negative first). Ties keep row-major order; NaN cells come
        last. Returns fewer than k rows when there are fewer cells.
        """
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise PathlensError(f"top(k=...) needs a positive int, got {k!r}.")
        return self._frame(self._order(by)[: int(k)])

    def with_values(self, values: torch.Tensor, method: str | None = None) -> Scores:
        """The same labels with new values of the same shape (e.g. effects = patched − baseline)."""
        return Scores(
            values=values,
            dims=self.dims,
            coords=self.coords,
            metric=self.metric,
            method=method or self.method,
            meta=self.meta,
            pos_labels=self.pos_labels,
        )

    def sel(self, **labels: Any) -> Scores:
        """Select cells by label: `sel(layer=3)` drops "layer"; `sel(layer=[3, 5])` keeps it with two cells.

        Several dims can be selected at once (`sel(layer=9, head=[6, 9])`). Labels are the coords, not
        indices. Selecting a single "pos" drops `pos_labels`; selecting a list of them keeps theirs.
        """
        values = self.values
        coords = dict(self.coords)
        pos_labels = self.pos_labels
        dropped: list[str] = []
        for dim, wanted in labels.items():
            if dim not in self.dims:
                raise PathlensError(f"sel(): no dim {dim!r}; this result has dims {self.dims}.")
            if isinstance(wanted, (np.ndarray, torch.Tensor)):
                wanted = wanted.tolist()
            keep = isinstance(wanted, Sequence) and not isinstance(wanted, str)
            positions = {(type(c), c): i for i, c in enumerate(self.coords[dim])}
            index = [self._index_of(dim, label, positions) for label in (wanted if keep else [wanted])]
            axis = self.dims.index(dim)
            values = values.index_select(axis, torch.tensor(index, dtype=torch.long))
            coords[dim] = [self.coords[dim][i] for i in index]
            if dim == "pos" and pos_labels is not None:
                pos_labels = [pos_labels[i] for i in index] if keep else None
            if not keep:
                dropped.append(dim)
        dims = tuple(d for d in self.dims if d not in dropped)
        return Scores(
            values=values.reshape([len(coords[d]) for d in dims]),
            dims=dims,
            coords={d: coords[d] for d in dims},
            metric=self.metric,
            method=self.method,
            meta=dict(self.meta),
            pos_labels=pos_labels,
        )

    def sum(self, dim: str | Sequence[str]) -> Scores:
        """Sum over one dim (or several), dropping it, e.g. per-layer totals of ("layer", "head") scores.

        Meaningful when scores add up (attribution, per-component direct effects); patching effects of single
        components generally do not add up to the effect of patching them together.
        """
        return self._reduce(dim, torch.sum, "sum")

    def mean(self, dim: str | Sequence[str]) -> Scores:
        """Average over one dim (or several), dropping it, e.g. mean effect per layer over heads."""
        return self._reduce(dim, torch.mean, "mean")

    def corr(self, other: Scores, method: Literal["pearson", "spearman"] = "pearson") -> float:
        """Correlation between two results over matching cells, e.g. attribution vs. activation patching.

        Both must have the same dims in the same order and the same coords, so cell i of one is cell i of
        the other. "pearson" correlates the values; "spearman" correlates their ranks, with tied values
        sharing the average of their ranks. Raises when a correlation is undefined (fewer than two cells, a
        constant result, or NaN values) rather than returning NaN silently.
        """
        if not isinstance(other, Scores):
            raise PathlensError(f"corr() needs another Scores, got {type(other).__name__}.")
        if method not in ("pearson", "spearman"):
            raise PathlensError(f"corr(method=...) must be 'pearson' or 'spearman', got {method!r}.")
        _require_same_cells([self, other], "corr()")
        x = self.values.to(torch.float64).flatten().numpy()
        y = other.values.to(torch.float64).flatten().numpy()
        if x.size < 2:
            raise PathlensError(f"corr() needs at least 2 cells, these results have {x.size}.")
        for name, arr, scores in (("self", x, self), ("other", y, other)):
            if np.isnan(arr).any():
                cell = scores._frame(np.flatnonzero(np.isnan(arr))[:1]).iloc[0].to_dict()
                raise PathlensError(
                    f"corr(): {name} ({scores.method}) has NaN values, first at {cell}; drop those cells with "
                    ".sel() before correlating."
                )
        if method == "spearman":
            x, y = _average_ranks(x), _average_ranks(y)
        elif not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise PathlensError("corr(): Pearson correlation is undefined with infinite values; use method='spearman'.")
        unit_x, unit_y = _unit_centered(x), _unit_centered(y)
        if unit_x is None or unit_y is None:
            constant = self if unit_x is None else other
            raise PathlensError(
                f"corr(): the {constant.method!r} result is constant over all cells, so its correlation is "
                "undefined; check that the method actually changed the metric."
            )
        return max(-1.0, min(1.0, float(unit_x @ unit_y)))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (the values only) and `<path>.json` (everything else).

        `path` may end in ".safetensors" or ".json" or have neither; missing parent folders are created.
        Both are written atomically (`pathlens.results.io`), so a reader never sees a half-written file, and a
        save that fails leaves an earlier save in place. The JSON records a SHA-256 of the tensor file, so
        `load` detects a pair of files that come from different saves.
        """
        header = {
            "dims": list(self.dims),
            "coords": self.coords,
            "metric": self.metric,
            "method": self.method,
            "meta": self.meta,
            "pos_labels": self.pos_labels,
            "dtype": str(self.values.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        save_pair(path, _FORMAT_NAME, {"values": self.values.contiguous()}, header)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Scores:
        """Read a result written by `save`; values come back bit-identical. `path` as in `save`."""
        tensors, header = load_pair(path, _FORMAT_NAME, ("values",), _HEADER_KEYS)
        return Scores(
            values=tensors["values"],
            dims=tuple(header["dims"]),
            coords=header["coords"],
            metric=header["metric"],
            method=header["method"],
            meta=header["meta"],
            pos_labels=header["pos_labels"],
        )

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        title: str | None = None,
        ax: Axes | None = None,
    ) -> Figure:
        """Draw the result: a heatmap for 2 dims, a bar chart for 1 dim. Returns the Figure.

        Colours use a diverging map centred at 0 with symmetric limits, so white means "no effect" and red /
        blue the sign, for every method alike. 2-D: rows are `dims[0]`, columns `dims[1]`, tick labels come
        from the coords (token text for "pos" when `pos_labels` is set), and the colourbar is labelled with
        the metric. Draws into `ax` when given, else into a new Figure that is not registered with pyplot
        (nothing pops up and no global backend changes). When `path` is given the figure is also written
        there, as PNG unless the path's extension names another format.
        """
        return plot_scores(self, path, title, ax)

    def __repr__(self) -> str:
        shape = " x ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape, strict=True)) or "scalar"
        lines = [f"Scores({shape}, method={self.method!r}, metric={self.metric!r}, dtype={self.values.dtype})"]
        origin = provenance(self.method, self.metric, self.meta)[2:]
        if origin:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in origin))
        if self.values.numel():
            lines.append(f"  top {min(_REPR_TOP, self.values.numel())} by |value|:")
            for cell in self.top(_REPR_TOP).to_dict("records"):
                value = cell.pop("value")
                label = cell.pop("pos_label", None)
                where = " ".join(f"{d}={v!r}" for d, v in cell.items())
                if label is not None:
                    where += f" ({label!r})"
                lines.append(f"    {where or '()'}: {value:+.4g}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Jupyter view: dims and provenance, a heat grid of the values when 2-D and small (else nothing), and
        the top cells by |value| as a table; every label escaped."""
        shape = " × ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape, strict=True)) or "scalar"
        facts = provenance(self.method, self.metric, self.meta)
        parts = [self._heat_grid()] if len(self.dims) == 2 and max(self.shape) <= _HTML_GRID_MAX else []
        if self.values.numel():
            top = self.top(_HTML_TOP)
            largest = float(self.values.abs().nan_to_num(0.0).max())
            parts.append(
                html_table(
                    list(top.columns),
                    top.to_numpy().tolist(),
                    (diverging_colour(float(v), largest) for v in top["value"]),
                )
            )
        return html_block(f"Scores ({shape})", facts, *parts)

    def _heat_grid(self) -> str:
        """The 2-D values as a table of coloured cells (rows: dims[0], columns: dims[1]), hover shows the value."""
        rows_dim, cols_dim = self.dims
        values = self.values.to(torch.float64)
        largest = float(values.abs().nan_to_num(0.0).max())
        col_labels = self.pos_labels if cols_dim == "pos" and self.pos_labels is not None else self.coords[cols_dim]
        head = "".join(f'<th style="font-weight:normal;padding:0 2px">{esc(c)}</th>' for c in col_labels)
        body = []
        for i, row_label in enumerate(self.coords[rows_dim]):
            cells = "".join(
                f'<td title="{esc(f"{v:+.4g}")}" style="width:14px;height:14px;{diverging_colour(v, largest)}"></td>'
                for v in values[i].tolist()
            )
            body.append(f'<tr><th style="font-weight:normal;padding:0 4px">{esc(row_label)}</th>{cells}</tr>')
        corner = f"{esc(rows_dim)} \\ {esc(cols_dim)}"
        return (
            f'<table style="border-collapse:collapse;font:10px monospace;margin:4px 0"><thead><tr><th>{corner}</th>'
            f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )

    @staticmethod
    def stack(scores: Sequence[Scores], dim: str, coords: Sequence[Any]) -> Scores:
        """Stack results with identical dims/coords along a new leading dim, e.g. one per task or seed.

        All parts need the same dims, coords, metric and method. `meta` keeps the items shared by every part
        and lists the rest per part under "stacked_meta"; `pos_labels` are kept only if all parts agree.
        """
        parts = list(scores)
        if not parts:
            raise PathlensError("Scores.stack needs at least one Scores.")
        for i, part in enumerate(parts):
            if not isinstance(part, Scores):
                raise PathlensError(f"Scores.stack: item {i} is a {type(part).__name__}, not a Scores.")
        _require_same_cells(parts, "Scores.stack")
        for attr in ("metric", "method"):
            found = sorted({getattr(p, attr) for p in parts})
            if len(found) > 1:
                raise PathlensError(
                    f"Scores.stack: parts differ in {attr} ({found}); only stack results of one {attr}, and "
                    "compare different ones with .corr()."
                )
        if dim in parts[0].dims:
            raise PathlensError(f"Scores.stack: dim {dim!r} already exists in {parts[0].dims}; pick a new name.")
        common = {k: v for k, v in parts[0].meta.items() if all(k in p.meta and p.meta[k] == v for p in parts)}
        meta = dict(common)
        if any(p.meta != common for p in parts):
            meta["stacked_meta"] = [{k: v for k, v in p.meta.items() if k not in common} for p in parts]
        first_labels = parts[0].pos_labels
        stacked_coords: dict[str, Any] = {dim: coords, **parts[0].coords}  # validated by Scores, like any coords
        return Scores(
            values=torch.stack([p.values for p in parts]),
            dims=(dim, *parts[0].dims),
            coords=stacked_coords,
            metric=parts[0].metric,
            method=parts[0].method,
            meta=meta,
            pos_labels=first_labels if all(p.pos_labels == first_labels for p in parts) else None,
        )

    def _index_of(self, dim: str, label: Any, positions: dict[tuple[type, int | str], int]) -> int:
        """Index of `label` in `coords[dim]` via `positions` ((type, label) -> index, so 1 never matches "1").

        Raises listing the available labels when `label` is not one of them.
        """
        if isinstance(label, Integral) and not isinstance(label, (bool, np.bool_)):
            label = int(label)
        if type(label) in (int, str) and (type(label), label) in positions:
            return positions[(type(label), label)]
        shown = self.coords[dim][:20]
        more = f" ... ({len(self.coords[dim])} in all)" if len(self.coords[dim]) > 20 else ""
        raise PathlensError(f"sel(): {dim}={label!r} is not a label of {dim!r}; labels are {shown}{more}.")

    def _reduce(self, dim: str | Sequence[str], op: Callable[..., torch.Tensor], name: str) -> Scores:
        """Apply `op` (torch.sum / torch.mean) over the named dims and drop them."""
        names = [dim] if isinstance(dim, str) else list(dim)
        for d in names:
            if d not in self.dims:
                raise PathlensError(f"{name}(): no dim {d!r}; this result has dims {self.dims}.")
        if len(set(names)) != len(names) or not names:
            raise PathlensError(f"{name}() needs one or more distinct dims, got {names}.")
        axes = [self.dims.index(d) for d in names]
        dims = tuple(d for d in self.dims if d not in names)
        return Scores(
            values=op(self.values, dim=axes),
            dims=dims,
            coords={d: self.coords[d] for d in dims},
            metric=self.metric,
            method=self.method,
            meta=dict(self.meta),
            pos_labels=self.pos_labels if "pos" in dims else None,
        )

    def _order(self, by: str) -> np.ndarray:
        """Flat cell indices sorted strongest first for `top(by=...)`; stable, NaN last."""
        flat = self.values.to(torch.float64).flatten().numpy()
        if by == "abs":
            key = -np.abs(flat)
        elif by == "value":
            key = -flat
        elif by == "neg":
            key = flat
        else:
            raise PathlensError(f"top(by=...) must be 'abs', 'value' or 'neg', got {by!r}.")
        return np.argsort(key, kind="stable")

    def _frame(self, flat: np.ndarray) -> pd.DataFrame:
        """DataFrame of the cells at row-major flat indices `flat`, in that order."""
        flat = np.asarray(flat, dtype=np.int64)
        index = np.unravel_index(flat, self.shape) if self.dims else ()
        columns: dict[str, Any] = {}
        for axis, dim in enumerate(self.dims):
            labels = self.coords[dim]
            if labels and isinstance(labels[0], int):
                columns[dim] = np.asarray(labels, dtype=np.int64)[index[axis]]
            else:
                columns[dim] = [labels[i] for i in index[axis]]
            if dim == "pos" and self.pos_labels is not None:
                columns["pos_label"] = [self.pos_labels[i] for i in index[axis]]
        columns["value"] = self.values.to(torch.float64).flatten().numpy()[flat]
        return pd.DataFrame(columns)


def _check_dims(dims: Any, values: torch.Tensor) -> tuple[str, ...]:
    """Validate dim names against `values`; returns them as a tuple."""
    if isinstance(dims, str) or not isinstance(dims, Sequence):
        raise PathlensError(f"Scores.dims must be a tuple of names, got {dims!r}; e.g. dims=('layer', 'head').")
    dims = tuple(dims)
    for d in dims:
        if not isinstance(d, str) or not d:
            raise PathlensError(f"Scores.dims must be non-empty strings, got {d!r} in {dims}.")
        if d in _RESERVED_DIMS:
            raise PathlensError(f"Scores.dims: {d!r} is reserved for a DataFrame column; rename the dim.")
    duplicated = sorted({d for d in dims if dims.count(d) > 1})
    if duplicated:
        raise PathlensError(f"Scores.dims must be unique, {duplicated} repeat in {dims}; give each axis its own name.")
    if values.ndim != len(dims):
        raise PathlensError(
            f"Scores.values has {values.ndim} axes (shape {tuple(values.shape)}) but dims names {len(dims)}: "
            f"{dims}; give one name per axis."
        )
    return dims


def _check_coords(coords: Any, dims: tuple[str, ...], values: torch.Tensor) -> dict[str, list]:
    """Validate and normalize the labels of every dim; returns a fresh dict in `dims` order."""
    if not isinstance(coords, dict):
        raise PathlensError(f"Scores.coords must be a dict of dim -> labels, got {type(coords).__name__}.")
    missing = [d for d in dims if d not in coords]
    extra = [k for k in coords if k not in dims]
    if missing or extra:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise PathlensError(f"Scores.coords must have exactly one entry per dim {dims}: {'; '.join(problems)}.")
    checked: dict[str, list] = {}
    for axis, dim in enumerate(dims):
        raw = coords[dim]
        if isinstance(raw, (torch.Tensor, np.ndarray)):
            raw = raw.tolist()
        if isinstance(raw, str) or not isinstance(raw, (Sequence, range)):
            raise PathlensError(f"Scores.coords[{dim!r}] must be a list of labels, got {raw!r}.")
        labels = [_normalize_label(x, f"coords[{dim!r}]") for x in raw]
        if len(labels) != values.shape[axis]:
            raise PathlensError(
                f"Scores.coords[{dim!r}] has {len(labels)} labels but axis {axis} ({dim!r}) of values has size "
                f"{values.shape[axis]} (shape {tuple(values.shape)}); give one label per cell."
            )
        if len({type(x) for x in labels}) > 1:
            raise PathlensError(f"Scores.coords[{dim!r}] mixes ints and strings; use one kind of label per dim.")
        if len(set(labels)) != len(labels):
            repeated = sorted({x for x in labels if labels.count(x) > 1})[:10]
            raise PathlensError(
                f"Scores.coords[{dim!r}] has repeated labels {repeated}; labels must be unique so .sel() is "
                "unambiguous (put token text in pos_labels, not in coords)."
            )
        checked[dim] = labels
    return checked


def _check_pos_labels(pos_labels: Any, dims: tuple[str, ...], coords: dict[str, list]) -> list[str] | None:
    """Validate the optional token text of the "pos" dim."""
    if pos_labels is None:
        return None
    if "pos" not in dims:
        raise PathlensError(f"Scores.pos_labels given but there is no 'pos' dim in {dims}; drop pos_labels.")
    if isinstance(pos_labels, str) or not isinstance(pos_labels, Sequence):
        raise PathlensError(f"Scores.pos_labels must be a list of strings, got {type(pos_labels).__name__}.")
    labels = list(pos_labels)
    if not all(isinstance(t, str) for t in labels):
        raise PathlensError("Scores.pos_labels must all be strings (the token text of each position).")
    if len(labels) != len(coords["pos"]):
        raise PathlensError(
            f"Scores.pos_labels has {len(labels)} entries but 'pos' has {len(coords['pos'])} cells; give one "
            "token string per position."
        )
    return labels


def _normalize_label(label: Any, where: str = "label") -> int | str:
    """A coordinate label as a plain int or str (numpy ints become int); anything else is refused."""
    if isinstance(label, str):
        return label
    if isinstance(label, Integral) and not isinstance(label, (bool, np.bool_)):
        return int(label)
    raise PathlensError(f"Scores.{where}: label {label!r} ({type(label).__name__}) must be an int or a string.")


def _jsonable(obj: Any, where: str) -> Any:
    """`obj` converted to plain JSON types (tuples -> lists, numpy / 0-d tensor scalars -> numbers).

    Raises naming the offending entry, so a result fails when built rather than later when saved.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Integral):
        return int(obj)
    if isinstance(obj, Real):
        return float(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray)) and obj.ndim == 0:
        return _jsonable(obj.item(), where)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise PathlensError(f"Scores.{where} key {key!r} must be a string (JSON keys are strings).")
            out[key] = _jsonable(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise PathlensError(
        f"Scores.{where} is a {type(obj).__name__}, which cannot be saved as JSON; store a plain value instead "
        "(e.g. tensor.tolist(), str(obj))."
    )


def _require_same_cells(parts: Sequence[Scores], caller: str) -> None:
    """Raise unless all results have the same dims and coords, naming each dim that differs."""
    first = parts[0]
    for i, other in enumerate(parts[1:], start=1):
        who = "the two results" if len(parts) == 2 else f"part 0 and part {i}"
        if other.dims != first.dims:
            raise PathlensError(
                f"{caller}: {who} have different dims: {first.dims} vs {other.dims}; they must match in order "
                "(use .sel()/.sum() to bring them to the same dims)."
            )
        differences = []
        for dim in first.dims:
            a, b = first.coords[dim], other.coords[dim]
            if a != b:
                if len(a) != len(b):
                    differences.append(f"{dim!r} has {len(a)} vs {len(b)} labels")
                else:
                    j = next(j for j in range(len(a)) if a[j] != b[j])
                    differences.append(f"{dim!r} differs at index {j}: {a[j]!r} vs {b[j]!r}")
        if differences:
            raise PathlensError(
                f"{caller}: {who} have different coords: "
                + "; ".join(differences)
                + "; select the shared labels with .sel() first."
            )


def _unit_centered(x: np.ndarray) -> np.ndarray | None:
    """`x` minus its mean, scaled to unit length (rescaled first so huge values cannot overflow); None if constant."""
    centered = x - x.mean()
    scale = np.abs(centered).max()
    if scale == 0.0:
        return None
    centered = centered / scale
    return centered / math.sqrt(float(centered @ centered))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` where tied values all get the mean of the ranks they span (e.g. [1, 2.5, 2.5, 4])."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.empty(x.size, dtype=bool)
    starts_group[0] = True
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], x.size)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[group]
    return ranks
