"""Faithfulness of a circuit by exact edge patching (`EdgePatcher`): the normalized score, the curve over
circuit sizes with its area, and a completeness check.

    normalized faithfulness F(C) = (m(C) − m(∅)) / (m(M) − m(∅))

m(C): the metric with every edge outside C patched; m(M): every edge kept (the unpatched run); m(∅): every
edge patched (with interchange ablation, the corrupted run). Every report also states the ablation, the
direction and the metric, since the numbers move with all three (METHODS.md §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.errors import PathlensError
from pathlens.graph import Graph


@dataclass
class Curve:
    """Normalized faithfulness of the top-`size` circuits of a scored graph; `area` is the trapezoid area
    under normalized faithfulness against the fraction of edges kept (0..1)."""

    sizes: list[int]
    faithfulness: list[float]
    metric: list[float]
    full: float
    empty: float
    edges_total: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def area(self) -> float:
        xs = [0.0] + [s / self.edges_total for s in self.sizes] + [1.0]
        ys = [0.0] + self.faithfulness + [1.0]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs, ys = [xs[i] for i in order], [ys[i] for i in order]
        return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))

    def as_dict(self) -> dict[str, Any]:
        return {
            "sizes": self.sizes,
            "faithfulness": self.faithfulness,
            "metric": self.metric,
            "full": self.full,
            "empty": self.empty,
            "area": self.area,
            "edges_total": self.edges_total,
            **self.meta,
        }

    def plot(self, path: Any, title: str = "") -> None:
        """PNG: normalized faithfulness against edges kept (log scale)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.2, 3.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.sizes, self.faithfulness, marker="o", markersize=3)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"edges kept (of {self.edges_total})")
        ax.set_ylabel("normalized faithfulness")
        ax.set_title(title or f"area {self.area:.3f}", fontsize=9)
        fig.savefig(path, dpi=110)


def default_sizes(edges_total: int, count: int = 20) -> list[int]:
    """`count` circuit sizes spaced evenly in log scale from 1 edge to all of them."""
    if edges_total < 1:
        raise PathlensError("the graph has no edges.")
    raw = {max(1, round(math.exp(i * math.log(edges_total) / (count - 1)))) for i in range(count)}
    return sorted(raw)


def top_k_masks(graph: Graph, sizes: list[int], by: str = "abs") -> Tensor:
    """(len(sizes), S, R) kept masks of the top-`size` edges ranked `by` (see `Graph.prune`)."""
    return torch.stack([graph.prune(top_k=size, by=by).in_circuit for size in sizes])  # type: ignore[arg-type]


def _normalized(values: Tensor, full: float, empty: float) -> list[float]:
    span = full - empty
    if abs(span) < 1e-9:
        raise PathlensError(
            f"the metric is the same with every edge kept ({full:.4g}) and with none ({empty:.4g}), so faithfulness "
            "is undefined; choose a task whose clean and corrupted runs differ."
        )
    return [float((v - empty) / span) for v in values]


def with_endpoints(patcher: EdgePatcher, valid: Tensor, kept: list[Tensor]) -> tuple[float, float, Tensor]:
    """(m(M), m(∅), m of each circuit in `kept` (S, R) masks), one batch of rows: the full graph `valid` is one
    more row (no edge patched: the plain run), m(∅) the patcher's source run under interchange ablation or
    one more row (mean / zero)."""
    ends = [valid] if patcher.ablation == "patch" else [valid, torch.zeros_like(valid)]
    values = patcher.metric_of(torch.stack(ends + kept))
    empty = patcher.source_metric if patcher.ablation == "patch" else float(values[1])
    return float(values[0]), empty, values[len(ends) :]


def faithfulness_curve(patcher: EdgePatcher, graph: Graph, sizes: list[int] | None = None, by: str = "abs") -> Curve:
    """Normalized faithfulness of the top-k circuits of `graph` (ranked `by`, see `Graph.prune`) for k in
    `sizes` (default: 20 log-spaced). The circuits and the full graph (m(M)) run as rows of the same batched
    forwards; m(∅) is the patcher's source run (interchange ablation) or one more row (mean / zero); a size
    holding every edge is the full graph."""
    sizes = sizes or default_sizes(graph.edges_total)
    partial = [s for s in sizes if s < graph.edges_total]
    kept = list(top_k_masks(graph, partial, by)) if partial else []
    full, empty, circuits = with_endpoints(patcher, graph.valid, kept)
    measured = dict(zip(partial, circuits.tolist(), strict=True))
    values = [measured.get(s, full) for s in sizes]
    return Curve(
        sizes=sizes,
        faithfulness=_normalized(torch.tensor(values, dtype=torch.float64), full, empty),
        metric=[float(v) for v in values],
        full=full,
        empty=empty,
        edges_total=graph.edges_total,
        meta={"ranked_by": by},
    )


def faithfulness(patcher: EdgePatcher, circuit: Graph) -> float:
    """Normalized faithfulness of `circuit` (its `kept` edges)."""
    full, empty, value = with_endpoints(patcher, circuit.valid, [circuit.in_circuit])
    return _normalized(value, full, empty)[0]


def completeness(patcher: EdgePatcher, circuit: Graph, n_sets: int = 8, seed: int = 0) -> float:
    """Largest gap |F(C∖K) − F(M∖K)| (normalized units) over `n_sets` random sets K of the circuit's senders
    (each sender kept in K with probability 1/2): knocking K out (patching all its outgoing edges) should hurt
    the circuit as much as the whole model if the circuit is complete."""
    senders = sorted({circuit.senders[i] for i in torch.nonzero(circuit.in_circuit)[:, 0].tolist()})
    if not senders:
        raise PathlensError("the circuit has no edges; prune it first.")
    gen = torch.Generator().manual_seed(seed)
    valid, kept = circuit.valid, circuit.in_circuit
    masks = []
    for _ in range(n_sets):
        chosen = [s for s in senders if bool(torch.rand((), generator=gen) < 0.5)] or senders[:1]
        out = torch.zeros_like(valid)
        out[[circuit.senders.index(s) for s in chosen]] = True
        masks += [kept & ~out, valid & ~out]
    full, empty, values = with_endpoints(patcher, valid, masks)
    norm = _normalized(values, full, empty)
    return max(abs(norm[i] - norm[i + 1]) for i in range(0, len(norm), 2))
