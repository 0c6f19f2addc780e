"""`compare`: how well one set of scores agrees with another (an estimate with exact patching, two methods).

Per site family: Pearson and Spearman correlation over the cells, and the overlap of the top-k cells by
|effect|, where effect = value − the run's base metric (`meta["base_metric"]`, which `patch`, `atp`, `relp`
and `atp_star` record), so patched metrics and estimates of them compare directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.results import Scores


@dataclass
class Comparison:
    """`table`: one row per family with pearson, spearman, top-k overlap (fraction) and cell count; `pairs`
    the effects being compared, per family (a, b)."""

    table: pd.DataFrame
    pairs: dict[str, tuple[Tensor, Tensor]]
    labels: tuple[str, str]

    def plot(self, path: str | os.PathLike[str]) -> None:
        """A scatter PNG per family (one panel each) of effect b against effect a, with the diagonal."""
        families = list(self.pairs)
        fig = Figure(figsize=(3.6 * len(families), 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        for i, family in enumerate(families):
            ax = fig.add_subplot(1, len(families), i + 1)
            a, b = self.pairs[family]
            ax.scatter(a.numpy(), b.numpy(), s=10, alpha=0.7)
            lo = float(torch.minimum(a.min(), b.min()))
            hi = float(torch.maximum(a.max(), b.max()))
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
            row = self.table.loc[family]
            ax.set_title(f"{family}: r={row['pearson']:.3f}", fontsize=9)
            ax.set_xlabel(f"{self.labels[0]} effect", fontsize=8)
            ax.set_ylabel(f"{self.labels[1]} effect", fontsize=8)
        fig.savefig(os.fspath(path), dpi=110)


def _effects(scores: Scores) -> Tensor:
    base = scores.meta.get("base_metric")
    if base is None:
        raise PathlensError(
            f"compare: the {scores.method} scores have no meta['base_metric']; pass results of patch, atp, relp "
            "or atp_star (or set it)."
        )
    return (scores.values.double() - float(base)).flatten()


def _rank(x: Tensor) -> Tensor:
    return torch.argsort(torch.argsort(x, stable=True), stable=True).double()


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def compare(
    a: Scores | Mapping[str, Scores],
    b: Scores | Mapping[str, Scores],
    k: int = 10,
    labels: tuple[str, str] = ("a", "b"),
) -> Comparison:
    """Agreement of `b` with `a` per site family (a Scores is one family, named by its `meta['sites']`; pass
    {family: Scores} mappings with the same keys for several). Unverified (NaN) cells are left out."""
    first = a if isinstance(a, Mapping) else {str(a.meta.get("sites", "scores")): a}
    second = b if isinstance(b, Mapping) else {str(b.meta.get("sites", "scores")): b}
    if list(first) != list(second):
        raise PathlensError(f"compare: the families differ ({list(first)} vs {list(second)}); pass the same keys.")
    rows, pairs = {}, {}
    for family, left in first.items():
        right = second[family]
        if left.dims != right.dims or left.shape != right.shape:
            raise PathlensError(
                f"compare: {family} has dims {left.dims} {left.shape} vs {right.dims} {right.shape}; compare scores "
                "of the same sites and positions."
            )
        x, y = _effects(left), _effects(right)
        keep = ~(torch.isnan(x) | torch.isnan(y))
        x, y = x[keep], y[keep]
        top = min(k, int(x.numel()))
        overlap = len(set(torch.topk(x.abs(), top).indices.tolist()) & set(torch.topk(y.abs(), top).indices.tolist()))
        rows[family] = {
            "pearson": _pearson(x, y),
            "spearman": _pearson(_rank(x), _rank(y)),
            f"top{k}_overlap": overlap / top if top else float("nan"),
            "cells": int(x.numel()),
        }
        pairs[family] = (x.float(), y.float())
    return Comparison(pd.DataFrame.from_dict(rows, orient="index"), pairs, labels)
