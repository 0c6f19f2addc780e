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

Interventions on the clean side (`clean_interventions=`): the run of the clean prompts is made under them. With
clean and corrupted prompts alike, the two runs differ by the interventions alone — a steering vector's effect
(`pathlens.steering.explain`). An intervention that writes the residual stream itself (at resid_pre of a layer
after the first, resid_mid, resid_post or attn_out) is no component's output, so it becomes a sender of its own,
named "intervention:<site>", whose Δz is what it changed at that site (the site's value in the clean run minus its
value in the same run without the interventions at that site), with edges to every receiver that reads the stream
after it. Interventions elsewhere change the outputs of the components they act on, which carry them.

Two identities are tested: summed over its outgoing edges, a sender's scores equal its node-level AtP
estimate; summed over the incoming edges of the logits, they equal AtP of the final residual stream.

Spliced dictionaries (`pathlens.circuits.layout`, "Spliced dictionaries"): a transcoder's or mlp_out SAE's node
latents send Δf_i · W_dec[i] / s_out and its error node the rest of the MLP's Δ, so a family's rows plus its error
row sum to the MLP's row of the unspliced graph. A transcoder's latents also receive: the gradient at latent i's
input copy is ∂m/∂z_i · s_in W_enc[:, i] at the MLP input (z_i its pre-activation; ∂m/∂z from ∂m/∂f through the
dictionary's own activation, so TopK passes the gradient of the selected latents and JumpReLU that of the latents
above threshold), carried through the MLP's input norm in batches of latents; the error node receives the MLP
input's gradient minus the latents' share, so a family's receiver columns plus the error's sum to the MLP's column.
A residual dictionary is a bottleneck: its latents receive ∂m/∂z_i · s_in W_enc[:, i] at the stream itself, its
error node the stream's gradient minus theirs, and pairs that skip it are not edges (NaN).

Gemma 2/3 (post-sublayer norms): Δz of a head is the difference of its linearised writes (g / σ) ⊙ z_h W_O[h],
each with σ of its own run (`pathlens.circuits.layout.PostNorm`); the graph's meta says so. There a layer's heads
sum to AtP of its attn_out, and each MLP to AtP of its mlp_out; one head's sum differs from AtP of its z by the
norm's σ-derivative, which the linearisation drops.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
    latent_families,
    linearisation_meta,
    o_proj_output,
    post_norms,
    valid_mask,
)
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.interventions import Intervention, Replace
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.budget import edge_attribution_cost
from pathlens.patching.executor import Executor
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, check_option
from pathlens.sites import Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric

