"""Faithfulness of a circuit by exact edge patching (`EdgePatcher`): the normalized score, the curve over
circuit sizes with its area, and a completeness check.

    normalized faithfulness F(C) = (m(C) − m(∅)) / (m(M) − m(∅))

m(C): the metric with every edge outside C patched; m(M): every edge kept (the unpatched run); m(∅): every
edge patched (with interchange ablation, the corrupted run). Every report also states the ablation, the
direction and the metric, since the numbers move with all three (METHODS.md §8).

The curve's summaries: `area`, the trapezoid area under F against the fraction of edges kept with the ends
pinned at (0, 0) and (1, 1); and MIB's two (Mechanistic Interpretability Benchmark, circuit track), over the
curve's own points only, on a linear fraction axis, by the trapezoid rule — CPR, the area under F (higher is
better), and CMD, the area under |1 − F| (lower is better). `faithfulness_curve(..., sizes="mib")` measures F at
MIB's fractions (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 % of the graph's edges, each rounded down to an edge
count as MIB does), where CPR and CMD are MIB's numbers: a curve at F = 1 throughout scores CPR 0.999 and CMD 0
there, since the axis runs from 0.001 to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.edge_work import metric_of
from pathlens.circuits.mib import MIB_FRACTIONS, mib_sizes
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.patching.executor import Executor, resolved_executor
from pathlens.results.display import html_block, html_table, line_svg


@dataclass
class Curve:
    """Normalized faithfulness of the top-`size` circuits of a scored graph, with its summaries (module
    docstring): `area` (ends pinned at 0 and 1), `cpr` and `cmd` (MIB's, over the measured points). `fractions`
    holds the edge fractions the sizes were chosen for (MIB's, with sizes="mib"); otherwise the x axis is
    size / edges_total."""

    sizes: list[int]
    faithfulness: list[float]
    metric: list[float]
    full: float
    empty: float
    edges_total: int
    meta: dict[str, Any] = field(default_factory=dict)
    fractions: list[float] | None = None

    @property
    def area(self) -> float:
        xs = [0.0] + [s / self.edges_total for s in self.sizes] + [1.0]
        ys = [0.0] + self.faithfulness + [1.0]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        xs, ys = [xs[i] for i in order], [ys[i] for i in order]
        return _trapezoid(xs, ys)

    @property
    def xs(self) -> list[float]:
        """The fraction-of-edges axis: `fractions` when set, else size / edges_total."""
        return list(self.fractions) if self.fractions is not None else [s / self.edges_total for s in self.sizes]

    @property
    def cpr(self) -> float:
        """MIB's CPR: trapezoid area under F over the curve's points (linear fraction axis, no added ends)."""
        return _trapezoid(self.xs, self.faithfulness)

    @property
    def cmd(self) -> float:
        """MIB's CMD: trapezoid area under |1 − F| over the curve's points (linear fraction axis, no added ends)."""
        return _trapezoid(self.xs, [abs(1.0 - f) for f in self.faithfulness])

    def as_dict(self) -> dict[str, Any]:
        return {
            "sizes": self.sizes,
            "faithfulness": self.faithfulness,
            "metric": self.metric,
            "full": self.full,
            "empty": self.empty,
            "area": self.area,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "fractions": self.fractions,
            "edges_total": self.edges_total,
            **self.meta,
        }

    def __repr__(self) -> str:
        head = (
            f"Curve({len(self.sizes)} circuit sizes of {self.edges_total} edges, area={self.area:.4g}, "
            f"CPR={self.cpr:.4g}, CMD={self.cmd:.4g}, metric full={self.full:.4g} empty={self.empty:.4g}"
        )
        extra = "".join(f", {k}={v!r}" for k, v in self.meta.items() if isinstance(v, (str, int, float)))
        rows = [f"  {size:>8} edges  F={f:+.4f}" for size, f in zip(self.sizes, self.faithfulness, strict=True)]
        return "\n".join([head + extra + ")", *rows])

    def _repr_html_(self) -> str:
        facts = [
            ("edges", str(self.edges_total)),
            ("area", f"{self.area:.4g}"),
            ("CPR", f"{self.cpr:.4g}"),
            ("CMD", f"{self.cmd:.4g}"),
            ("metric full / empty", f"{self.full:.4g} / {self.empty:.4g}"),
            *((str(k), str(v)) for k, v in self.meta.items() if isinstance(v, (str, int, float))),
        ]
        rows = [
            [size, f"{x:.4g}", f"{f:+.4f}"] for size, x, f in zip(self.sizes, self.xs, self.faithfulness, strict=True)
        ]
        return html_block(
            "Curve: normalized faithfulness against edges kept",
            facts,
            line_svg(self.xs, self.faithfulness, "fraction of edges kept", "F"),
            html_table(["edges", "fraction", "F"], rows),
        )

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


def _trapezoid(xs: list[float], ys: list[float]) -> float:
    """Trapezoid-rule area under the points (xs[i], ys[i]), in the order given."""
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


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


def with_endpoints(
    patcher: EdgePatcher, valid: Tensor, kept: list[Tensor], executor: Executor | None = None
) -> tuple[float, float, Tensor]:
    """(m(M), m(∅), m of each circuit in `kept` (S, R) masks), one batch of rows: the full graph `valid` is one
    more row (no edge patched: the plain run), m(∅) the patcher's source run under interchange ablation or
    one more row (mean / zero). executor: where the rows run (`circuits.edge_work.metric_of`; None: here)."""
    ends = [valid] if patcher.ablation == "patch" else [valid, torch.zeros_like(valid)]
    values = metric_of(patcher, torch.stack(ends + kept), executor)
    empty = patcher.source_metric if patcher.ablation == "patch" else float(values[1])
    return float(values[0]), empty, values[len(ends) :]


def faithfulness_curve(
    patcher: EdgePatcher,
    graph: Graph,
    sizes: list[int] | Literal["mib"] | None = None,
    by: str = "abs",
    executor: "str | Executor | None" = None,
) -> Curve:
    """Normalized faithfulness of the top-k circuits of `graph` (ranked `by`, see `Graph.prune`) for k in
    `sizes` (default: 20 log-spaced; "mib": MIB's edge fractions, see the module docstring). The circuits and
    the full graph (m(M)) run as rows of the same batched forwards; m(∅) is the patcher's source run
    (interchange ablation) or one more row (mean / zero); a size holding every edge is the full graph.

    executor: where those forwards run: None / "local" (this process), "ray" (a local Ray cluster started for
    this call) or an executor object such as `pathlens.distributed.RayExecutor(address=...)`; the patcher's
    chunks are planned here and the curve is bit-identical to the local one (same torch threads per process).
    Its memory is the patcher's: build it with `EdgePatcher(..., max_memory=)`."""
    fractions = None
    if sizes == "mib":
        fractions, sizes = list(MIB_FRACTIONS), mib_sizes(graph.edges_total)
    elif isinstance(sizes, str):
        raise PathlensError(f"faithfulness_curve: sizes must be a list of edge counts or 'mib', got {sizes!r}.")
    sizes = sizes or default_sizes(graph.edges_total)
    partial = sorted({s for s in sizes if s < graph.edges_total})
    kept = list(top_k_masks(graph, partial, by)) if partial else []
    with resolved_executor(executor) as runner:
        full, empty, circuits = with_endpoints(patcher, graph.valid, kept, runner)
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
        fractions=fractions,
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
