"""What the circuit engines will cost before they run (`pathlens plan`): edge attribution, faithfulness curves (edge
patching of many circuits) and discovery; see `patching.estimate` for the `Estimate` they return.

Each estimator chunks as its engine does: edge attribution runs its base and source forwards, then (prompt, step)
rows in chunks of `max_batch_tokens` // P, each chunk one forward and one backward (`edge_attribution`); the edge
patcher runs one source forward, then K circuits × N prompts as rows in chunks of its `max_batch_tokens` // P
(`EdgePatcher.row_chunks`). Under `max_memory` the rows per chunk come from the engines' cost models
(`patching.budget.edge_attribution_cost`, `edge_patch_cost`). Time: a forward of R rows costs R / N of the probe
forward of the N prompts, a backward `BACKWARD_COST` forwards.

Discovery (`discover`) chains them: edge attribution (its scoring, or EAP for the exact methods), the patcher, the
exact edge scores for "patching" (one row per edge, plus the full graph), one curve per ranking ("auto": abs and
support), then one faithfulness check of the chosen circuit. Two later steps depend on what it measures: the sizes
tried below the chosen one (`_between`: none, or up to 7 circuits) and, for a circuit of at most `refine` edges, an
ACDC pass over its own edges (a check of the start, then batched calls per receiver until every edge is decided —
at most one call per edge — and a last faithfulness check). The plan gives the forwards without them as `forwards`
and with their most as `forwards_max`. ACDC discovery itself decides edge by edge and has no plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pathlens.circuits.edge_attribution import DEFAULT_ATTRIBUTION_BATCH_TOKENS
from pathlens.circuits.edge_patching import DEFAULT_EDGE_BATCH_TOKENS
from pathlens.circuits.faithfulness import default_sizes
from pathlens.circuits.layout import graph_layout, post_norms, valid_mask
from pathlens.circuits.mib import mib_sizes
from pathlens.errors import PathlensError
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.budget import RowCost, edge_attribution_cost, edge_patch_cost
from pathlens.patching.estimate import BACKWARD_COST, Estimate, ceil_div, probe_seconds
from pathlens.tasks.base import Task

BETWEEN_POINTS = 7
"""The most circuit sizes discovery tries between two curve sizes (`discover._between`: 8 points, the top one
already measured)."""
REFINE = 64
"""`discover(refine=...)`'s default: circuits of at most this many edges get one ACDC pass."""


@dataclass(frozen=True)
class RowPlan:
    """An engine that runs rows in chunks: its rows per forward, its forwards, and its cost model."""

    rows_per_forward: int
    cost: RowCost

    def forwards(self, rows: int) -> int:
        """The forwards of `rows` rows in chunks."""
        return ceil_div(rows, self.rows_per_forward)

    def peak(self, rows: int) -> int:
        return self.cost.peak(min(self.rows_per_forward, rows))