DEFAULT_ATTRIBUTION_BATCH_TOKENS = 4096
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
    max_batch_tokens: int | None = None,
    clean_interventions: Sequence[Intervention] = (),
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Graph:
    """Score every edge of `model`'s graph on `task` (see module docstring) → Graph (batch-mean scores).

    method: "eap" | "eap-ig" (with `steps` interpolation points, chunked to `max_batch_tokens` tokens per
    forward) | "relp" (LRP `rules`). direction: "noise" (default, `DEFAULT_DIRECTION`: what
    discovery and faithfulness patch) or "denoise". clean_interventions: applied to the run of the clean
    prompts; those writing the residual stream become senders "intervention:<site>" (see module docstring).
    max_batch_tokens: tokens per forward/backward (default `DEFAULT_ATTRIBUTION_BATCH_TOKENS`); max_memory:
    instead, the bytes the call may hold (an int or a string such as "2GB"): the (prompt, step) rows per chunk
    follow from their cost (`patching.budget.edge_attribution_cost`), scores as with `max_batch_tokens` = rows × P.
    executor: "local", "ray" or an executor object run the prompts in chunks of whole prompts, here or on workers
    (`circuits.edge_attribution_work`: bit-identical between "local" and an executor); None runs them as above.
    """
    if executor is not None:
        from pathlens.circuits.edge_attribution_work import edge_attribution_over_chunks  # it calls this function

        return edge_attribution_over_chunks(
            model,
            task,
            method,
            direction,
            metric,
            steps,
            rules,
            max_batch_tokens,
            clean_interventions,
            max_memory,
            executor,
        )
    check_option("method", method, METHODS)
    if steps < 1:
        raise PathlensError(f"steps must be at least 1, got {steps}.")
    if max_memory is not None and max_batch_tokens is not None:
        raise PathlensError("pass max_memory= (bytes) or max_batch_tokens= (tokens per forward), not both.")
    if max_batch_tokens is None:
        max_batch_tokens = DEFAULT_ATTRIBUTION_BATCH_TOKENS
    if max_batch_tokens < 1:
        raise PathlensError("max_batch_tokens must be at least 1.")
    check_supported(model)
    for iv in clean_interventions:
        if iv.rows is not None:
            raise PathlensError(
                f"edge_attribution: the clean-side intervention on {iv.site} selects rows {iv.rows}; clean-side "
                "interventions apply to every prompt (rows=None), since the engine runs prompts in chunks."
            )
    setup = PatchSpec(direction=direction, metric=metric).resolve(model, task)
    task = setup.task
    a = model.arch
    n_steps = steps if method == "eap-ig" else 1
    chosen = rules_for(rules) if method == "relp" else frozenset()
    families = latent_families(model, task)
    layout = graph_layout(model, families)
    qkv = [QKV(model, layer) for layer in range(a.n_layers)]
    base_ids, source_ids = setup.runs
    clean_side = list(clean_interventions)
    sides = (clean_side, []) if direction == "noise" else ([], clean_side)  # (base run's, source run's)
    writes = _stream_writes(model, clean_side)
    if writes and layout.cuts:
        raise PathlensError(
            f"edge_attribution: clean-side interventions that write the residual stream ({', '.join(map(str, writes))})"
            " and a residual-stream dictionary spliced at once are not supported; splice the dictionary on an MLP, "
            "or intervene on a component's output."
        )
    if max_memory is not None:
        n_senders, post = len(layout.senders) + len(writes), post_norms(model) is not None
        cost = edge_attribution_cost(model, task.n, task.seq_len, n_senders, post)
        max_batch_tokens = cost.rows_for(parse_bytes(max_memory)) * task.seq_len
    deltas, base_input, source_input = _sender_deltas(model, task, base_ids, source_ids, sides, writes, layout)

    senders = layout.senders + [f"intervention:{site}" for site in writes]
    scores = torch.zeros(len(senders), len(layout.receivers), dtype=torch.float64)
    total = n_steps * task.n
    rows_per_chunk = max(1, max_batch_tokens // task.seq_len)
    base_metric = 0.0
    for first in range(0, total, rows_per_chunk):
        rows = torch.arange(first, min(total, first + rows_per_chunk))
        prompts, step = rows // n_steps, rows % n_steps
        grads, metric_sum = _receiver_grads(
            model, task, base_ids, prompts, step, n_steps, base_input, source_input, qkv, chosen, sides[0], layout
        )
        base_metric += float(metric_sum[step == 0].sum())
        _accumulate(scores, layout, deltas, grads, prompts)
    scores /= total
    valid = torch.cat([valid_mask(layout, a.n_layers), *(_reads_after(model, layout, s)[None] for s in writes)])
    scores[~valid] = float("nan")
    return Graph(
        senders=senders,
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
            **latent_meta(layout),
        ),
    )


def latent_meta(layout: Layout) -> dict[str, object]:
    """What a Graph records about spliced dictionaries' latents as nodes: nothing without them; else `feeds` (a
    receiver whose component's output an SAE encodes — an MLP's input, a head's q/k/v — → the latent and error
    senders, read by `Graph.receiver_nodes`) and per dictionary its kind, width, node count, whether its latents
    receive (a transcoder) and the sites it reads and rebuilds."""
    spliced = [*layout.families.values(), *layout.cuts.values(), *layout.attention.values()]
    if not spliced:
        return {}
    dictionaries = {
        str(f.site): {
            "kind": str(f.dictionary.kind),
            "width": int(f.splice.width),
            "nodes": len(f.nodes),
            "transcoder": f.transcoder,
            "reads": str(f.splice.source),
            "rebuilds": str(f.splice.target),
        }
        for f in spliced
    }
    return {"feeds": dict(layout.feeds), "dictionaries": dictionaries}


_WRITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out")


def _stream_writes(model: Model, interventions: Sequence[Intervention]) -> list[Site]:
    """The residual-stream sites `interventions` act on that no sender's output carries (resid_pre of layer 0 is
    the input sender's own value), in order of first appearance."""
    sites = []
    for iv in interventions:
        site = model.resolve(iv.site, write=True)
        if site.kind in _WRITE_KINDS and site.index is None and not (site.kind == "resid_pre" and site.layer == 0):
            sites.append(site)
    return list(dict.fromkeys(sites))


