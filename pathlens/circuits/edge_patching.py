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
the MLP input and the last block's output, and the model does the rest.

Rows of one forward are (circuit, prompt) pairs, so a curve over circuit sizes costs a few batched forwards
(chunked to `max_batch_tokens`). `tests/test_circuits.py` checks single-edge patches against an explicit
recomputation of the receiver's input, and that keeping every edge gives the clean run and keeping none the
corrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pathlens.arch.base import get_module, output_weight_per_head
from pathlens.attribution.atp import Metric, runs_for
from pathlens.attribution.edges import QKV, check_supported, graph_layout
from pathlens.errors import PathlensError
from pathlens.hooks import HookSession, _first, _with_first
from pathlens.model import Model
from pathlens.patching.sweep import scored_view
from pathlens.sites import Site
from pathlens.tasks.base import Task

ABLATIONS = ("patch", "mean", "zero")
DEFAULT_EDGE_BATCH_TOKENS = 512


class EdgePatcher:
    """Edge-patched runs of `task` on `model`: `metric(kept)` for circuits `kept` (K, S, R) bool → (K,).

    direction "noise" (default): the clean prompts run, removed edges carry the corrupted senders (or their
    mean / zero with `ablation`); "denoise": the reverse.
    """

    def __init__(
        self,
        model: Model,
        task: Task,
        ablation: str = "patch",
        direction: str = "noise",
        metric: Metric | None = None,
        max_batch_tokens: int = DEFAULT_EDGE_BATCH_TOKENS,
    ):
        if ablation not in ABLATIONS:
            raise PathlensError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}.")
        check_supported(model)
        a = model.arch
        if a.attn_norm is None or (a.mlp is not None and a.mlp_norm is None):
            raise PathlensError(
                f"edge patching calls the attention / MLP input norms; {a.family}'s ArchMap names none "
                "(pass attn_norm= and mlp_norm=)."
            )
        self.model, self.max_batch_tokens = model, max(1, max_batch_tokens)
        self.metric = metric or task.metric
        self.task = task.with_metric(self.metric)  # type: ignore[arg-type]
        self.layout = graph_layout(model)
        self.qkv = [QKV(model, layer) for layer in range(a.n_layers)]
        blocks = get_module(model.hf, a.blocks)
        self.w_o = [output_weight_per_head(get_module(b, a.o_proj), a.n_heads, a.d_head).detach() for b in blocks]
        self.base_ids, source_ids = runs_for(task, direction)
        self.ablation, self.source_ids = ablation, source_ids
        source_task_ids = self.base_ids if ablation != "patch" else source_ids
        families = [Site("resid_pre", 0)] + [Site("head_z", layer) for layer in range(a.n_layers)]
        families += [Site("mlp_out", layer) for layer in range(a.n_layers)] if a.mlp is not None else []
        cache = model.run(source_task_ids, attention_mask=task.attention_mask, cache=families).cache
        self.source: dict[Site, Tensor] = {}
        for family in families:
            value = cache[family]
            if ablation == "mean":
                value = value.mean(dim=0, keepdim=True).expand_as(value)
            elif ablation == "zero":
                value = torch.zeros_like(value)
            self.source[family] = value

    @property
    def n_senders(self) -> int:
        return len(self.layout.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.layout.receivers)

    def endpoints(self) -> tuple[float, float]:
        """(m(M), m(∅)): every edge kept is the unpatched base run; with interchange ablation, no edge kept is
        the source run — both plain forwards. Mean / zero ablation need an edge-patched run for m(∅)."""
        task = self.task
        full = float(task.score(self.model.run(self.base_ids, attention_mask=task.attention_mask).logits).mean())
        if self.ablation == "patch":
            source = self.model.run(self.source_ids, attention_mask=task.attention_mask)
            return full, float(task.score(source.logits).mean())
        none = torch.zeros(1, self.n_senders, self.n_receivers, dtype=torch.bool)
        return full, float(self.metric_of(none)[0])

    def metric_of(self, kept: Tensor) -> Tensor:
        """Batch-mean metric (K,) of each circuit in `kept` (K, S, R) bool (True = edge kept, not patched)."""
        if kept.ndim != 3 or tuple(kept.shape[1:]) != (self.n_senders, self.n_receivers):
            raise PathlensError(
                f"kept must have shape (circuits, {self.n_senders}, {self.n_receivers}), got {tuple(kept.shape)}."
            )
        return self.per_prompt(kept).mean(dim=1)

    def per_prompt(self, kept: Tensor) -> Tensor:
        """Metric per circuit and prompt (K, N)."""
        n, seq_len = self.task.n, self.task.seq_len
        k = int(kept.shape[0])
        total = k * n
        values = torch.empty(total, dtype=torch.float64)
        rows_per_chunk = max(1, self.max_batch_tokens // seq_len)
        for first in range(0, total, rows_per_chunk):
            rows = torch.arange(first, min(total, first + rows_per_chunk))
            values[rows] = self._run(kept, rows // n, rows % n).double()
        return values.view(k, n)

    def _run(self, kept: Tensor, circuits: Tensor, prompts: Tensor) -> Tensor:
        removed = (~kept[circuits]).to(self.source[Site("resid_pre", 0)].dtype)
        state = _RunState(self, removed, prompts)
        session = HookSession(
            self.model, [], [], batch=int(prompts.numel()), seq_len=self.task.seq_len, extra_hooks=state.hooks()
        )
        with torch.no_grad():
            picked = self.model.scored_logits(
                self.base_ids[prompts], self.task.attention_mask[prompts], session, self.task.answer_pos[prompts]
            )[:, None]
        return self.metric(picked, scored_view(self.task, prompts, 1))  # type: ignore[misc]


class _RunState:
    """The hooks of one edge-patched forward and what they share: sender differences D (B, S, P·d_model)
    = z_u − z_u^src filled as the forward reaches each sender (laid out so that every receiver's correction is
    one batched matrix product over a prefix of senders), and per-layer residual inputs."""

    def __init__(self, patcher: EdgePatcher, removed: Tensor, prompts: Tensor):
        self.p, self.removed, self.prompts = patcher, removed, prompts
        a = patcher.model.arch
        b, seq_len = int(prompts.numel()), patcher.task.seq_len
        self.shape = (b, seq_len, a.d_model)
        self.d = torch.empty(b, patcher.n_senders, seq_len * a.d_model, dtype=removed.dtype)
        self.resid: dict[int, Tensor] = {}
        self.attn_out: dict[int, Tensor] = {}
        self.inputs: dict[int, Tensor] = {}

    def _delta(self, stop: int, cols: Any) -> Tensor:
        """−Σ_u removed[u, v] D_u for senders [0, stop) and receiver columns `cols`: (B, R, P, d), or (B, P, d)
        for a single column."""
        b, p, d = self.shape
        rem = self.removed[:, :stop, cols]
        single = rem.ndim == 2
        weights = -(rem[:, None, :] if single else rem.transpose(1, 2))
        out = torch.bmm(weights, self.d[:, :stop]).view(b, -1, p, d)
        return out[:, 0] if single else out

    def hooks(self) -> list[tuple[str, str, Callable[..., Any]]]:
        a = self.p.model.arch
        out: list[tuple[str, str, Callable[..., Any]]] = []
        for layer in range(a.n_layers):
            block = f"{a.blocks}.{layer}"
            out.append((block, "pre", self._block_input(layer)))
            out.append((f"{block}.{a.attn}", "pre", self._attention_input(layer)))
            qkv = self.p.qkv[layer]
            for module_index, path in enumerate(qkv.paths):
                parts = [i for i, m in enumerate(qkv.part_module) if m == module_index]
                out.append((path, "fwd", self._projection(layer, parts)))
            out.append((f"{block}.{a.o_proj}", "pre", self._head_outputs(layer)))
            if a.mlp is not None:
                if not a.parallel:
                    out.append((f"{block}.{a.attn_out}", "fwd", self._record_attn_out(layer)))
                out.append((f"{block}.{a.mlp}", "pre", self._mlp_input(layer)))
                out.append((f"{block}.{a.mlp_out}", "fwd", self._mlp_output(layer)))
        out.append((f"{a.blocks}.{a.n_layers - 1}", "fwd", self._final()))
        return out

    def _block_input(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            self.resid[layer] = x
            if layer == 0:
                self.d[:, 0] = (x - self.p.source[Site("resid_pre", 0)][self.prompts]).flatten(1)

        return hook

    def _attention_input(self, layer: int) -> Callable[..., Any]:
        a = self.p.model.arch
        norm = get_module(get_module(self.p.model.hf, a.blocks)[layer], a.attn_norm or "")

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            stop, cols = self.p.layout.sender_stop[layer], self.p.layout.attn_cols[layer]
            x = self.resid[layer]
            self.inputs[layer] = norm(x[:, None] + self._delta(stop, cols))

        return hook

    def _projection(self, layer: int, parts: list[int]) -> Callable[..., Any]:
        qkv = self.p.qkv[layer]
        bounds = [0, qkv.h, qkv.h + qkv.g, qkv.h + 2 * qkv.g]

        def hook(module: Any, args: tuple[Any, ...], output: Tensor) -> Tensor:
            y = self.inputs[layer]
            new = output.clone()
            for part in parts:
                values = qkv.project(part, y[:, bounds[part] : bounds[part + 1]].transpose(1, 2))
                new[..., qkv.cols[part].flatten()] = values.flatten(-2).to(new.dtype)
            return new

        return hook

    def _head_outputs(self, layer: int) -> Callable[..., Any]:
        a = self.p.model.arch
        first = self.p.layout.sender_stop[layer]

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            z = args[0].unflatten(-1, (a.n_heads, a.d_head))
            dz = z - self.p.source[Site("head_z", layer)][self.prompts]
            heads = torch.einsum("bphe,hed->bhpd", dz, self.p.w_o[layer].to(dz.dtype))
            self.d[:, first : first + a.n_heads] = heads.flatten(2)

        return hook

    def _record_attn_out(self, layer: int) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            self.attn_out[layer] = _first(output)

        return hook

    def _mlp_input(self, layer: int) -> Callable[..., Any]:
        a = self.p.model.arch
        norm = get_module(get_module(self.p.model.hf, a.blocks)[layer], a.mlp_norm or "")

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            col = self.p.layout.mlp_col[layer]
            stop = self.p.layout.mlp_sender_stop[layer]
            x = self.resid[layer] if a.parallel else self.resid[layer] + self.attn_out[layer]
            new = norm(x + self._delta(stop, col))
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return hook

    def _mlp_output(self, layer: int) -> Callable[..., Any]:
        sender = self.p.layout.senders.index(f"L{layer}.mlp")

        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            self.d[:, sender] = (_first(output) - self.p.source[Site("mlp_out", layer)][self.prompts]).flatten(1)

        return hook

    def _final(self) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
            x = _first(output)
            return _with_first(output, x + self._delta(self.p.n_senders, -1))

        return hook
