"""AtP* (Kramár et al. 2024, arXiv 2403.00745): attribution patching with the QK fix and GradDrop.

**QK fix.** Plain AtP linearises the attention softmax, which fails badly where attention is saturated. For query
and key sites the fix recomputes the changed softmax row exactly and takes its product with ∂m/∂A at the base
run (A: the attention pattern, (N, q_pos, H, k_pos)). With base b, source s, and `scale` the model's own logit
scale (the attention module's `scaling`, else d_head**-0.5):

    query of head h at row t:   s'_t = s_t + scale·(q_t^s − q_t^b)·K_b          Î = (softmax(s'_t) − A_t)·∂m/∂A_t
    key of group g at key s:    for every row t ≥ s and every head h of the group, only the logit to s moves,
                                by scale·q_t·(k_s^s − k_s^b); Î = Σ_{t,h} (A'_t − A_t)·∂m/∂A_t

The logits are never rebuilt: s_t = log A_t up to a per-row constant (softmax is shift-invariant; masked keys
have A = 0, so log A = −inf keeps them masked), so softmax(log A_t + δ_t) is the patched row whatever the mask
(causal, padding, sliding window, ALiBi). One key moved: A'_s = σ(log A_s − log Σ_{j≠s} A_j + δ), the other keys
scale by a common factor, and Î_ts = (A'_s − A_s)·(G_s − Σ_{j≠s} A_j G_j / Σ_{j≠s} A_j) (G = ∂m/∂A_t). With
positions="all" every row's queries (rows are independent) or every key of a row (all shift together) change at
once, both computed exactly as softmax(log A_t + δ_t). Values (v) and every other site get plain AtP.
Limits: logits soft-capped before the softmax (Gemma 2) are rejected; keys whose base probability underflows to
exactly 0 stay at 0; the fix is exact in the softmax, first-order in everything downstream of the pattern.

**GradDrop.** For each layer ℓ the backward pass is repeated with no gradient through layer ℓ's residual
contribution (its `attn_out` and `mlp_out`; values unchanged, `StopGradient`), giving per-prompt estimates
Î_ℓ(n); the score is ĉ(n) = mean over prompts of (1/(L−1)) Σ_ℓ |Î_ℓ(n)|. A node inside layer ℓ (a head, its
q/k/v/z, an MLP neuron) gets Î_ℓ = 0 from its own layer, hence the L − 1. The stop acts where the layer writes
into the residual stream, so `attn_out`/`mlp_out` sites themselves keep their gradient. ĉ is a magnitude for
ranking nodes (verify the top ones with `pathlens.patch`), not a patched metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from pathlens.arch.base import get_blocks, get_module
from pathlens.attribution.atp import (
    cells,
    chunk_meta,
    chunk_sums,
    estimate_scores,
    first_order,
    first_order_chunks,
)
from pathlens.attribution.chunked import PromptChunkJob, summed
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, StopGradient
from pathlens.model import Model
from pathlens.patching.executor import Executor
from pathlens.patching.plan import Plan, Variant
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, Positions, ResolvedSpec, Sites
from pathlens.results import Scores
from pathlens.sites import Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric

_QK = ("q", "k")


def atp_star(
    model: Model,
    task: Task,
    sites: Sites = "heads",
    positions: Positions = "all",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    qk_fix: bool = True,
    grad_drop: bool = False,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Scores:
    """AtP* estimates of `pathlens.patch(model, task, sites, positions, direction)`, in the same Scores layout.
    direction: "noise" by default (`DEFAULT_DIRECTION`, every method's: what circuit discovery patches).

    qk_fix: exact softmax for query/key sites ("q", "k", or sites like "L3.H2.q", "L3.G1.k"); other sites get
        plain AtP. Needs attention through the transformers interface and un-capped attention logits.
    grad_drop=False: values are base metric + the signed (QK-fixed) estimate, method "atp*:<direction>" —
        comparable cell by cell with `patch`.
    grad_drop=True: values are the GradDrop magnitudes ĉ ≥ 0 (module docstring), method
        "atp*:graddrop:<direction>", metric "|Δ <metric>|" — scores to rank nodes by, not patched metrics.
        Costs one forward and backward more per layer; needs at least two layers.
    max_batch_tokens / max_memory / executor: the prompts in chunks and where they run, as for `atp` (the memory
        cost counts the patterns, queries and keys the QK fix reads).
    """
    setup = PatchSpec(sites, positions, direction, metric, layers, neurons).resolve(model, task)
    plan = setup.plan
    qk_families = _qk_families(plan, qk_fix)
    if qk_families:
        _check_qk_fix(model)
    n_layers = model.n_layers
    if grad_drop and n_layers < 2:
        raise PathlensError("grad_drop needs a model with at least two layers (it averages over L − 1 layers).")
    attn_layers = len({f.layer for f in qk_families})
    chunks = first_order_chunks(setup, _with_qk_sites(plan, qk_families), max_batch_tokens, max_memory, attn_layers)
    job = PromptChunkJob(setup.task, chunks, AtpStarSums(setup.spec, qk_fix, grad_drop))
    total = summed(model, job, executor)
    meta = chunk_meta(chunks, max_memory)
    if not grad_drop:
        return estimate_scores(setup, total, f"atp*:{direction}", **meta)
    n = setup.task.n
    return Scores(
        values=(total[:-1] / n / (n_layers - 1)).reshape(plan.shape).float(),
        dims=plan.dims,
        coords=plan.coords,
        metric=f"|Δ {setup.metric_name}|",
        method=f"atp*:graddrop:{direction}",
        meta=setup.meta(**meta, base_metric=float(total[-1] / n)),
    )


@dataclass(frozen=True)
class AtpStarSums:
    """The `ChunkSums` of AtP*: on one chunk's prompts, the QK-fixed estimates summed over them (or, with
    `grad_drop`, Σ_ℓ |Î_ℓ| summed over them), then the base metric's sum."""

    spec: PatchSpec
    qk_fix: bool
    grad_drop: bool
    description: str = "atp*"

    def sums(self, model: Model, task: Task, rows: Tensor) -> Tensor:
        setup = self.spec.resolve(model, task.rows(rows))
        qk_families = _qk_families(setup.plan, self.qk_fix)
        if not self.grad_drop:
            return chunk_sums(*_estimate(setup, qk_families, ()))
        total = torch.zeros(len(setup.plan.variants), setup.task.n, dtype=torch.float64)
        for layer in range(model.n_layers):
            per_cell, per_prompt = _estimate(setup, qk_families, _drop(model, layer))
            total += per_cell.abs()
        return chunk_sums(total, per_prompt)