def _reads_after(model: Model, layout: Layout, site: Site) -> Tensor:
    """(receivers,) bool: the receivers that read the residual stream after a write at `site`."""
    layer = int(site.layer or 0)
    reads = torch.zeros(len(layout.receivers), dtype=torch.bool)
    first_attn = layer if site.kind == "resid_pre" else layer + 1
    mlp_too = site.kind == "resid_pre" or (site.kind in ("resid_mid", "attn_out") and not model.arch.parallel)
    for at, cols in enumerate(layout.attn_cols):
        reads[cols] = at >= first_attn
        col = layout.mlp_col[at]
        if col is not None:
            reads[col] = at > layer or (at == layer and mlp_too)
        latents = layout.latent_cols.get(at)
        if latents is not None:
            reads[latents] = at > layer or (at == layer and mlp_too)
    reads[-1] = True
    return reads


def _sender_deltas(
    model: Model,
    task: Task,
    base_ids: Tensor,
    source_ids: Tensor,
    sides: tuple[list[Intervention], list[Intervention]] = ([], []),
    writes: Sequence[Site] = (),
    layout: Layout | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Δz per sender, (S, N, P, d_model), in sender order (then one per intervention write); and the base / source
    input residual streams. `sides`: the interventions of the base and the source run. A layer with a spliced
    dictionary in `layout` sends Δf_i · W_dec[i] / s_out per node latent and the rest of Δmlp_out as its error."""
    dictionaries = {} if layout is None else layout.families
    cuts = {} if layout is None else layout.cuts
    attention = {} if layout is None else layout.attention
    a = model.arch
    post = post_norms(model)
    families = [Site("resid_pre", 0)] + [Site("head_z", layer) for layer in range(a.n_layers)]
    if a.mlp is not None:
        families += [Site("mlp_out", layer) for layer in range(a.n_layers)]
    if post is not None:
        families += [o_proj_output(model, layer) for layer in range(a.n_layers)]
    families += [f.site for f in [*dictionaries.values(), *cuts.values(), *attention.values()]]
    families += [Site("resid_pre", layer) for layer in cuts] + [Site("attn_out", layer) for layer in attention]
    families += list(writes)
    mask = task.attention_mask
    base = model.run(base_ids, attention_mask=mask, cache=families, interventions=sides[0]).cache
    source = model.run(source_ids, attention_mask=mask, cache=families, interventions=sides[1]).cache
    blocks = get_blocks(model.hf, a.blocks)
    parts = [(source["L0.resid_pre"] - base["L0.resid_pre"])[None]]
    for layer in range(a.n_layers):
        cut = cuts.get(layer)
        if cut is not None:  # a residual dictionary: its latents, and the rest of the stream as its error
            resid = source[Site("resid_pre", layer)] - base[Site("resid_pre", layer)]  # (N, P, d)
            df = (source[cut.site] - base[cut.site])[..., cut.nodes].to(resid.dtype)  # (N, P, L)
            latents = torch.einsum("npl,ld->lnpd", df, cut.writes().to(resid.dtype))  # (L, N, P, d)
            parts += [latents, (resid - latents.sum(dim=0))[None]]
        w_o = output_weight_per_head(get_module(blocks[layer], a.o_proj), a.n_heads, a.d_head).detach()
        z = Site("head_z", layer)
        heads = attention.get(layer)
        if heads is not None:  # an attn_out SAE: its latents and the rest of the attention's write
            attn = source[Site("attn_out", layer)] - base[Site("attn_out", layer)]  # (N, P, d)
            df = (source[heads.site] - base[heads.site])[..., heads.nodes].to(attn.dtype)  # (N, P, L)
            latents = torch.einsum("npl,ld->lnpd", df, heads.writes().to(attn.dtype))  # (L, N, P, d)
            parts += [latents, (attn - latents.sum(dim=0))[None]]
        elif post is None:
            dz = source[z] - base[z]
            parts.append(torch.einsum("bphe,hed->hbpd", dz, w_o.to(dz.dtype)))
        else:
            o = o_proj_output(model, layer)
            norm = post[layer]
            parts.append(norm.head_writes(source[z], w_o, source[o]) - norm.head_writes(base[z], w_o, base[o]))
        if a.mlp is not None:
            mlp = source[Site("mlp_out", layer)] - base[Site("mlp_out", layer)]  # (N, P, d)
            family = dictionaries.get(layer)
            if family is None:
                parts.append(mlp[None])
                continue
            df = (source[family.site] - base[family.site])[..., family.nodes].to(mlp.dtype)  # (N, P, L)
            latents = torch.einsum("npl,ld->lnpd", df, family.writes().to(mlp.dtype))  # (L, N, P, d)
            parts += [latents, (mlp - latents.sum(dim=0))[None]]
    for site in writes:  # what the clean side's interventions at `site` changed there, signed source − base
        clean_side, clean_ids, sign = (sides[0], base_ids, -1.0) if sides[0] else (sides[1], source_ids, 1.0)
        others = [iv for iv in clean_side if model.resolve(iv.site, write=True) != site]
        without = model.run(clean_ids, attention_mask=mask, cache=[site], interventions=others).cache[site]
        clean = base if sides[0] else source
        parts.append(sign * (clean[site] - without)[None])
    return torch.cat(parts, dim=0), base["L0.resid_pre"], source["L0.resid_pre"]


@dataclass
class _Grads:
    """Per-row gradients at each receiver's input copy: attention (R_L, B, P, d) and MLP (B, P, d) per layer."""

    attn: list[Tensor]
    mlp: list[Tensor | None]
    logits: Tensor
    latents: dict[int, "_LatentGrads"]
    cuts: dict[int, "_CutGrads"]


@dataclass
class _CutGrads:
    """A residual dictionary's receivers for one chunk of rows: ∂m/∂z (B, P, L) of its node latents, their encoder
    directions (d, L), and the gradient at the error node's input copy (B, P, d) (no norm in between)."""

    grad_z: Tensor
    encoder: Tensor
    error: Tensor


@dataclass
class _LatentGrads:
    """A transcoder layer's node latents as receivers for one chunk of rows: ∂m/∂z (B, P, L) of each node
    latent's pre-activation, its encoder directions (d, L), and the graph from the residual stream `resid` to the
    MLP input `mlp_in` (both (B, P, d), from the run) through which each latent's input gradient is carried."""

    grad_z: Tensor
    encoder: Tensor
    mlp_in: Tensor
    resid: Tensor


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
    base_interventions: Sequence[Intervention] = (),
    layout: Layout | None = None,
) -> tuple[_Grads, Tensor]:
    """One forward/backward on rows (prompt, step): gradients of Σ rows' metric at every receiver input, with
    `base_interventions` (the base run's, for all its rows) applied. At a transcoder layer of `layout` the latents
    receive ∂m/∂z_i · s_in W_enc[:, i] at the MLP input (z_i the pre-activation, the dictionary's own activation
    derivative) and the error node the rest of the MLP input's gradient."""
    receiving = {} if layout is None else {k: f for k, f in layout.families.items() if f.transcoder}
    cuts = {} if layout is None else layout.cuts
    a = model.arch
    last = a.n_layers - 1
    interventions = list(base_interventions)
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
    families += [f.site for f in [*receiving.values(), *cuts.values()]]
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
    wanted += [run.cache[f.site] for f in receiving.values()]
    wanted += [run.cache[s] for c, f in cuts.items() for s in (f.site, Site("resid_pre", c))]
    raw = torch.autograd.grad(per_row.sum(), wanted, retain_graph=True, allow_unused=True)
    got = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, raw, strict=True)]
    logits_grad, cursor = got[0], 1
    attn: list[Tensor] = []
    mlp: list[Tensor | None] = []
    latents: dict[int, _LatentGrads] = {}
    first_cut = len(got) - 2 * len(cuts)
    latent_grads = dict(zip(receiving, got[first_cut - len(receiving) : first_cut], strict=True))
    cut_grads: dict[int, _CutGrads] = {}
    for (c, family), g_f, g_resid in zip(cuts.items(), got[first_cut::2], got[first_cut + 1 :: 2], strict=True):
        grad_z = family.pre_activation_grads(run.cache[Site("resid_pre", c)], g_f)  # (B, P, L)
        encoder = family.encoder().to(grad_z.dtype)  # (d, L)
        cut_grads[c] = _CutGrads(grad_z, encoder, g_resid - (grad_z @ encoder.T).to(g_resid.dtype))
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
        mlp_in, resid, at_mlp = run.cache[Site("mlp_in", layer)], run.cache[Site(mlp_input_kind, layer)], got[cursor]
        transcoder = receiving.get(layer)
        if transcoder is not None:
            grad_z = transcoder.pre_activation_grads(mlp_in, latent_grads[layer])  # (B, P, L)
            encoder = transcoder.encoder().to(grad_z.dtype)  # (d, L)
            latents[layer] = _LatentGrads(grad_z, encoder, mlp_in, resid)
            at_mlp = at_mlp - (grad_z @ encoder.T).to(at_mlp.dtype)  # the error node: what the latents do not carry
        (g_mlp,) = torch.autograd.grad(mlp_in, resid, grad_outputs=at_mlp, retain_graph=True)
        cursor += 1
        mlp.append(g_mlp)
    return _Grads(attn, mlp, logits_grad, latents, cut_grads), per_row.detach()


