"""Attribution patching (AtP): a first-order estimate of every patching cell from two forwards and one backward.

For a variant patching site n at positions S, with base run b and source run s (denoise: b = corrupted,
s = clean; noise: the reverse):

    m(patched) ≈ m(b) + Σ_{p ∈ S} (n_s − n_b)[p] · ∂m/∂n[p] |_b

The result is a `Scores` with exactly the dims, coords and meaning (the patched metric, batch mean) of
`pathlens.patch` on the same arguments, so the two compare cell by cell (`Scores.corr`). RelP
(`pathlens.attribution.relp`) is the same product with the backward pass under LRP rules; AtP*
(`pathlens.attribution.atp_star`) corrects query/key sites and adds GradDrop — all three share
`first_order` and `cells` below.

Over a large prompt set the prompts run in chunks (`max_batch_tokens=` or `max_memory=`; one chunk by default):
each chunk's per-variant effects and base metric are summed over its prompts in float64 (`chunk_sums`), the
chunks' sums are added in chunk order (`attribution.chunked`), here or on workers (`executor=`), and
`estimate_scores` divides by the number of prompts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pathlens.attribution.chunked import (
    PromptChunkJob,
    PromptChunks,
    check_knobs,
    chunk_interventions,
    prompts_per_chunk,
    summed,
)
from pathlens.attribution.lrp import rule_objects
from pathlens.interventions import Intervention
from pathlens.memory import parse_bytes
from pathlens.model import Model, Run
from pathlens.patching.budget import first_order_cost, prompt_chunk_for
from pathlens.patching.executor import Executor
from pathlens.patching.plan import Plan
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, Positions, ResolvedSpec, Sites
from pathlens.results import Scores
from pathlens.sites import INDEX_LETTER, Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric


@dataclass
class FirstOrder:
    """Everything a first-order estimate needs, per site family.

    `effect[family]`: per-prompt estimated change of the metric, summed over the site's feature dims but not
    over positions or its index axis: (N, P) or (N, P, index). `source` / `base` are the two runs (the base
    run's cache holds the gradient-carrying activations); `grads[family]` ∂(Σ_prompts m)/∂site at the base
    run, same shape as the site; `per_prompt` the base metric (N,).
    """

    plan: Plan
    families: list[Site]
    source: Run
    base: Run
    grads: dict[Site, Tensor]
    effect: dict[Site, Tensor]
    per_prompt: Tensor

    @property
    def base_metric(self) -> float:
        return float(self.per_prompt.detach().mean())


def first_order(
    setup: ResolvedSpec,
    plan: Plan,
    rules: Collection[str] = (),
    interventions: Sequence[Intervention] = (),
    clean_interventions: Sequence[Intervention] = (),
) -> FirstOrder:
    """Source run, base run with gradients (under `rules`, see `pathlens.attribution.lrp`), and the per-prompt
    products (n_s − n_b) · ∂m/∂n for every family of `plan` (the spec's own plan, or one extended with the
    families an estimator needs besides). `interventions` are applied to the base run only (GradDrop uses them
    to stop gradients; they must not change values). `clean_interventions` are applied to the run of the clean
    prompts (the source when denoising, the base when noising): with clean and corrupted prompts alike, the two
    runs then differ by those interventions alone (what `pathlens.steering.explain` attributes)."""
    model, task, metric = setup.model, setup.task, setup.metric
    base_ids, source_ids = setup.runs
    clean_side = list(clean_interventions)
    families = sorted({v.site.family for v in plan.variants}, key=str)
    source = model.run(
        source_ids,
        attention_mask=task.attention_mask,
        cache=families,
        interventions=clean_side if setup.direction == "denoise" else [],
    )
    base = model.run(
        base_ids,
        attention_mask=task.attention_mask,
        cache=families,
        grad=True,
        rules=rule_objects(rules),
        interventions=[*(clean_side if setup.direction == "noise" else []), *interventions],
    )
    per_prompt = metric(base.logits, task)
    wanted = [base.cache[f] for f in families]
    raw = torch.autograd.grad(per_prompt.sum(), wanted, allow_unused=True)
    grads = {f: torch.zeros_like(w) if g is None else g for f, w, g in zip(families, wanted, raw, strict=True)}
    effect: dict[Site, Tensor] = {}
    for family in families:
        product = (source.cache[family] - base.cache[family].detach()) * grads[family]
        keep = 3 if family.kind in INDEX_LETTER else 2
        effect[family] = product.sum(dim=tuple(range(keep, product.ndim))) if product.ndim > keep else product
    return FirstOrder(plan, families, source, base, grads, effect, per_prompt.detach())


def cells(plan: Plan, effect: dict[Site, Tensor]) -> Tensor:
    """Per-prompt effects (N, P[, index]) per family → per-variant, per-prompt effects (n_variants, N)."""
    n = next(iter(effect.values())).shape[0]
    values = torch.empty(len(plan.variants), n, dtype=torch.float64)
    for v in plan.variants:
        e = effect[v.site.family]
        if e.ndim == 3:
            e = e.sum(dim=2) if v.site.index is None else e[:, :, v.site.index]
        e = e if v.positions is None else e[:, list(v.positions)]
        values[v.cell] = e.sum(dim=1).double()
    return values


def chunk_sums(per_cell: Tensor, per_prompt: Tensor) -> Tensor:
    """One chunk's contribution (`attribution.chunked`): per-variant effects (n_variants, n) and base metric (n,)
    summed over the chunk's prompts in float64 → (n_variants + 1,)."""
    return torch.cat([per_cell.double().sum(dim=1), per_prompt.double().sum()[None]])


def estimate_scores(setup: ResolvedSpec, total: Tensor, method: str, **meta: Any) -> Scores:
    """Scores in patch()'s layout from `total` (n_variants + 1,), the `chunk_sums` added over every prompt: base
    metric + the batch-mean effect per variant; `meta` adds to the spec's meta (model, task, n_prompts) before
    the base metric."""
    plan, n = setup.plan, setup.task.n
    base_metric = float(total[-1] / n)
    return Scores(
        values=(base_metric + total[:-1] / n).reshape(plan.shape).float(),
        dims=plan.dims,
        coords=plan.coords,
        metric=setup.metric_name,
        method=method,
        meta=setup.meta(**meta, base_metric=base_metric),
    )


@dataclass(frozen=True)
class FirstOrderSums:
    """The `ChunkSums` of AtP (no `rules`) and RelP (LRP `rules`): `first_order` on one chunk's prompts, with the
    clean-side interventions cut to them."""

    spec: PatchSpec
    rules: frozenset[str] = frozenset()
    clean_interventions: tuple[Intervention, ...] = ()

    @property
    def description(self) -> str:
        return "relp" if self.rules else "atp"

    def sums(self, model: Model, task: Task, rows: Tensor) -> Tensor:
        setup = self.spec.resolve(model, task.rows(rows))
        clean_side = chunk_interventions(self.clean_interventions, rows, task.n, self.description)
        fo = first_order(setup, setup.plan, rules=self.rules, clean_interventions=clean_side)
        return chunk_sums(cells(setup.plan, fo.effect), fo.per_prompt)


def first_order_chunks(
    setup: ResolvedSpec,
    plan: Plan,
    max_batch_tokens: int | None,
    max_memory: int | str | None,
    qk_layers: int = 0,
) -> PromptChunks:
    """The prompt chunks of a first-order estimate: one forward and backward of `max_batch_tokens` tokens, or as
    many prompts as `max_memory` holds (`patching.budget.first_order_cost` of `plan`'s families); neither: all
    prompts in one chunk."""
    check_knobs(max_batch_tokens, max_memory)
    task = setup.task
    if max_memory is None:
        return PromptChunks(task.n, prompts_per_chunk(task, max_batch_tokens))
    families = {v.site.family for v in plan.variants}
    cost = first_order_cost(setup.model, task.seq_len, families, len(setup.plan.variants), qk_layers)
    size, _ = prompt_chunk_for(lambda _: cost, parse_bytes(max_memory), 1, task.n)
    return PromptChunks(task.n, size)


def chunk_meta(chunks: PromptChunks, max_memory: int | str | None) -> dict[str, Any]:
    """What a chunked estimate records: the prompts per chunk (when they are split) and the budget."""
    meta: dict[str, Any] = {"prompts_per_chunk": chunks.size} if chunks.count > 1 else {}
    return {**meta, **({"max_memory": parse_bytes(max_memory)} if max_memory is not None else {})}


def atp(
    model: Model,
    task: Task,
    sites: Sites = "heads",
    positions: Positions = "all",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    clean_interventions: Sequence[Intervention] = (),
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Scores:
    """AtP estimates of `pathlens.patch(model, task, sites, positions, direction)`: same Scores layout.
    direction: "noise" by default (`DEFAULT_DIRECTION`, every method's: what circuit discovery patches).
    clean_interventions: applied to the run of the clean prompts (see `first_order`).
    max_batch_tokens: the prompts run in chunks of this many tokens per forward and backward; max_memory: instead,
    the bytes the call may hold (an int or a string such as "2GB"; prompts per chunk from
    `patching.budget.first_order_cost`); neither: every prompt in one forward. executor: where the chunks run —
    None / "local" (here), "ray" or an executor object (`pathlens.distributed.RayExecutor`): chunks are planned
    here as for a local run and their float64 sums added in chunk order, so the scores are bit-identical to the
    local run's (same torch threads per process; see `attribution.chunked`)."""
    setup = PatchSpec(sites, positions, direction, metric, layers, neurons).resolve(model, task)
    chunks = first_order_chunks(setup, setup.plan, max_batch_tokens, max_memory)
    job = PromptChunkJob(setup.task, chunks, FirstOrderSums(setup.spec, clean_interventions=tuple(clean_interventions)))
    total = summed(model, job, executor)
    return estimate_scores(setup, total, f"atp:{direction}", **chunk_meta(chunks, max_memory))
