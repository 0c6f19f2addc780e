"""Exact edge patching: run the model with chosen edges of its graph replaced, many circuits per forward.

In the graph of `pathlens.graph.Graph` every receiver (a head's q/k/v input, an MLP's input, the logits)
reads the sum of the senders before it. Patching the edges *outside* a circuit gives each receiver v its own
input

    in_v = resid − Σ_{u : (u, v) not kept} (z_u − z_u^src)

where resid and z_u are the values of the running (patched) forward and z_u^src is the sender's output in
the source run (corrupted prompts: interchange ablation), its mean over the prompts ("mean") or 0 ("zero").
A head's q/k/v input goes through the model's own attention-input norm and that head's slice of the q/k/v
projection; an MLP's input through its own norm; the logits read the final residual stream plus its
correction. Nothing else of the model is recomputed by pathlens: the hooks rewrite the projection outputs,
the MLP input and the last block's output, and the model does the rest. A row whose receivers at a q/k/v
projection or MLP keep no edge there reads the source residual, so it is left out of that module's call and
gets the module's output on the source input, computed once per patcher: sparse circuits cost little more
than the layers they touch.

Rows of one forward are (circuit, prompt) pairs, so a curve over circuit sizes costs a few batched forwards
(chunked to `max_batch_tokens`, or to the rows a `max_memory=` budget allows: `patching.budget.edge_patch_cost`).
`tests/test_circuits.py` checks single-edge patches against an explicit
recomputation of the receiver's input, and that keeping every edge gives the clean run and keeping none the
corrupted run.

Spliced dictionaries (`pathlens.circuits.layout`, "Spliced dictionaries"): a transcoder's node latents each read
their own input (f_i of the normed, corrected MLP input) and its error node is the MLP's own call, so the layer's
output is MLP(x_e) + Σ_nodes (f_i(x_i) − f_i(x_e)) W_dec[i] / s_out (`_RunState._latent_output`); an mlp_out
SAE's latents are encoded from the MLP's own output; a residual dictionary replaces the next layer's input with
Σ_nodes f_i(x_i) W_dec[i] / s_out + x_e − Σ_nodes f_i(x_e) W_dec[i] / s_out (`_RunState._cut_input`), and the
receivers after it give zero weight to the senders before it (`Layout.read_from`). D of a latent is
(f_i − f_i^src) W_dec[i] / s_out. `tests/test_feature_edges.py` checks random circuits against a fixed-point
reference built from `model.run` interventions.

Gemma 2/3 (post-sublayer norms): a head's z_u is its linearised write (g / σ) ⊙ z_h W_O[h], σ held at its value
in each run — the running row's σ for the patched forward, read from that row's own output projection
(`pathlens.circuits.layout.PostNorm`). Each run's residual stream is still the sum of its senders' writes, so
keeping every edge gives the clean run and keeping none the corrupted run exactly; a sender patched on all its
outgoing edges differs from patching that node (`pathlens.patch`) by the norm's change of σ, which the
linearisation holds fixed. MLPs write their post-norm's output and need nothing of this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pathlens.arch.base import get_blocks, get_module, output_weight_per_head
from pathlens.arch.calls import first_output, hidden_input, with_first_output, with_hidden_input
from pathlens.circuits.layout import (
    QKV,
    LatentFamily,
    PostNorm,
    check_supported,
    graph_layout,
    latent_families,
    o_proj_output,
    post_norms,
)
from pathlens.errors import PathlensError
from pathlens.hooks import HookSession
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.budget import edge_patch_cost
from pathlens.patching.spec import DEFAULT_DIRECTION, runs_for
from pathlens.patching.sweep import scored_view
from pathlens.sites import Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric

ABLATIONS = ("patch", "mean", "zero")
DEFAULT_EDGE_BATCH_TOKENS = 512


class EdgePatcher:
    """Edge-patched runs of `task` on `model`: `metric(kept)` for circuits `kept` (K, S, R) bool → (K,).

    direction "noise" (default, `DEFAULT_DIRECTION`): the clean prompts run, removed edges carry the corrupted
    senders (or their mean / zero with `ablation`); "denoise": the reverse. max_batch_tokens: tokens per forward
    (default `DEFAULT_EDGE_BATCH_TOKENS`); max_memory: instead, the bytes the patcher may hold (an int or a string
    such as "2GB"), its source state included: the rows per forward follow from its per-row cost
    (`patching.budget.edge_patch_cost`), and the results are those of `max_batch_tokens` = rows × P.
    """

    def __init__(
        self,
        model: Model,
        task: Task,
        ablation: str = "patch",
        direction: str = DEFAULT_DIRECTION,
        metric: Metric | None = None,
        max_batch_tokens: int | None = None,
        max_memory: int | str | None = None,
    ):
        if ablation not in ABLATIONS:
            raise PathlensError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}.")
        check_supported(model)
        task.check_vocab(model.vocab_size)
        a = model.arch
        if a.attn_norm is None or (a.mlp is not None and a.mlp_norm is None):
            raise PathlensError(
                f"edge patching calls the attention / MLP input norms; {a.family}'s ArchMap names none "
                "(pass attn_norm= and mlp_norm=)."
            )
        self.model, self.max_memory = model, None if max_memory is None else parse_bytes(max_memory)
        self.layout = graph_layout(model, latent_families(model, task))
        self.max_batch_tokens = self._batch_tokens(task, max_batch_tokens, max_memory)
        self.metric = metric or task.metric
        self.task = task.with_metric(self.metric)  # type: ignore[arg-type]
        self.qkv = [QKV(model, layer) for layer in range(a.n_layers)]
        blocks = get_blocks(model.hf, a.blocks)
        self.w_o = [output_weight_per_head(get_module(b, a.o_proj), a.n_heads, a.d_head).detach() for b in blocks]
        self.direction = direction
        self.base_ids, source_ids = runs_for(task, direction)
        self.ablation, self.source_ids = ablation, source_ids
        source_task_ids = self.base_ids if ablation != "patch" else source_ids
        families = [Site("resid_pre", 0)] + [Site("head_z", layer) for layer in range(a.n_layers)]
        families += [Site("mlp_out", layer) for layer in range(a.n_layers)] if a.mlp is not None else []
        residuals = [Site("resid_pre", layer) for layer in range(1, a.n_layers)] + [Site("resid_post", a.n_layers - 1)]
        residuals += [Site("resid_mid", layer) for layer in range(a.n_layers)] if a.mlp and not a.parallel else []
        self.post = post_norms(model)
        projections = [] if self.post is None else [o_proj_output(model, layer) for layer in range(a.n_layers)]
        spliced = [*self.layout.families.values(), *self.layout.cuts.values(), *self.layout.attention.values()]
        latents = [f.site for f in spliced] + [Site("attn_out", layer) for layer in self.layout.attention]
        scored = torch.unique(task.answer_pos)
        run = model.run(
            source_task_ids,
            attention_mask=task.attention_mask,
            cache=families + residuals + projections + latents,
            logits_at=scored,
        )
        self.source = {family: self._ablated(run.cache[family]) for family in families}
        head_writes = self._head_writes(run.cache)
        self.source_writes = [self._ablated(w.transpose(0, 1)).transpose(0, 1).flatten(2) for w in head_writes]
        self._buffer = torch.empty(0)
        self.source_resid = self._source_residuals(run.cache, head_writes)
        self.source_normed = self._normed_source_residuals(blocks)
        self._latent_sources(run.cache)
        self._known: dict[str, Tensor] = {}
        self._source_metric = self._mean_metric(
            run.logits[torch.arange(task.n), torch.searchsorted(scored, task.answer_pos)]
        )

    def _batch_tokens(self, task: Task, max_batch_tokens: int | None, max_memory: int | str | None) -> int:
        """Tokens per forward: `max_batch_tokens`, or the rows `max_memory` allows times P (`edge_patch_cost`)."""
        if max_memory is None:
            return max(1, DEFAULT_EDGE_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens)
        if max_batch_tokens is not None:
            raise PathlensError("pass max_memory= (bytes) or max_batch_tokens= (tokens per forward), not both.")
        n_senders = len(self.layout.senders)
        cost = edge_patch_cost(self.model, task.n, task.seq_len, n_senders, post_norms(self.model) is not None)
        return cost.rows_for(parse_bytes(max_memory)) * task.seq_len

    def _mean_metric(self, answer_logits: Tensor) -> float:
        """Batch-mean metric of logits (N, V) at each prompt's answer position."""
        return float(self.metric(answer_logits[:, None], scored_view(self.task, torch.arange(self.task.n), 1)).mean())  # type: ignore[misc]

    def _ablated(self, value: Tensor) -> Tensor:
        """A sender's source value from its value in the source run: itself, its prompt mean, or zero."""
        if self.ablation == "mean":
            return value.mean(dim=0, keepdim=True).expand_as(value)
        if self.ablation == "zero":
            return torch.zeros_like(value)
        return value

    def _normed_source_residuals(self, blocks: Any) -> dict[tuple[str, int], Tensor]:
        """The attention and MLP inputs (N, P, d) of each layer when no edge into them is kept: the source
        residual through that layer's own norm, keyed ("attn" | "mlp", layer)."""
        a, layout = self.model.arch, self.layout
        out = {}
        with torch.no_grad():
            for layer in range(a.n_layers):
                block = blocks[layer]
                norm = get_module(block, a.attn_norm or "")
                out[("attn", layer)] = norm(self.source_resid[layout.sender_stop[layer]])
                if a.mlp is not None:
                    norm = get_module(block, a.mlp_norm or "")
                    out[("mlp", layer)] = norm(self.source_resid[layout.mlp_sender_stop[layer]])
        return out

    def _latent_sources(self, cache: dict[Site, Tensor]) -> None:
        """Per spliced layer: its node latents' writes W_dec[i] / s_out (L, d), their source values (N, P, L) and
        the error node's source write (N, P, d) (ablated like every sender); for a transcoder also the node
        latents of the normed source residual (N, P, L), what a latent with no kept edge reads."""
        self.latent_writes: dict[int, Tensor] = {}
        self.latent_source: dict[int, Tensor] = {}
        self.error_source: dict[int, Tensor] = {}
        self.latent_read_source: dict[int, Tensor] = {}
        for layer, family in self.layout.families.items():
            mlp = cache[Site("mlp_out", layer)]
            writes = family.writes().to(mlp.dtype)
            f = cache[family.site][..., family.nodes].to(mlp.dtype)  # (N, P, L)
            self.latent_writes[layer] = writes
            self.latent_source[layer] = self._ablated(f)
            self.error_source[layer] = self._ablated(mlp - f @ writes)
            if family.transcoder:
                self.latent_read_source[layer] = family.values(self.source_normed[("mlp", layer)])
        self.attention_writes: dict[int, Tensor] = {}
        self.attention_source: dict[int, Tensor] = {}
        self.attention_error_source: dict[int, Tensor] = {}
        for layer, family in self.layout.attention.items():
            attn = cache[Site("attn_out", layer)]
            writes = family.writes().to(attn.dtype)
            f = cache[family.site][..., family.nodes].to(attn.dtype)  # (N, P, L)
            self.attention_writes[layer] = writes
            self.attention_source[layer] = self._ablated(f)
            self.attention_error_source[layer] = self._ablated(attn - f @ writes)
        self.cut_writes: dict[int, Tensor] = {}
        self.cut_source: dict[int, Tensor] = {}
        self.cut_error_source: dict[int, Tensor] = {}
        self.cut_read_source: dict[int, Tensor] = {}
        for layer, family in self.layout.cuts.items():
            resid = cache[Site("resid_pre", layer)]
            writes = family.writes().to(resid.dtype)
            f = cache[family.site][..., family.nodes].to(resid.dtype)  # (N, P, L)
            self.cut_writes[layer] = writes
            self.cut_source[layer] = self._ablated(f)
            self.cut_error_source[layer] = self._ablated(resid - f @ writes)
            self.cut_read_source[layer] = family.values(self.source_resid[self.layout.cut_stop[layer]])

    def known_output(self, path: str, reads: tuple[str, int]) -> Tensor:
        """Output (N, P, ·) of the row-wise module at `path` (an MLP, a q/k/v projection) on the normed source
        input `source_normed[reads]`: what a row whose receivers there have no kept edge gets, so that row can
        be left out of the module's call. Computed once per patcher, outside any edge-patched forward
        (`_RunState` asks before its forward starts)."""
        if path not in self._known:
            with torch.no_grad():
                self._known[path] = first_output(get_module(self.model.hf, path)(self.source_normed[reads]))
        return self._known[path]

    def _head_writes(self, cache: dict[Site, Tensor]) -> list[Tensor]:
        """With post-attention norms, each layer's linearised head writes (H, N, P, d) in the source run (σ of
        that run); otherwise none (a head's write is z_h W_O[h], computed where needed)."""
        if self.post is None:
            return []
        model = self.model
        return [
            norm.head_writes(cache[Site("head_z", layer)], self.w_o[layer], cache[o_proj_output(model, layer)])
            for layer, norm in enumerate(self.post)
        ]

    def _source_residuals(self, cache: dict[Site, Tensor], head_writes: list[Tensor]) -> dict[int, Tensor]:
        """The residual stream (N, P, d) that receivers read when no edge is kept, keyed by how many senders it
        holds (a `Layout` stop): Σ_u z_u^src plus what no sender writes (biases such as the attention output
        bias), i.e. the source run's residual R − Σ_u z_u + Σ_u z_u^src. `head_writes`: the source run's
        linearised head writes per layer behind post-attention norms (`_head_writes`), else empty."""
        a = self.model.arch
        first = cache[Site("resid_pre", 0)]
        run, ablated = first, self._ablated(first)
        out: dict[int, Tensor] = {}
        for layer in range(a.n_layers):
            resid = first if layer == 0 else cache[Site("resid_pre", layer)]
            if layer in self.layout.cuts:  # after a residual dictionary the stream is its latents and error alone
                out[self.layout.cut_stop[layer]] = resid - run + ablated
                run, ablated = resid, self._ablated(resid)
            out[self.layout.sender_stop[layer]] = resid - run + ablated
            before_heads = (run, ablated)
            if layer in self.layout.attention:  # its senders (latents and error) write the attention's whole output
                heads = cache[Site("attn_out", layer)]
            elif self.post is None:
                heads = torch.einsum("bphe,hed->bpd", cache[Site("head_z", layer)], self.w_o[layer].to(first.dtype))
            else:
                heads = head_writes[layer].sum(dim=0)
            run, ablated = run + heads, ablated + self._ablated(heads)
            if a.mlp is None:
                continue
            if a.parallel:
                out[self.layout.mlp_sender_stop[layer]] = resid - before_heads[0] + before_heads[1]
            else:
                out[self.layout.mlp_sender_stop[layer]] = cache[Site("resid_mid", layer)] - run + ablated
            mlp = cache[Site("mlp_out", layer)]
            run, ablated = run + mlp, ablated + self._ablated(mlp)
        out[self.n_senders] = cache[Site("resid_post", a.n_layers - 1)] - run + ablated
        return out

    @property
    def n_senders(self) -> int:
        return len(self.layout.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.layout.receivers)

    @property
    def source_metric(self) -> float:
        """m(∅) under interchange ablation: every edge patched is the source run the patcher was built from."""
        return self._source_metric

    def metric_of(self, kept: Tensor) -> Tensor:
        """Batch-mean metric (K,) of each circuit in `kept` (K, S, R) bool (True = edge kept, not patched)."""
        if kept.ndim != 3 or tuple(kept.shape[1:]) != (self.n_senders, self.n_receivers):
            raise PathlensError(
                f"kept must have shape (circuits, {self.n_senders}, {self.n_receivers}), got {tuple(kept.shape)}."
            )
        return self.per_prompt(kept).mean(dim=1)

    def per_prompt(self, kept: Tensor) -> Tensor:
        """Metric per circuit and prompt (K, N)."""
        k = int(kept.shape[0])
        values = torch.empty(k * self.task.n, dtype=torch.float64)
        for rows in self.row_chunks(k):
            values[rows.start : rows.stop] = self.rows_metric(kept, rows)
        return values.view(k, self.task.n)

    def row_chunks(self, k: int) -> list[range]:
        """The rows of each forward `per_prompt` runs for `k` circuits, in order: row r is circuit r // N on
        prompt r % N (what an executor hands out by index, `circuits.edge_work`)."""
        total, per = k * self.task.n, max(1, self.max_batch_tokens // self.task.seq_len)
        return [range(first, min(total, first + per)) for first in range(0, total, per)]

    def rows_metric(self, kept: Tensor, rows: range) -> Tensor:
        """Metric (B,) float64 of the (circuit, prompt) rows `rows` (one of `row_chunks(len(kept))`) of circuits
        `kept` (K, S, R), in one forward."""
        n, seq_len = self.task.n, self.task.seq_len
        rows_held = min(int(kept.shape[0]) * n, max(1, self.max_batch_tokens // seq_len)) + n
        workspace = self._workspace(self.n_senders * rows_held * seq_len * self.model.arch.d_model)
        index = torch.arange(rows.start, rows.stop)
        return self._run(kept, index // n, index % n, workspace).double()

    def _workspace(self, size: int) -> Tensor:
        """A buffer of at least `size` elements for the sender differences of one chunk, kept between calls
        (at most senders × (max_batch_tokens + prompts × P) × d_model elements): a fresh one per call costs a page
        fault per 4 KiB touched, about 190,000 for one SmolLM2 curve."""
        if self._buffer.numel() < size:
            self._buffer = torch.empty(size, dtype=self.source[Site("resid_pre", 0)].dtype)
        return self._buffer

    def _run(self, kept: Tensor, circuits: Tensor, prompts: Tensor, workspace: Tensor) -> Tensor:
        """Metric (B,) of rows (circuit, prompt) `circuits`, `prompts` (B,) in one forward; `workspace` holds at
        least senders × (B + prompts) × P × d_model elements (sender differences, then the gather buffer)."""
        groups, counts = torch.unique_consecutive(circuits, return_counts=True)
        removed = (~kept[groups]).to(workspace.dtype)
        state = _RunState(self, removed, counts.tolist(), prompts, workspace)
        session = HookSession(self.model, extra_hooks=state.hooks())
        with torch.no_grad():
            picked = self.model.scored_logits(
                self.base_ids[prompts], self.task.attention_mask[prompts], session, self.task.answer_pos[prompts]
            )[:, None]
        return self.metric(picked, scored_view(self.task, prompts, 1))  # type: ignore[misc]


@dataclass
class _GroupInput:
    """Corrected inputs of one layer's receivers for one group of rows (one circuit): `base` (n, P, d) is the
    running residual, or the source residual when `from_source`; receivers `special` (C,) (offsets among the
    columns asked for) have their own inputs `values` (C, n, P, d); the others read `base`."""

    rows: slice
    from_source: bool
    base: Tensor
    special: Tensor
    values: Tensor | None


@dataclass
class _Plan:
    """How one circuit's receivers (some columns) get their inputs: from the source residual plus kept edges
    (`from_source`) or the running residual minus removed ones; `special` (C,) are the columns with such an
    edge, `weights` (C, stop) their signed edge weights from every sender before the read point and `senders`
    (A,) the senders with a nonzero weight."""

    from_source: bool
    senders: Tensor
    weights: Tensor
    special: Tensor


# Relative costs on CPU, per sender row of one group, measured with float32 SmolLM2 shapes: copying the row out
# (`_RunState._gather`) costs about two matrix-vector passes over it, and each further receiver column of the
# product adds about a quarter of one.
GATHER_COST = 2.0
COLUMN_COST = 0.25


def _gathering_pays(columns: int, senders: int, stop: int) -> bool:
    """Whether gathering `senders` rows and multiplying them beats multiplying every one of the `stop` rows
    (zero weight for the others) for a product with `columns` receiver columns."""
    product = 1.0 + COLUMN_COST * (columns - 1)
    return senders * (GATHER_COST + product) < stop * product


def cheaper_form(removed: Tensor) -> Tensor:
    """For circuits' `removed` (G, S, C) ∈ {0, 1} (senders before one read point × the columns read there):
    (G,) bool — start from the source residual and add the kept edges (True) or from the running residual and
    subtract the removed ones (False), whichever touches fewer senders."""
    kept_senders = (removed < 1).any(dim=2).sum(dim=1)
    removed_senders = (removed > 0).any(dim=2).sum(dim=1)
    return kept_senders < removed_senders


class _RunState:
    """The hooks of one edge-patched forward and what they share: sender differences D (S, B, P·d_model)
    = z_u − z_u^src filled as the forward reaches each sender, and per-layer residual inputs. Rows come in
    groups of consecutive rows that share a circuit (`counts`; `removed` (G, S, R) per group), so each group's
    correction is one matrix product over its own senders."""

    def __init__(self, patcher: EdgePatcher, removed: Tensor, counts: list[int], prompts: Tensor, workspace: Tensor):
        self.p, self.removed, self.prompts = patcher, removed, prompts
        starts = [sum(counts[:i]) for i in range(len(counts))]
        self.groups = list(zip(starts, counts, strict=True))
        a = patcher.model.arch
        b, seq_len = int(prompts.numel()), patcher.task.seq_len
        self.shape = (b, seq_len, a.d_model)
        size = patcher.n_senders * b * seq_len * a.d_model
        self.d = workspace[:size].view(patcher.n_senders, b, -1)
        self.gathered = workspace[size:]
        self.resid: dict[int, Tensor] = {}
        self.attn_out: dict[int, Tensor] = {}
        self.inputs: dict[int, list[_GroupInput]] = {}
        self.latent_values: dict[int, tuple[Tensor, Tensor]] = {}  # transcoder layer -> (f of own inputs, f of x_e)
        layout = patcher.layout
        reads: list[tuple[int, slice | int]] = [
            (layout.sender_stop[layer], layout.attn_cols[layer]) for layer in range(a.n_layers)
        ]
        reads += [
            (stop, col) for stop, col in zip(layout.mlp_sender_stop, layout.mlp_col, strict=True) if col is not None
        ]
        reads += [(layout.mlp_sender_stop[layer], cols) for layer, cols in layout.latent_cols.items()]
        reads += [(layout.cut_stop[layer], cols) for layer, cols in layout.cut_cols.items()]
        self.window = torch.tensor(layout.read_from) if layout.read_from else None
        reads.append((patcher.n_senders, len(layout.receivers) - 1))
        self.plans = {(stop, str(cols)): self._plan(stop, cols) for stop, cols in reads}
        self.left_out = self._left_out_rows()
        self.needed = torch.zeros(patcher.n_senders, dtype=torch.bool)
        self.needed[torch.cat([group.senders for plan in self.plans.values() for group in plan])] = True
        self.zeroed = 0  # senders [0, zeroed) that no circuit needs are zeroed (see `_every_sender`)

    def _left_out_rows(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per row-wise module (q/k/v projection, MLP) with rows to leave out of its call: the rows kept (K,)
        and the module's output on the source input (N, P, ·) (`EdgePatcher.known_output`) that the left-out
        rows get. A row is left out when its circuit reads the source there (`_Plan.from_source`) and keeps no
        edge into any receiver the module computes: then its input is the normed source residual."""
        a, layout = self.p.model.arch, self.p.layout
        out = {}

        def add(path: str, reads: tuple[str, int], plans: list[_Plan], first: int, stop: int) -> None:
            rows = torch.zeros(self.shape[0], dtype=torch.bool)
            for (start, n), plan in zip(self.groups, plans, strict=True):
                computes_special = bool(((plan.special >= first) & (plan.special < stop)).any())
                rows[start : start + n] = plan.from_source and not computes_special
            if rows.any():
                out[path] = (torch.nonzero(~rows)[:, 0], self.p.known_output(path, reads))

        for layer in range(a.n_layers):
            qkv, bounds = self.p.qkv[layer], _qkv_bounds(self.p.qkv[layer])
            plans = self.plans[(layout.sender_stop[layer], str(layout.attn_cols[layer]))]
            for module_index, path in enumerate(qkv.paths):
                parts = [i for i, m in enumerate(qkv.part_module) if m == module_index]
                add(path, ("attn", layer), plans, bounds[parts[0]], bounds[parts[-1] + 1])
            col = layout.mlp_col[layer]
            if col is not None:
                plans = self.plans[(layout.mlp_sender_stop[layer], str(col))]
                add(f"{a.blocks}.{layer}.{a.mlp}", ("mlp", layer), plans, 0, 1)
        return out

    def _plan(self, stop: int, cols: Any) -> list[_Plan]:
        """Per group, how receiver columns `cols` reading senders [0, stop) get their inputs (see `_Plan`)."""
        removed = self.removed[:, :stop, cols]
        if removed.ndim == 2:
            removed = removed[..., None]
        from_source = cheaper_form(removed)
        weights = torch.where(from_source[:, None, None], 1 - removed, -removed).transpose(1, 2)
        if self.window is not None:  # senders before a residual dictionary reach later receivers through it only
            first = self.window[cols].reshape(-1)  # (C,)
            weights = weights * (torch.arange(stop)[None] >= first[:, None]).to(weights.dtype)
        nonzero = weights != 0
        has_sender, has_column = nonzero.any(dim=1), nonzero.any(dim=2)
        senders = torch.nonzero(has_sender)[:, 1].split(has_sender.sum(dim=1).tolist())
        special = torch.nonzero(has_column)[:, 1].split(has_column.sum(dim=1).tolist())
        return [
            _Plan(bool(form), senders[g], weights[g, special[g]], special[g])
            for g, form in enumerate(from_source.tolist())
        ]

    def _corrected(self, x: Tensor, stop: int, cols: Any) -> list[_GroupInput]:
        """The inputs of receiver columns `cols` (a slice, or an int for one column) that read the residual `x`
        (B, P, d) holding senders [0, stop), per group of rows:

            in_v = x − Σ_{u removed} D_u  =  x^src + Σ_{u kept} D_u

        (x^src = x − Σ_{u<stop} D_u: `EdgePatcher.source_resid`). The second form starts from the source
        residual; each circuit uses whichever form sums fewer senders
        (those with any removed, resp. kept, edge into `cols`), so sparse circuits and nearly full ones both cost
        little more than the forward itself. Columns without such an edge read the form's base."""
        b, p, d = self.shape
        out = []
        for (first, n), plan in zip(self.groups, self.plans[(stop, str(cols))], strict=True):
            source = self.p.source_resid[stop]
            base = source[self.prompts[first : first + n]] if plan.from_source else x[first : first + n]
            values = None
            if plan.special.numel():
                if _gathering_pays(len(plan.special), plan.senders.numel(), stop):
                    weights = plan.weights.index_select(1, plan.senders)
                    rows = self._gather(plan.senders, first, n)
                else:
                    weights, rows = plan.weights, self._every_sender(stop, first, n)
                delta = (weights @ rows).view(-1, n, p, d)
                values = delta.add_(base[None])
            out.append(_GroupInput(slice(first, first + n), plan.from_source, base, plan.special, values))
        return out

    def _every_sender(self, stop: int, first: int, n: int) -> Tensor:
        """D of senders [0, stop) for rows [first, first + n) as (stop, n·P·d), a view. Senders that no circuit
        needs are never computed; they are zeroed here, once, so that their zero weights give zero."""
        if self.zeroed < stop:
            unset = torch.nonzero(~self.needed[self.zeroed : stop])[:, 0] + self.zeroed
            self.d.index_fill_(0, unset, 0)
            self.zeroed = stop
        return self.d[:stop, first : first + n].reshape(stop, -1)

    def _gather(self, senders: Tensor, first: int, n: int) -> Tensor:
        """D of `senders` (A,) for rows [first, first + n) as (A, n·P·d), copied into the gather buffer (whole
        rows of the contiguous (S·B, P·d) view, the fast path of `index_select`)."""
        b = self.d.shape[1]
        index = (senders[:, None] * b + torch.arange(first, first + n)[None]).flatten()
        out = self.gathered[: index.numel() * self.d.shape[2]].view(index.numel(), -1)
        return torch.index_select(self.d.view(-1, self.d.shape[2]), 0, index, out=out).view(len(senders), -1)

    def _single(self, x: Tensor, stop: int, col: int) -> list[_GroupInput]:
        """The groups of rows whose input of the one receiver column `col` reading `x` is not `x` itself."""
        return [g for g in self._corrected(x, stop, col) if g.values is not None or g.from_source]

    def hooks(self) -> list[tuple[str, str, Callable[..., Any]]]:
        a = self.p.model.arch
        out: list[tuple[str, str, Callable[..., Any]]] = []
        for layer in range(a.n_layers):
            block = f"{a.blocks}.{layer}"
            cut = self.p.layout.cuts.get(layer)
            out.append((block, "pre", self._block_input(layer) if cut is None else self._cut_input(layer, cut)))
            out.append((f"{block}.{a.attn}", "pre", self._attention_input(layer)))
            qkv = self.p.qkv[layer]
            for module_index, path in enumerate(qkv.paths):
                parts = [i for i, m in enumerate(qkv.part_module) if m == module_index]
                out += self._leave_out(path)
                out.append((path, "fwd", self._projection(layer, parts)))
            heads = self.p.layout.attention.get(layer)
            if heads is not None:
                out.append((f"{block}.{a.attn_out}", "fwd", self._attention_latents(layer, heads)))
            elif self.p.post is None:
                out.append((f"{block}.{a.o_proj}", "pre", self._head_outputs(layer)))
            else:
                out.append((f"{block}.{a.o_proj}", "fwd", self._linearised_head_outputs(layer, self.p.post[layer])))
            if a.mlp is not None:
                if not a.parallel:
                    out.append((f"{block}.{a.attn_out}", "fwd", self._record_attn_out(layer)))
                out.append((f"{block}.{a.mlp}", "pre", self._mlp_input(layer)))
                out += self._leave_out(f"{block}.{a.mlp}")
                family = self.p.layout.families.get(layer)
                output = self._mlp_output(layer) if family is None else self._latent_output(layer, family)
                out.append((f"{block}.{a.mlp_out}", "fwd", output))
        out.append((f"{a.blocks}.{a.n_layers - 1}", "fwd", self._final()))
        return out

    def _block_input(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = hidden_input(args, kwargs)
            self.resid[layer] = x
            if layer == 0:
                self.d[0] = (x - self.p.source[Site("resid_pre", 0)][self.prompts]).flatten(1)

        return hook

    def _attention_input(self, layer: int) -> Callable[..., Any]:
        a = self.p.model.arch
        norm = get_module(get_blocks(self.p.model.hf, a.blocks)[layer], a.attn_norm or "")

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            """Rows of circuits built from the source residual enter attention as its norm (so the model's own
            projections give every receiver without its own input); receivers with their own input are left
            to `_projection`. Source rows with no such receiver here are left out of the projections."""
            stop, cols = self.p.layout.sender_stop[layer], self.p.layout.attn_cols[layer]
            self.inputs.clear()  # the previous layer's receiver inputs are consumed (its projections ran): free them
            groups = self._corrected(self.resid[layer], stop, cols)
            for g in groups:
                g.values = None if g.values is None else norm(g.values)
            self.inputs[layer] = groups
            sourced = [g for g in groups if g.from_source and g.values is not None]
            if not sourced:
                return None
            hidden = hidden_input(args, kwargs).clone()
            normed = self.p.source_normed[("attn", layer)]
            for g in sourced:
                hidden[g.rows] = normed[self.prompts[g.rows]]
            return with_hidden_input(args, kwargs, hidden)

        return hook

    def _projection(self, layer: int, parts: list[int]) -> Callable[..., Any]:
        """Rewrites one q/k/v projection's output (B, P, out) in place (the patcher runs without grad): every
        receiver with its own input gets its head's slice of the projection of that input; the rest keep the
        model's own values."""
        qkv = self.p.qkv[layer]
        bounds = _qkv_bounds(qkv)

        def hook(module: Any, args: tuple[Any, ...], output: Tensor) -> None:
            groups = self.inputs[layer]
            for g in groups:
                if g.values is None:
                    continue
                rows = output[g.rows]
                edges = torch.searchsorted(g.special, torch.tensor(bounds)).tolist()
                for part in parts:
                    first, stop = edges[part], edges[part + 1]
                    if first == stop:
                        continue
                    receivers = g.special[first:stop] - bounds[part]
                    values = qkv.project(part, g.values[first:stop], receivers)
                    rows[..., qkv.cols[part][receivers].flatten()] = values.permute(1, 2, 0, 3).flatten(-2)

        return hook

    def _head_outputs(self, layer: int) -> Callable[..., Any]:
        a = self.p.model.arch
        first = self.p.layout.sender_stop[layer]

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            heads = torch.nonzero(self.needed[first : first + a.n_heads])[:, 0]
            if not heads.numel():
                return
            z = args[0].unflatten(-1, (a.n_heads, a.d_head))
            dz = (z - self.p.source[Site("head_z", layer)][self.prompts]).flatten(0, 1).transpose(0, 1)
            w_o = self.p.w_o[layer].to(dz.dtype)
            if heads.numel() == a.n_heads:
                torch.bmm(dz, w_o, out=self.d[first : first + a.n_heads].view(a.n_heads, -1, a.d_model))
            else:
                self.d[first + heads] = torch.bmm(dz[heads], w_o[heads]).view(len(heads), *self.d.shape[1:])

        return hook

    def _linearised_head_outputs(self, layer: int, norm: PostNorm) -> Callable[..., Any]:
        """D of the heads behind a post-attention norm: their linearised writes with σ of this row's own output
        projection, minus their writes in the source run."""
        a = self.p.model.arch
        first = self.p.layout.sender_stop[layer]

        def hook(module: Any, args: tuple[Any, ...], output: Tensor) -> None:
            heads = torch.nonzero(self.needed[first : first + a.n_heads])[:, 0]
            if not heads.numel():
                return
            z = args[0].unflatten(-1, (a.n_heads, a.d_head))[:, :, heads]
            writes = norm.head_writes(z, self.p.w_o[layer][heads], output).flatten(2)
            source = self.p.source_writes[layer][heads[:, None], self.prompts[None]]
            self.d[first + heads] = writes - source

        return hook

    def _record_attn_out(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            self.attn_out[layer] = first_output(output)

        return hook

    def _mlp_input(self, layer: int) -> Callable[..., Any]:
        a = self.p.model.arch
        norm = get_module(get_blocks(self.p.model.hf, a.blocks)[layer], a.mlp_norm or "")

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            """Rows with a kept or removed edge into the MLP get their own input; rows that read only the source
            residual are left out of the call (`_leave_out`)."""
            col = self.p.layout.mlp_col[layer]
            stop = self.p.layout.mlp_sender_stop[layer]
            x = self.resid[layer] if a.parallel else self.resid[layer] + self.attn_out[layer]
            groups = self._corrected(x, stop, col)
            corrected = [g for g in groups if g.values is not None]
            normed = [norm(g.values[0]) for g in corrected]  # type: ignore[index]
            family = self.p.layout.families.get(layer)
            if family is not None and family.transcoder:
                self._latent_inputs(layer, family, x, hidden_input(args, kwargs), groups, normed, norm)
            if not corrected:
                return None
            new = hidden_input(args, kwargs).clone()
            for g, value in zip(corrected, normed, strict=True):
                new[g.rows] = value
            return with_hidden_input(args, kwargs, new)

        return hook

    def _latent_inputs(
        self,
        layer: int,
        family: LatentFamily,
        x: Tensor,
        running: Tensor,
        groups: list[_GroupInput],
        normed: list[Tensor],
        norm: Any,
    ) -> None:
        """A transcoder layer's node latents (B, P, L), each of its own input, and the node latents of the error
        node's input x_e (the MLP call's input): `running` is the MLP input of the running residual `x`, `groups`
        and `normed` the error column's groups and their corrected, normed inputs."""
        source_normed = self.p.source_normed[("mlp", layer)]
        x_error = running.clone()
        corrected = iter(normed)
        for g in groups:
            if g.values is not None:
                x_error[g.rows] = next(corrected)
            elif g.from_source:
                x_error[g.rows] = source_normed[self.prompts[g.rows]]
        f = family.values(running)  # (B, P, L): every latent reading the running residual
        for g in self._corrected(x, self.p.layout.mlp_sender_stop[layer], self.p.layout.latent_cols[layer]):
            if g.from_source:
                f[g.rows] = self.p.latent_read_source[layer][self.prompts[g.rows]]
            if g.values is not None:
                own = family.own_values(norm(g.values), g.special)  # (C, n, P)
                f[g.rows, :, g.special] = own.permute(1, 2, 0)
        self.latent_values[layer] = (f, family.values(x_error))

    def _leave_out(self, path: str) -> list[tuple[str, str, Callable[..., Any]]]:
        """Hooks that call the row-wise module at `path` on the rows `_left_out_rows` keeps only and give the
        others the module's known output on the source input; none when no row is left out."""
        if path not in self.left_out:
            return []
        keep, known = self.left_out[path]

        def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return with_hidden_input(args, kwargs, hidden_input(args, kwargs)[keep])

        def fwd(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            return with_first_output(output, known[self.prompts].index_copy_(0, keep, first_output(output)))

        return [(path, "pre", pre), (path, "fwd", fwd)]

    def _mlp_output(self, layer: int) -> Callable[..., Any]:
        sender = self.p.layout.senders.index(f"L{layer}.mlp")

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            if self.needed[sender]:
                self.d[sender] = (first_output(output) - self.p.source[Site("mlp_out", layer)][self.prompts]).flatten(1)

        return hook

    def _cut_input(self, layer: int, family: LatentFamily) -> Callable[..., Any]:
        """The input of layer `layer` behind a residual dictionary: Σ_nodes f_i(x_i) W_dec[i] / s_out plus the
        error node's x_e − Σ_nodes f_i(x_e) W_dec[i] / s_out, each latent of its own input x_i and the error of
        its own x_e (the stream before the dictionary, corrected for the circuit's edges into them). Fills D of
        the needed latent senders and of the error node."""
        stop, cols = self.p.layout.cut_stop[layer], self.p.layout.cut_cols[layer]
        n_latents = len(family.nodes)
        rows = slice(stop, stop + n_latents)

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = hidden_input(args, kwargs)  # (B, P, d)
            writes = self.p.cut_writes[layer]  # (L, d)
            f, x_error = family.values(x), x.clone()  # (B, P, L): every latent reading the running stream
            for g in self._corrected(x, stop, cols):
                if g.from_source:
                    f[g.rows] = self.p.cut_read_source[layer][self.prompts[g.rows]]
                    x_error[g.rows] = g.base
                if g.values is None:
                    continue
                latent = g.special < n_latents
                if bool(latent.any()):
                    own = family.own_values(g.values[latent], g.special[latent])  # (C, n, P)
                    f[g.rows, :, g.special[latent]] = own.permute(1, 2, 0)
                if not bool(latent.all()):
                    x_error[g.rows] = g.values[-1]  # the error node is the last column
            error = x_error - family.values(x_error) @ writes
            new = f @ writes + error
            self.resid[layer] = new
            needed = torch.nonzero(self.needed[rows])[:, 0]
            if needed.numel():
                df = f[..., needed] - self.p.cut_source[layer][self.prompts][..., needed]  # (B, P, C)
                self.d[stop + needed] = torch.einsum("bpc,cd->cbpd", df, writes[needed]).flatten(2)
            if self.needed[rows.stop]:
                self.d[rows.stop] = (error - self.p.cut_error_source[layer][self.prompts]).flatten(1)
            return with_hidden_input(args, kwargs, new)

        return hook

    def _attention_latents(self, layer: int, family: LatentFamily) -> Callable[..., Any]:
        """D of an attn_out SAE's needed senders from the attention's own output: each node latent's
        (f_i − f_i^src) W_dec[i] / s_out and the error node's write (the rest of the output) minus its source."""
        rows = self.p.layout.attention_rows[layer]

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            out = first_output(output)  # (B, P, d)
            writes = self.p.attention_writes[layer]  # (L, d)
            f = family.values(out)  # (B, P, L)
            needed = torch.nonzero(self.needed[rows])[:, 0]
            if needed.numel():
                df = f[..., needed] - self.p.attention_source[layer][self.prompts][..., needed]  # (B, P, C)
                self.d[rows.start + needed] = torch.einsum("bpc,cd->cbpd", df, writes[needed]).flatten(2)
            if self.needed[rows.stop]:
                error = out - f @ writes
                self.d[rows.stop] = (error - self.p.attention_error_source[layer][self.prompts]).flatten(1)

        return hook

    def _latent_output(self, layer: int, family: LatentFamily) -> Callable[..., Any]:
        """The output of a layer whose MLP write is split into node latents and an error node: for a transcoder,
        MLP(x_e) + Σ_nodes (f_i(x_i) − f_i(x_e)) W_dec[i] / s_out (each latent of its own input, the error node of
        the MLP call's); for an mlp_out SAE the MLP's own output, encoded. Fills D of the needed latent senders
        ((f_i − f_i^src) W_dec[i] / s_out) and of the error node (its write minus its source write)."""
        rows = self.p.layout.latent_rows[layer]

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            out = first_output(output)  # (B, P, d)
            writes = self.p.latent_writes[layer]  # (L, d)
            if family.transcoder:
                f, f_error = self.latent_values.pop(layer)
                error = out - f_error @ writes
                new = error + f @ writes
            else:
                f, new = family.values(out), None
                error = out - f @ writes
            needed = torch.nonzero(self.needed[rows])[:, 0]
            if needed.numel():
                df = f[..., needed] - self.p.latent_source[layer][self.prompts][..., needed]  # (B, P, C)
                self.d[rows.start + needed] = torch.einsum("bpc,cd->cbpd", df, writes[needed]).flatten(2)
            if self.needed[rows.stop]:
                self.d[rows.stop] = (error - self.p.error_source[layer][self.prompts]).flatten(1)
            return None if new is None else with_first_output(output, new)

        return hook

    def _final(self) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            x = first_output(output)
            changed = self._single(x, self.p.n_senders, len(self.p.layout.receivers) - 1)
            if not changed:
                return None
            new = x.clone()
            for g in changed:
                new[g.rows] = g.base if g.values is None else g.values[0]
            return with_first_output(output, new)

        return hook


def _qkv_bounds(qkv: QKV) -> list[int]:
    """Offsets of the q, k and v receivers among one layer's attention columns: [0, H, H + G, H + 2G]."""
    return [0, qkv.h, qkv.h + qkv.g, qkv.h + 2 * qkv.g]