def _accumulate(scores: Tensor, layout: Layout, deltas: Tensor, grads: _Grads, prompts: Tensor) -> None:
    """Add Σ_rows Δz_u · g_v for every edge: rows' gradients are summed per prompt, then dotted with Δ. Rows of
    `deltas` after the layout's senders (intervention writes) are scored against every receiver; the caller
    masks the receivers that do not read them."""
    n = len(layout.senders)
    first, last = int(prompts.min()), int(prompts.max()) + 1
    local = prompts - first
    d = deltas[:, first:last].flatten(1)  # (S, N'·P·d): every edge block is one matrix product

    def per_prompt(g: Tensor) -> Tensor:  # (..., B, P, d) -> (..., N'·P·d)
        out = torch.zeros(*g.shape[:-3], last - first, *g.shape[-2:], dtype=g.dtype)
        return out.index_add_(out.ndim - 3, local, g).flatten(-3)

    for layer, cols in enumerate(layout.attn_cols):
        stop = layout.sender_stop[layer]
        g_attn = per_prompt(grads.attn[layer])
        scores[:stop, cols] += (d[:stop] @ g_attn.T).double()
        scores[n:, cols] += (d[n:] @ g_attn.T).double()
        col = layout.mlp_col[layer]
        mlp_grad = grads.mlp[layer]
        if col is not None and mlp_grad is not None:
            stop = layout.mlp_sender_stop[layer]
            g_mlp = per_prompt(mlp_grad)
            scores[:stop, col] += (d[:stop] @ g_mlp).double()
            scores[n:, col] += (d[n:] @ g_mlp).double()
    scores[:, -1] += (d @ per_prompt(grads.logits)).double()
    for layer, lg in grads.latents.items():
        cols, stop = layout.latent_cols[layer], layout.mlp_sender_stop[layer]
        moving = torch.nonzero(lg.grad_z.flatten(0, -2).ne(0).any(dim=0))[:, 0]  # latents with a gradient here
        chunk = max(1, LATENT_GRAD_ELEMENTS // max(1, lg.mlp_in.numel()))
        for first_latent in range(0, len(moving), chunk):
            picked = moving[first_latent : first_latent + chunk]
            at_input = torch.einsum("bpl,dl->lbpd", lg.grad_z[..., picked], lg.encoder[:, picked])  # (C, B, P, d)
            (g,) = torch.autograd.grad(
                lg.mlp_in, lg.resid, grad_outputs=at_input.to(lg.mlp_in.dtype), retain_graph=True, is_grads_batched=True
            )
            g_lat = per_prompt(g)  # (C, N'·P·d)
            columns = cols.start + picked
            scores[:stop, columns] += (d[:stop] @ g_lat.T).double()
            scores[n:, columns] += (d[n:] @ g_lat.T).double()

    for layer, cg in grads.cuts.items():  # a residual dictionary's receivers read the stream itself: no norm
        cols, stop = layout.cut_cols[layer], layout.cut_stop[layer]
        rows = torch.cat([torch.arange(stop), torch.arange(n, d.shape[0])])
        n_latents = cg.grad_z.shape[-1]
        grad_z = torch.zeros(last - first, *cg.grad_z.shape[1:], dtype=cg.grad_z.dtype)
        grad_z.index_add_(0, local, cg.grad_z)  # (N', P, L) per prompt
        senders = d[rows].view(len(rows), -1, cg.encoder.shape[0])  # (R, N'·P, d)
        projected = senders @ cg.encoder.to(senders.dtype)  # (R, N'·P, L)
        latent_cols = torch.arange(cols.start, cols.start + n_latents)
        scores[rows[:, None], latent_cols[None]] += (projected * grad_z.flatten(0, 1)[None]).sum(dim=1).double()
        scores[rows, cols.stop - 1] += (d[rows] @ per_prompt(cg.error)).double()


LATENT_GRAD_ELEMENTS = 1 << 24  # elements of one batch of latent receivers' input gradients (64 MiB in float32)
