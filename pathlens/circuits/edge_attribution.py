"""Edge attribution: EAP, EAP-IG (inputs) and RelP scores for every edge of the model's graph in one pass.

The graph (see `pathlens.graph.Graph`): senders write into the residual stream (input, each head, each MLP);
receivers read it (each head's query, each key-value group's key and value, each MLP, the logits). A
receiver's input is the sum of the senders before it, so patching one edge u → v changes v's input by
Δz_u = z_u(source) − z_u(base), and its first-order effect is

    score(u → v) = Σ_positions Δz_u · ∂m/∂in_v          (Syed et al. 2023; batch mean over prompts)

where ∂m/∂in_v is the gradient at *that receiver's own copy* of the residual stream. On an unmodified model the
copies are not separate tensors, so the gradient of each copy is assembled from the model's own backward pass:

- heads' q/k/v: the gradient at the q/k/v projection output (read with gradients; rotary embeddings and q/k
  norms act per head, so it separates per head), times that head's slice of the projection weight, gives the
  gradient at the projection input per head; one batched vector-Jacobian product through the model's own
  attention-input norm (`torch.autograd.grad(..., is_grads_batched=True)`) carries all of them to the
  residual stream at once;
- MLPs: the gradient at the MLP input, carried through the MLP's input norm the same way;
- logits: the gradient at the final residual stream.

Methods: "eap" (gradient at the base run), "eap-ig" (gradients averaged over `steps` points on the straight
line from the base run's input residual stream toward the source run's, α_k = k/steps for k = 0..steps−1; so
steps=1 is EAP. hannamw/EAP-IG starts from the corrupted end instead: the other Riemann sum of the same
integral), and "relp" (the backward under LRP rules, `pathlens.attribution.lrp`). The default direction is
"noise" (base = clean prompts, source = corrupted; `pathlens.patching.spec.DEFAULT_DIRECTION`, the default of
every method): a score estimates m(edge corrupted) − m(clean), what circuit discovery and faithfulness
evaluation patch.

Two identities are tested: summed over its outgoing edges, a sender's scores equal its node-level AtP
estimate; summed over the incoming edges of the logits, they equal AtP of the final residual stream.

Gemma 2/3 (post-sublayer norms): Δz of a head is the difference of its linearised writes (g / σ) ⊙ z_h W_O[h],
each with σ of its own run (`pathlens.circuits.layout.PostNorm`); the graph's meta says so. There a layer's heads
sum to AtP of its attn_out, and each MLP to AtP of its mlp_out; one head's sum differs from AtP of its z by the
norm's σ-derivative, which the linearisation drops.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from pathlens.arch.base import get_blocks, get_module, output_weight_per_head
from pathlens.attribution.lrp import rule_objects, rules_for
from pathlens.circuits.layout import (
    QKV,
    Layout,
    check_supported,
    graph_layout,
    linearisation_meta,
    o_proj_output,
    post_norms,
    valid_mask,
)
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.interventions import Intervention, Replace
from pathlens.model import Model
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, check_option
from pathlens.sites import Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric

EdgeMethod = Literal["eap", "eap-ig", "relp"]
METHODS: tuple[str, ...] = get_args(EdgeMethod)


def edge_attribution(
    model: Model,
    task: Task,
    method: EdgeMethod = "eap",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    steps: int = 5,
    rules: Collection[str] | None = None,
    max_batch_tokens: int = 4096,
) -> Graph:
    """Score every edge of `model`'s graph on `task` (see module docstring) → Graph (batch-mean scores).

    method: "eap" | "eap-ig" (with `steps` interpolation points, chunked to `max_batch_tokens` tokens per
    forward) | "relp" (LRP `rules`). direction: "noise" (default, `DEFAULT_DIRECTION`: what
    discovery and faithfulness patch) or "denoise".
    """
    check_option("method", method, METHODS)
    if steps < 1:
        raise PathlensError(f"steps must be at least 1, got {steps}.")
    if max_batch_tokens < 1:
        raise PathlensError("max_batch_tokens must be at least 1.")
    check_supported(model)
    setup = PatchSpec(direction=direction, metric=metric).resolve(model, task)
    task = setup.task
    a = model.arch
    n_steps = steps if method == "eap-ig" else 1
    chosen = rules_for(rules) if method == "relp" else frozenset()
    layout = graph_layout(model)
    qkv = [QKV(model, layer) for layer in range(a.n_layers)]
    base_ids, source_ids = setup.runs
    deltas, base_input, source_input = _sender_deltas(model, task, base_ids, source_ids)

    scores = torch.zeros(len(layout.senders), len(layout.receivers), dtype=torch.float64)
    total = n_steps * task.n
    rows_per_chunk = max(1, max_batch_tokens // task.seq_len)
    base_metric = 0.0
    for first in range(0, total, rows_per_chunk):
        rows = torch.arange(first, min(total, first + rows_per_chunk))
        prompts, step = rows // n_steps, rows % n_steps
        grads, metric_sum = _receiver_grads(
            model, task, base_ids, prompts, step, n_steps, base_input, source_input, qkv, chosen
        )
        base_metric += float(metric_sum[step == 0].sum())
        _accumulate(scores, layout, deltas, grads, prompts)
    scores /= total
    scores[~valid_mask(layout, a.n_layers)] = float("nan")
    return Graph(
        senders=layout.senders,
        receivers=layout.receivers,
        scores=scores.float(),
        metric=setup.metric_name,
        method=f"{method}:{direction}",
        meta=setup.meta(
            direction=direction,
            steps=n_steps,
            rules=sorted(chosen),
            base_metric=base_metric / task.n,
            heads_per_group=a.n_heads // a.n_kv_heads,
            **linearisation_meta(model),
        ),
    )


def _sender_deltas(model: Model, task: Task, base_ids: Tensor, source_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Δz per sender, (S, N, P, d_model), in sender order; and the base / source input residual streams."""
    a = model.arch
    post = post_norms(model)
    families = [Site("resid_pre", 0)] + [Site("head_z", layer) for layer in range(a.n_layers)]
    if a.mlp is not None:
        families += [Site("mlp_out", layer) for layer in range(a.n_layers)]
    if post is not None:
        families += [o_proj_output(model, layer) for layer in range(a.n_layers)]
    base = model.run(base_ids, attention_mask=task.attention_mask, cache=families).cache
    source = model.run(source_ids, attention_mask=task.attention_mask, cache=families).cache
    blocks = get_blocks(model.hf, a.blocks)
    parts = [(source["L0.resid_pre"] - base["L0.resid_pre"])[None]]
    for layer in range(a.n_layers):
        w_o = output_weight_per_head(get_module(blocks[layer], a.o_proj), a.n_heads, a.d_head).detach()
        z = Site("head_z", layer)
        if post is None:
            dz = source[z] - base[z]
            parts.append(torch.einsum("bphe,hed->hbpd", dz, w_o.to(dz.dtype)))
        else:
            o = o_proj_output(model, layer)
            norm = post[layer]
            parts.append(norm.head_writes(source[z], w_o, source[o]) - norm.head_writes(base[z], w_o, base[o]))
        if a.mlp is not None:
            parts.append((source[Site("mlp_out", layer)] - base[Site("mlp_out", layer)])[None])
    return torch.cat(parts, dim=0), base["L0.resid_pre"], source["L0.resid_pre"]