def _qk_families(plan: Plan, qk_fix: bool) -> list[Site]:
    """The query/key site families of `plan` that get the exact softmax."""
    return sorted({v.site.family for v in plan.variants if v.site.kind in _QK}, key=str) if qk_fix else []


def _with_qk_sites(plan: Plan, qk_families: list[Site]) -> Plan:
    """`plan` extended with the pattern, query and key of every layer the QK fix reads (cached, never scored)."""
    attn_layers = sorted({f.layer for f in qk_families if f.layer is not None})
    needed = [Site(kind, layer) for layer in attn_layers for kind in ("attn_pattern", "q", "k")]
    return replace(plan, variants=plan.variants + tuple(Variant(site, None, -1) for site in needed))


def _check_qk_fix(model: Model) -> None:
    config: Any = model.hf.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if model.arch.qkv != "interface":
        raise PathlensError(
            f"qk_fix needs queries/keys as they enter the attention softmax (the transformers attention "
            f"interface), which {model.arch.family} does not use; pass qk_fix=False for plain AtP on q/k."
        )
    if getattr(text, "attn_logit_softcapping", None):
        raise PathlensError(
            f"qk_fix assumes un-capped attention logits, but this model soft-caps them "
            f"(attn_logit_softcapping={text.attn_logit_softcapping}); pass qk_fix=False for plain AtP on q/k."
        )


def _drop(model: Model, layer: int) -> list[Intervention]:
    """StopGradient on layer `layer`'s writes into the residual stream (attn_out, and mlp_out if it has an MLP)."""
    kinds = ("attn_out", "mlp_out") if model.arch.mlp_out is not None else ("attn_out",)
    return [Intervention(Site(kind, layer), StopGradient()) for kind in kinds]


