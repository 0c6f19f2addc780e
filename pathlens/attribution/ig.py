"""Integrated gradients over activations, per site family, in `pathlens.patch`'s Scores layout.

For a site family n (one layer's heads, one layer's residual stream, ...), the base run is repeated with n
replaced by points on the line from its base value toward its source value, n_k = n_b + (k/m)(n_s − n_b),
k = 0..m−1, and the gradient at n is averaged over the points:

    IG(n)[p] = (n_s − n_b)[p] · (1/m) Σ_k ∂m/∂n |_{n_k}

Summed over every position and index of a family, IG approaches the exact effect of patching the whole family
as m grows (completeness), which AtP (m = 1, the k = 0 term alone) does not. Cost: m forwards and backwards per
family and layer (the "activations" variant of EAP-IG); rows of one forward are (step, prompt) pairs, chunked
to `max_batch_tokens`. For the input-interpolating variant over all edges, see `edge_attribution(method="eap-ig")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pathlens.attribution.atp import cells, chunk_meta, chunk_sums, estimate_scores
from pathlens.attribution.chunked import PromptChunkJob, PromptChunks, check_knobs, prompts_per_chunk, summed
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.memory import parse_bytes
from pathlens.model import Model, Run
from pathlens.patching.budget import integrated_gradients_cost, prompt_chunk_for
from pathlens.patching.executor import Executor
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, Positions, ResolvedSpec, Sites
from pathlens.results import Scores
from pathlens.sites import INDEX_LETTER, Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric

DEFAULT_IG_BATCH_TOKENS = 4096


def integrated_gradients(
    model: Model,
    task: Task,
    sites: Sites = "heads",
    positions: Positions = "all",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    steps: int = 5,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Scores:
    """IG estimates of `pathlens.patch(model, task, sites, positions, direction)`: same Scores layout.
    direction: "noise" by default (`DEFAULT_DIRECTION`, every method's: what circuit discovery patches).
    max_batch_tokens: tokens per forward/backward (default `DEFAULT_IG_BATCH_TOKENS`): the prompts run in chunks
    of as many whole prompts as one forward holds with all their steps (or one prompt, its steps over several
    forwards); max_memory: instead, the bytes the call may hold (an int or a string such as "2GB"): prompts per
    chunk and rows per forward from their cost (`patching.budget.integrated_gradients_cost`), scores as with
    `max_batch_tokens` = rows × P (`ig_chunks`). executor: where the chunks run, as for `atp`."""
    if steps < 1:
        raise PathlensError(f"steps must be at least 1, got {steps}.")
    setup = PatchSpec(sites, positions, direction, metric, layers, neurons).resolve(model, task)
    chunks, rows_per_forward = ig_chunks(setup, steps, max_batch_tokens, max_memory)
    job = PromptChunkJob(setup.task, chunks, IgSums(setup.spec, steps, rows_per_forward))
    total = summed(model, job, executor)
    return estimate_scores(setup, total, f"ig:{direction}", steps=steps, **chunk_meta(chunks, max_memory))


def ig_chunks(
    setup: ResolvedSpec, steps: int, max_batch_tokens: int | None, max_memory: int | str | None
) -> tuple[PromptChunks, int]:
    """The prompt chunks of `integrated_gradients` and the (prompt, step) rows of one forward."""
    check_knobs(max_batch_tokens, max_memory)
    model, task = setup.model, setup.task
    if max_memory is None:
        tokens = DEFAULT_IG_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
        size = prompts_per_chunk(task, tokens, rows_per_prompt=steps)
        return PromptChunks(task.n, size), max(1, tokens // task.seq_len)
    families = {v.site.family for v in setup.plan.variants}
    budget = parse_bytes(max_memory)
    size, rows = prompt_chunk_for(
        lambda k: integrated_gradients_cost(model, k, task.seq_len, families), budget, steps, task.n
    )
    return PromptChunks(task.n, size), rows


@dataclass(frozen=True)
class IgSums:
    """The `ChunkSums` of integrated gradients: on one chunk's prompts, the base and source runs, then every
    family's (prompt, step) rows `rows_per_forward` at a time; the per-variant effects summed over the prompts."""

    spec: PatchSpec
    steps: int
    rows_per_forward: int
    description: str = "integrated gradients"

    def sums(self, model: Model, task: Task, rows: Tensor) -> Tensor:
        setup = self.spec.resolve(model, task.rows(rows))
        families = sorted({v.site.family for v in setup.plan.variants}, key=str)
        base_ids, source_ids = setup.runs
        mask = setup.task.attention_mask
        base = model.run(base_ids, attention_mask=mask, cache=families)
        source = model.run(source_ids, attention_mask=mask, cache=families)
        per_prompt = setup.metric(base.logits, setup.task).detach()
        effect = {
            f: _family_effect(
                model, setup.task, f, base, source, base_ids, setup.metric, self.steps, self.rows_per_forward
            )
            for f in families
        }
        return chunk_sums(cells(setup.plan, effect), per_prompt)


def _family_effect(
    model: Model,
    task: Task,
    family: Site,
    base: Run,
    source: Run,
    base_ids: Tensor,
    metric: Metric,
    steps: int,
    rows_per_forward: int,
) -> Tensor:
    """Per-prompt IG effect of one family, summed over its feature dims: (N, P) or (N, P, index)."""
    start, end = base.cache[family], source.cache[family]
    delta = end - start
    grad_sum = torch.zeros_like(start)
    total = steps * task.n
    for first in range(0, total, rows_per_forward):
        rows = torch.arange(first, min(total, first + rows_per_forward))
        prompts, step = rows // steps, rows % steps
        alpha = (step.double() / steps).to(start.dtype).view(-1, *([1] * (start.ndim - 1)))
        point = start[prompts] + alpha * delta[prompts]
        run = model.run(
            base_ids[prompts],
            attention_mask=task.attention_mask[prompts],
            cache=[family],
            interventions=[Intervention(family, Replace(point))],
            grad=True,
        )
        value = metric(run.logits, task.rows(prompts)).sum()
        (grad,) = torch.autograd.grad(value, run.cache[family], allow_unused=True)
        if grad is not None:
            grad_sum.index_add_(0, prompts, grad.detach())
    product = delta * grad_sum / steps
    keep = 3 if family.kind in INDEX_LETTER else 2
    return product.sum(dim=tuple(range(keep, product.ndim))) if product.ndim > keep else product