@dataclass
class _Grads:
    """Per-row gradients at each receiver's input copy: attention (R_L, B, P, d) and MLP (B, P, d) per layer."""

    attn: list[Tensor]
    mlp: list[Tensor | None]
    logits: Tensor


def _receiver_grads(
    model: Model,
    task: Task,
    base_ids: Tensor,
    prompts: Tensor,
    step: Tensor,
    n_steps: int,
    base_input: Tensor,
    source_input: Tensor,
    qkv: list[QKV],
    rules: frozenset[str],
) -> tuple[_Grads, Tensor]:
    """One forward/backward on rows (prompt, step): gradients of Σ rows' metric at every receiver input."""
    a = model.arch
    last = a.n_layers - 1
    interventions = []
    if n_steps > 1:
        alpha = (step.double() / n_steps).to(base_input.dtype)[:, None, None]
        start = base_input[prompts]
        interventions.append(
            Intervention(Site("resid_pre", 0), Replace(start + alpha * (source_input[prompts] - start)))
        )
    mlp_input_kind = "resid_pre" if a.parallel else "resid_mid"
    families: list[Site] = [Site("resid_post", last)]
    for layer in range(a.n_layers):
        families += [Site("attn_in", layer), Site("resid_pre", layer), *qkv[layer].sites]
        if a.mlp is not None:
            families += [Site("mlp_in", layer), Site(mlp_input_kind, layer)]
    sub = task.rows(prompts)
    run = model.run(
        base_ids[prompts],
        attention_mask=task.attention_mask[prompts],
        cache=list(dict.fromkeys(families)),
        interventions=interventions,
        grad=True,
        rules=rule_objects(rules),
    )
    per_row = task.metric(run.logits, sub)
    wanted = [run.cache[Site("resid_post", last)]]
    for layer in range(a.n_layers):
        wanted += [run.cache[s] for s in qkv[layer].sites]
        if a.mlp is not None:
            wanted.append(run.cache[Site("mlp_in", layer)])
    raw = torch.autograd.grad(per_row.sum(), wanted, retain_graph=True, allow_unused=True)
    got = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, raw, strict=True)]
    logits_grad, cursor = got[0], 1
    attn: list[Tensor] = []
    mlp: list[Tensor | None] = []
    for layer in range(a.n_layers):
        n_proj = len(qkv[layer].sites)
        at_input = qkv[layer].input_grads(got[cursor : cursor + n_proj])
        cursor += n_proj
        (g_attn,) = torch.autograd.grad(
            run.cache[Site("attn_in", layer)],
            run.cache[Site("resid_pre", layer)],
            grad_outputs=at_input.movedim(2, 0).contiguous(),
            retain_graph=True,
            is_grads_batched=True,
        )
        attn.append(g_attn)
        if a.mlp is None:
            mlp.append(None)
            continue
        (g_mlp,) = torch.autograd.grad(
            run.cache[Site("mlp_in", layer)],
            run.cache[Site(mlp_input_kind, layer)],
            grad_outputs=got[cursor],
            retain_graph=True,
        )
        cursor += 1
        mlp.append(g_mlp)
    return _Grads(attn, mlp, logits_grad), per_row.detach()