def _rows_per_forward(
    cost: RowCost, seq_len: int, default_tokens: int, max_batch_tokens: int | None, max_memory: int | str | None
) -> int:
    """Rows per forward as the engines size them: tokens // P (at least 1), or the rows a budget allows."""
    if max_memory is not None:
        if max_batch_tokens is not None:
            raise PathlensError("pass max_memory= (bytes) or max_batch_tokens= (tokens per forward), not both.")
        return cost.rows_for(parse_bytes(max_memory))
    return max(1, (default_tokens if max_batch_tokens is None else max_batch_tokens) // seq_len)


def attribution_rows(
    model: Model, task: Task, max_batch_tokens: int | None = None, max_memory: int | str | None = None
) -> RowPlan:
    """How `edge_attribution` chunks its (prompt, step) rows on `task`."""
    senders = len(graph_layout(model).senders)
    cost = edge_attribution_cost(model, task.n, task.seq_len, senders, post_norms(model) is not None)
    rows = _rows_per_forward(cost, task.seq_len, DEFAULT_ATTRIBUTION_BATCH_TOKENS, max_batch_tokens, max_memory)
    return RowPlan(rows, cost)


def patcher_rows(
    model: Model, task: Task, max_batch_tokens: int | None = None, max_memory: int | str | None = None
) -> RowPlan:
    """How an `EdgePatcher` chunks its (circuit, prompt) rows on `task`."""
    senders = len(graph_layout(model).senders)
    cost = edge_patch_cost(model, task.n, task.seq_len, senders, post_norms(model) is not None)
    rows = _rows_per_forward(cost, task.seq_len, DEFAULT_EDGE_BATCH_TOKENS, max_batch_tokens, max_memory)
    return RowPlan(rows, cost)


def edges_total(model: Model) -> int:
    """The edges of the model's graph (sender before receiver)."""
    return int(valid_mask(graph_layout(model), model.n_layers).sum())


def curve_circuits(total: int, sizes: int | Literal["mib"] = 20) -> int:
    """The circuits one faithfulness curve runs as rows: the full graph and every size below `total` (`sizes`:
    how many log-spaced sizes, as `default_sizes`, or MIB's fractions)."""
    listed = mib_sizes(total) if sizes == "mib" else default_sizes(total, sizes)
    return 1 + len({s for s in listed if s < total})


def estimate_edge_attribution(
    model: Model,
    task: Task,
    method: str = "eap",
    direction: str = "noise",
    steps: int = 5,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    forward_seconds: float | None = None,
) -> Estimate:
    """The estimate of `edge_attribution(model, task, method, direction, steps=..., max_batch_tokens=...,
    max_memory=...)` (module docstring); runs two probe forwards unless `forward_seconds` is given."""
    if method not in ("eap", "eap-ig", "relp"):
        raise PathlensError(f"method={method!r}: edge attribution is eap, eap-ig or relp.")
    plan = attribution_rows(model, task, max_batch_tokens, max_memory)
    total = (steps if method == "eap-ig" else 1) * task.n
    chunks = plan.forwards(total)
    forward = probe_seconds(model, task.clean_ids, task.attention_mask) if forward_seconds is None else forward_seconds
    return Estimate(
        method=method,
        forwards=2 + chunks,
        backwards=chunks,
        max_batch_tokens=min(plan.rows_per_forward, total) * task.seq_len,
        peak_bytes=plan.peak(total),
        least_bytes=plan.cost.least,
        seconds=forward * (2 + total / task.n * (1 + BACKWARD_COST)),
        forward_seconds=forward,
        units={"(prompt, step) rows": total, "edges": edges_total(model)},
        notes=("each chunk's backward also carries every layer's receiver gradients through its input norms",),
    )


def estimate_curve(
    model: Model,
    task: Task,
    sizes: int | Literal["mib"] = 20,
    direction: str = "noise",
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
) -> Estimate:
    """The estimate of `faithfulness_curve(EdgePatcher(model, task, direction=..., max_batch_tokens=...,
    max_memory=...), graph, sizes)` for a scored graph of the model (the patcher built, then the curve's rows)."""
    plan = patcher_rows(model, task, max_batch_tokens, max_memory)
    total = edges_total(model)
    rows = curve_circuits(total, sizes) * task.n
    forward = probe_seconds(model, task.clean_ids, task.attention_mask)
    return Estimate(
        method="curve",
        forwards=1 + plan.forwards(rows),
        backwards=0,
        max_batch_tokens=min(plan.rows_per_forward, rows) * task.seq_len,
        peak_bytes=plan.peak(rows),
        least_bytes=plan.cost.least,
        seconds=forward * (1 + rows / task.n),
        forward_seconds=forward,
        units={"circuits": rows // task.n, "(circuit, prompt) rows": rows, "edges": total},
    )


def estimate_discover(
    model: Model,
    task: Task,
    method: str = "eap-ig",
    direction: str = "noise",
    steps: int = 5,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    by: str = "auto",
    top_k: int | None = None,
    refine: int = REFINE,
) -> Estimate:
    """The estimate of `discover(model, task, method, direction=..., steps=..., max_batch_tokens=...,
    max_memory=..., by=..., top_k=..., refine=...)` with the default curve sizes (module docstring)."""
    if method not in ("eap", "eap-ig", "relp", "patching"):
        raise PathlensError(
            f"method={method!r}: plan estimates discovery by eap, eap-ig, relp or patching; ACDC decides edge by "
            "edge, so its forwards are not known before it runs."
        )
    forward = probe_seconds(model, task.clean_ids, task.attention_mask)
    scoring = "eap" if method == "patching" else method
    scored = estimate_edge_attribution(model, task, scoring, direction, steps, None, max_memory, forward)
    plan = patcher_rows(model, task, max_batch_tokens, max_memory)
    total = edges_total(model)
    n = task.n
    circuits = curve_circuits(total) * (2 if by == "auto" else 1)
    passes = [1 + total] if method == "patching" else []  # the exact edge scores: one row per edge and the full graph
    passes += [curve_circuits(total)] * (2 if by == "auto" else 1) + [2]  # the curves, then the chosen circuit's check
    forwards = 1 + sum(plan.forwards(k * n) for k in passes)
    between = plan.forwards(BETWEEN_POINTS * n) if top_k is None else 0
    refined = 0
    if refine > 0:  # a check of the start, at most one call per edge (each on the edges still undecided), a last check
        refined = 2 * plan.forwards(2 * n) + sum(plan.forwards(j * n) for j in range(1, refine + 1))
    rows = sum(passes) * n
    return Estimate(
        method=f"circuit ({method})",
        forwards=scored.forwards + forwards,
        backwards=scored.backwards,
        max_batch_tokens=max(scored.max_batch_tokens, min(plan.rows_per_forward, rows) * task.seq_len),
        peak_bytes=max(scored.peak_bytes, plan.peak(rows)),
        least_bytes=max(scored.least_bytes, plan.cost.least),
        seconds=scored.seconds + forward * (1 + rows / n),
        forward_seconds=forward,
        units={"edges": total, "circuits on the curves": circuits},
        forwards_max=scored.forwards + forwards + between + refined,
        notes=(
            "forwards: without the sizes tried below the chosen one and the ACDC refinement, which depend on the "
            "curve; the most: with both",
            "`pathlens circuit` then finds pathways (exact scores of their edges) and measures MIB's curve: a few "
            "more edge-patching forwards",
        ),
    )