def _estimate(
    setup: ResolvedSpec, qk_families: list[Site], interventions: Sequence[Intervention]
) -> tuple[Tensor, Tensor]:
    """Per-variant, per-prompt estimates (n_variants, N), QK-fixed for `qk_families`, and the base metric (N,)."""
    model, plan = setup.model, setup.plan
    fo = first_order(setup, _with_qk_sites(plan, qk_families), interventions=interventions)
    effect = dict(fo.effect)
    joint = plan.variants[0].positions is None
    for family in qk_families:
        layer = family.layer
        assert layer is not None
        pattern, q, k = (Site(kind, layer) for kind in ("attn_pattern", "q", "k"))
        dtype = torch.promote_types(fo.base.cache[pattern].dtype, torch.float32)
        a = fo.base.cache[pattern].detach().to(dtype)
        g = fo.grads[pattern].to(dtype)
        q_b, k_b = (fo.base.cache[s].detach().to(dtype) for s in (q, k))
        q_s, k_s = (fo.source.cache[s].to(dtype) for s in (q, k))
        n_rep = q_b.shape[2] // k_b.shape[2]
        scale = _scale(model, layer)
        if family.kind == "q":
            effect[family] = _row_change(a, g, scale * _scores(q_s - q_b, k_b, n_rep))
        elif joint:
            effect[family] = _per_group(_row_change(a, g, scale * _scores(q_b, k_s - k_b, n_rep)), n_rep)
        else:
            effect[family] = _one_key_change(a, g, scale * _scores(q_b, k_s - k_b, n_rep), n_rep)
    return cells(plan, effect), fo.per_prompt


def _scale(model: Model, layer: int) -> float:
    """The factor the model multiplies q·k by before the softmax."""
    attn = get_module(get_blocks(model.hf, model.arch.blocks)[layer], model.arch.attn or "")
    scaling = getattr(attn, "scaling", None)
    return float(model.arch.d_head**-0.5 if scaling is None else scaling)


def _scores(queries: Tensor, keys: Tensor, n_rep: int) -> Tensor:
    """q·k per query row and key: queries (N, T, H, d), keys (N, S, G, d) → (N, T, H, S), keys shared by the
    n_rep consecutive query heads of their group."""
    return torch.einsum("bthd,bshd->bths", queries, keys.repeat_interleave(n_rep, dim=2))


def _row_change(pattern: Tensor, grad: Tensor, delta: Tensor) -> Tensor:
    """(softmax(log A_t + δ_t) − A_t)·G_t per row: pattern, grad, delta (N, T, H, S) → (N, T, H)."""
    return ((pattern.log() + delta).softmax(dim=-1) - pattern).mul(grad).sum(dim=-1)


def _one_key_change(pattern: Tensor, grad: Tensor, delta: Tensor, n_rep: int) -> Tensor:
    """Σ over rows t and the group's heads of the change of A_t·G_t when only the logit to key s moves by δ_ts.

    pattern, grad, delta (N, T, H, S) → (N, S, G). Sums over the other keys are taken without subtraction
    (exclusive prefix + suffix sums), so a key holding almost all of a row's attention stays exact.
    """
    others = _exclusive_sum(pattern)
    log_odds = pattern.log() - others.log()
    change = torch.sigmoid(log_odds + delta) - torch.sigmoid(log_odds)
    others_mean = _exclusive_sum(pattern * grad) / others.clamp_min(torch.finfo(others.dtype).tiny)
    per_key = (change * (grad - others_mean)).sum(dim=1)
    return _per_group(per_key.transpose(1, 2), n_rep)


def _exclusive_sum(x: Tensor) -> Tensor:
    """Σ_{j≠s} x_j along the last dim, as exclusive prefix + exclusive suffix sums (no cancellation)."""
    zero = torch.zeros_like(x[..., :1])
    prefix = torch.cat([zero, x[..., :-1].cumsum(dim=-1)], dim=-1)
    suffix = torch.cat([x[..., 1:].flip(-1).cumsum(dim=-1).flip(-1), zero], dim=-1)
    return prefix + suffix


def _per_group(per_head: Tensor, n_rep: int) -> Tensor:
    """(N, P, H) → (N, P, G): sum over the n_rep query heads of each key-value group."""
    return per_head.unflatten(-1, (-1, n_rep)).sum(dim=-1)