def _accumulate(scores: Tensor, layout: Layout, deltas: Tensor, grads: _Grads, prompts: Tensor) -> None:
    """Add Σ_rows Δz_u · g_v for every edge: rows' gradients are summed per prompt, then dotted with Δ."""
    first, last = int(prompts.min()), int(prompts.max()) + 1
    local = prompts - first
    d = deltas[:, first:last].flatten(1)  # (S, N'·P·d): every edge block is one matrix product

    def per_prompt(g: Tensor) -> Tensor:  # (..., B, P, d) -> (..., N'·P·d)
        out = torch.zeros(*g.shape[:-3], last - first, *g.shape[-2:], dtype=g.dtype)
        return out.index_add_(out.ndim - 3, local, g).flatten(-3)

    for layer, cols in enumerate(layout.attn_cols):
        stop = layout.sender_stop[layer]
        scores[:stop, cols] += (d[:stop] @ per_prompt(grads.attn[layer]).T).double()
        col = layout.mlp_col[layer]
        mlp_grad = grads.mlp[layer]
        if col is not None and mlp_grad is not None:
            stop = layout.mlp_sender_stop[layer]
            scores[:stop, col] += (d[:stop] @ per_prompt(mlp_grad)).double()
    scores[:, -1] += (d @ per_prompt(grads.logits)).double()
