"""What the node attribution methods will cost before they run (`pathlens plan`): AtP, AtP*, RelP and integrated
gradients; see `patching.estimate` for the `Estimate` they return.

The prompts are chunked exactly as the methods chunk them (`atp.first_order_chunks`, `ig.ig_chunks`): by
`max_batch_tokens`, by what `max_memory` allows under the methods' cost models (`patching.budget.first_order_cost`,
`integrated_gradients_cost`), or all in one chunk. A first-order chunk (AtP, AtP*, RelP) runs the source prompts
and the base prompts with their graph, then one backward; an IG chunk runs its base and source prompts, then for
every site family its (prompt, step) rows, `rows per forward` at a time, each forward with its backward. Time: a
forward of R prompt rows costs R / N of the probe forward of the N prompts, a backward `BACKWARD_COST` forwards.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pathlens.attribution.atp import first_order_chunks
from pathlens.attribution.chunked import PromptChunks
from pathlens.attribution.ig import ig_chunks
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching.budget import first_order_cost, integrated_gradients_cost
from pathlens.patching.estimate import BACKWARD_COST, Estimate, ceil_div, probe_seconds
from pathlens.patching.plan import Plan, Variant
from pathlens.patching.spec import PatchSpec
from pathlens.sites import Site
from pathlens.tasks.base import Task

FIRST_ORDER = ("atp", "atp*", "relp")


def _with_qk_sites(plan: Plan) -> tuple[Plan, int]:
    """The plan AtP* sizes its chunks by (the pattern, query and key of every layer whose q or k it scores are
    cached too: `atp_star`) and the number of those layers."""
    layers = sorted({v.site.layer for v in plan.variants if v.site.kind in ("q", "k") and v.site.layer is not None})
    needed = [Site(kind, layer) for layer in layers for kind in ("attn_pattern", "q", "k")]
    return replace(plan, variants=plan.variants + tuple(Variant(site, None, -1) for site in needed)), len(layers)


def _chunk_sizes(chunks: PromptChunks) -> list[int]:
    return [int(chunks.rows(i).numel()) for i in range(chunks.count)]


def estimate_first_order(
    model: Model,
    task: Task,
    method: str = "atp",
    sites: Any = "heads",
    positions: Any = "all",
    direction: Any = "noise",
    layers: Any = None,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
) -> Estimate:
    """The estimate of `atp` / `atp_star` (qk_fix on, no GradDrop) / `relp` with these arguments (module
    docstring); runs two probe forwards."""
    if method not in FIRST_ORDER:
        raise PathlensError(f"method={method!r}: a first-order estimate is one of {', '.join(FIRST_ORDER)}.")
    setup = PatchSpec(sites, positions, direction, None, layers, None).resolve(model, task)
    plan, qk_layers = _with_qk_sites(setup.plan) if method == "atp*" else (setup.plan, 0)
    chunks = first_order_chunks(setup, plan, max_batch_tokens, max_memory, qk_layers)
    families = {v.site.family for v in plan.variants}
    cost = first_order_cost(model, task.seq_len, families, len(setup.plan.variants), qk_layers)
    forward = probe_seconds(model, task.clean_ids, task.attention_mask)
    return Estimate(
        method=method,
        forwards=2 * chunks.count,
        backwards=chunks.count,
        max_batch_tokens=chunks.size * task.seq_len,
        peak_bytes=cost.peak(chunks.size),
        least_bytes=cost.least,
        seconds=forward * (2 + BACKWARD_COST),
        forward_seconds=forward,
        units={"variants": len(setup.plan.variants), "prompt chunks": chunks.count},
    )


def estimate_ig(
    model: Model,
    task: Task,
    sites: Any = "heads",
    positions: Any = "all",
    direction: Any = "noise",
    layers: Any = None,
    steps: int = 5,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
) -> Estimate:
    """The estimate of `integrated_gradients` with these arguments (module docstring); runs two probe forwards."""
    if steps < 1:
        raise PathlensError(f"steps must be at least 1, got {steps}.")
    setup = PatchSpec(sites, positions, direction, None, layers, None).resolve(model, task)
    chunks, rows_per_forward = ig_chunks(setup, steps, max_batch_tokens, max_memory)
    families = {v.site.family for v in setup.plan.variants}
    sizes = _chunk_sizes(chunks)
    row_forwards = len(families) * sum(ceil_div(steps * k, rows_per_forward) for k in sizes)
    cost = integrated_gradients_cost(model, chunks.size, task.seq_len, families)
    forward = probe_seconds(model, task.clean_ids, task.attention_mask)
    return Estimate(
        method="ig",
        forwards=2 * chunks.count + row_forwards,
        backwards=row_forwards,
        max_batch_tokens=min(rows_per_forward, steps * chunks.size) * task.seq_len,
        peak_bytes=cost.peak(min(rows_per_forward, steps * chunks.size)),
        least_bytes=integrated_gradients_cost(model, 1, task.seq_len, families).least,
        seconds=forward * (2 + len(families) * steps * (1 + BACKWARD_COST)),
        forward_seconds=forward,
        units={"variants": len(setup.plan.variants), "site families": len(families), "prompt chunks": chunks.count},
    )
