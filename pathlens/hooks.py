"""The one mechanism that reads and writes sites: a `HookSession` that exists only inside a run.

On entry it registers PyTorch hooks on the real modules (and, for query/key/value/pattern sites, routes the
transformers attention-function interface through `_attention` for the duration); on exit — also after an
exception or KeyboardInterrupt — it removes every hook and restores the attention setting, so the model is
left exactly as it was.

Each site kind is handled at one hook point, where its value exists in the model's computation, in the
site layout (batch, pos, ...):

    embed           forward hook, embedding module          (b, p, d_model)
    resid_pre[L]    forward pre-hook, block L               (b, p, d_model)
    resid_post[L]   forward hook, block L                   (b, p, d_model)
    attn_out[L]     forward hook, the attention's residual contribution   (b, p, d_model)
    resid_mid[L]    derived: resid_pre + attn_out; a write changes attn_out by the difference
    head_z[L]       forward pre-hook, output projection (its input)       (b, p, H, d_head)
    head[L]         derived in the output projection's forward hook: z_h @ W_O[h]  (b, p, H, d_model);
                    a write adds sum_h(new_h - old_h) to the projection's output (exact: it is linear)
    q/k/v[L]        the attention function's inputs (after rotary / q-k norms)  (b, p, H or G, d_head)
    attn_pattern[L] the attention probabilities, (b, p_query, H, p_key); a write recomputes the head outputs
    attn_in[L]      forward pre-hook, attention (its hidden-states input)  (b, p, d_model)
    mlp_in[L]       forward pre-hook, MLP                   (b, p, d_model)
    mlp_post[L]     forward pre-hook, MLP down projection   (b, p, d_mlp)
    mlp_out[L]      forward hook, the MLP's residual contribution  (b, p, d_model)
    logits          forward hook, unembedding               (b, p, vocab)
    module:path     forward hook, that module (first output if a tuple)

At a hook point the interventions on that site family run first, in the order given, then the reads are
stored (a cached value is what the model used downstream). With `grad=True`, derived sites (head,
resid_mid) are spliced into the graph with `x + (y - y.detach())`, and reshaped reads are handed back to the
model, which leaves every value bit-identical while making ∂metric/∂y available through
`torch.autograd.grad`. Take gradients with respect to a family (`L9.head`) and index the result: an indexed
read (`L9.H6`) is a view the model does not use, so it receives no gradient.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pathlens.arch.base import get_module, output_weight_per_head
from pathlens.arch.calls import first_output, hidden_input, with_first_output, with_hidden_input
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Selection, resolve_index
from pathlens.sites import Site

if TYPE_CHECKING:
    from pathlens.model import Model

ATTN_IMPL = "pathlens"
_ATTN_SESSIONS: dict[int, tuple["HookSession", int, Callable[..., tuple[Tensor, Tensor]]]] = {}
_ATTN_KINDS = ("q", "k", "v", "attn_pattern")
_INDEXED_AXIS = 2


def _register_attention_interface(original: str) -> str:
    """Register 'pathlens-<original>' with transformers: our attention function, with the mask builder of the
    model's own implementation, so that reading q/k/v leaves the computation exactly as it was."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if original not in ("eager", "sdpa"):
        raise PathlensError(
            f"q/k/v/pattern sites need the 'eager' or 'sdpa' attention implementation, but this model uses "
            f"{original!r}; load it with attn_implementation='sdpa'."
        )
    name = f"{ATTN_IMPL}-{original}"
    AttentionInterface.register(name, _attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _additive_mask(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor:
    """An additive float mask (b|1, 1, q, k) for eager attention from an sdpa-style mask (bool or None=causal)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    if mask is None:
        q_len, k_len = query.shape[-2], key.shape[-2]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def _eager_function(module: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise PathlensError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file, so pathlens cannot "
            "read queries/keys/values/patterns of this model; the other sites still work."
        )
    return fn


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """The 'pathlens' attention implementation: the model's own eager attention, with q/k/v/pattern hooks.

    query (b, H, p, d_head), key/value (b, G, p, d_head) as transformers passes them; returns
    (attn_output (b, p, H, d_head), attn_weights (b, H, p_q, p_k)).
    """
    entry = _ATTN_SESSIONS.get(id(module))
    if entry is None:
        raise PathlensError("pathlens attention was called outside a pathlens run; reload the model.")
    session, layer, own = entry
    query = session.process(Site("q", layer), query.transpose(1, 2)).transpose(1, 2)
    key = _process_new_positions(session, Site("k", layer), key)
    value = _process_new_positions(session, Site("v", layer), value)
    pattern_site = Site("attn_pattern", layer)
    constant_pattern = "AH" in session.rules
    if not session.wants(pattern_site) and not constant_pattern:
        return own(module, query, key, value, attention_mask, *args, **kwargs)
    eager = _eager_function(module)
    out, weights = eager(module, query, key, value, _additive_mask(attention_mask, query, key), *args, **kwargs)
    new = session.process(pattern_site, weights.transpose(1, 2)).transpose(1, 2)
    if session.writes_to(pattern_site) or constant_pattern or session.grad:
        probs = new.detach() if constant_pattern else new
        n_rep = query.shape[1] // value.shape[1]
        out = torch.matmul(probs.to(value.dtype), _repeat_kv(value, n_rep)).transpose(1, 2).contiguous()
    if constant_pattern and not session.writes_to(pattern_site):
        # the AH rule changes gradients only: the value is the model's own attention output, bit for bit
        reference = own(module, query, key, value, attention_mask, *args, **kwargs)[0]
        out = reference.detach() + (out - out.detach())
    return out, new


def _process_new_positions(session: "HookSession", family: Site, states: Tensor) -> Tensor:
    """Process keys/values (b, G, p, d); with a key/value cache only the run's own (last seq_len) positions
    are the site — the cached prefix comes from an earlier run and is left as it is."""
    if not session.wants(family):
        return states
    prefix = states.shape[2] - session.seq_len
    new = session.process(family, states[:, :, prefix:].transpose(1, 2)).transpose(1, 2)
    return torch.cat([states[:, :, :prefix], new], dim=2) if prefix else new


@dataclass
class _Write:
    intervention: Intervention
    sel: Selection | None = None


@dataclass
class HookSession:
    """Hooks for one run: `reads` to cache and `interventions` to apply, for a batch of (batch, seq_len).

    `extra_hooks` — (module path, "pre" | "fwd", hook) — let an engine that is not a site intervention (edge
    patching) hook the model through the same registration and guaranteed removal.
    """

    model: "Model"
    reads: Sequence[Site]
    interventions: Sequence[Intervention]
    batch: int
    seq_len: int
    grad: bool = False
    cache_device: torch.device | str | None = None
    cache_dtype: torch.dtype | None = None
    record_blocks: bool = False
    rules: frozenset[str] = frozenset()
    extra_hooks: Sequence[tuple[str, str, Callable[..., Any]]] = ()
    cache: dict[Site, Tensor] = field(default_factory=dict)
    block_calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    _writes: dict[Site, list[_Write]] = field(default_factory=dict)
    _reads: dict[Site, list[Site]] = field(default_factory=dict)
    _resid_pre: dict[int, Tensor] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)

    def __post_init__(self) -> None:
        for site in self.reads:
            self._reads.setdefault(site.family, []).append(site)
        for iv in self.interventions:
            sel = Selection(
                rows=resolve_index(iv.rows, self.batch, f"rows of the intervention on {iv.site}"),
                positions=resolve_index(iv.positions, self.seq_len, f"positions of the intervention on {iv.site}"),
                full_batch=self.batch,
                full_len=self.seq_len,
            )
            self._writes.setdefault(iv.site.family, []).append(_Write(iv, sel))

    def wants(self, family: Site) -> bool:
        return family in self._reads or family in self._writes

    def writes_to(self, family: Site) -> bool:
        return family in self._writes

    def process(self, family: Site, value: Tensor) -> Tensor:
        """Apply this family's interventions to `value` (site layout), then cache its reads; return the value."""
        writes = self._writes.get(family)
        if writes:
            value = value.clone()
            for w in writes:
                value = self._apply(w, value)
        for site in self._reads.get(family, ()):
            self._store(site, value)
        return value

    def _apply(self, w: _Write, value: Tensor) -> Tensor:
        iv, sel = w.intervention, w.sel
        assert sel is not None
        rows, pos = sel.rows.to(value.device)[:, None], sel.positions.to(value.device)[None, :]
        if value.shape[0] != self.batch or value.shape[1] != self.seq_len:
            raise PathlensError(
                f"{iv.site}: its value has shape {tuple(value.shape)}, not "
                f"(batch={self.batch}, pos={self.seq_len}, ...); "
                "rows and positions only apply to sites laid out (batch, pos, ...)."
            )
        index: tuple[Any, ...] = (rows, pos) if iv.site.index is None else (rows, pos, iv.site.index)
        full = value if iv.site.index is None else value.select(_INDEXED_AXIS, iv.site.index)
        x = value[index]
        new = iv.op.apply(x, full, sel)
        if new.shape != x.shape:
            raise PathlensError(
                f"{type(iv.op).__name__} on {iv.site} produced shape {tuple(new.shape)}, expected {tuple(x.shape)} "
                "(selected rows x positions x the site's own dims)."
            )
        value[index] = new.to(value.dtype)
        return value

    def _store(self, site: Site, value: Tensor) -> None:
        v = value if site.index is None else value.select(_INDEXED_AXIS, site.index)
        if not self.grad:
            v = v.detach()
        if self.cache_device is not None or self.cache_dtype is not None:
            v = v.to(device=self.cache_device or v.device, dtype=self.cache_dtype or v.dtype)
        self.cache[site] = v

    # ---- registration -------------------------------------------------------------------------------

    def __enter__(self) -> "HookSession":
        try:
            self._register()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _hook(self, module: nn.Module, kind: str, fn: Callable[..., Any]) -> None:
        if kind == "pre":
            handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        else:
            handle = module.register_forward_hook(fn)
        self._stack.callback(handle.remove)

    def _register(self) -> None:
        arch, root = self.model.arch, self.model.hf
        families = set(self._reads) | set(self._writes)
        blocks = get_module(root, arch.blocks)
        if self.record_blocks:
            for layer, block in enumerate(blocks):
                self._hook(block, "pre", self._record_hook(layer))
        attn_layers: set[int] = set()
        if self.rules:
            self._register_rules(blocks, attn_layers)
        for fam in sorted(families, key=str):
            if fam.kind == "embed":
                self._hook(get_module(root, arch.embed), "fwd", self._output_hook(fam))
            elif fam.kind == "logits":
                self._hook(get_module(root, arch.unembed), "fwd", self._output_hook(fam))
            elif fam.kind == "module":
                self._hook(get_module(root, fam.path or ""), "fwd", self._output_hook(fam))
            else:
                assert fam.layer is not None
                self._register_layer_site(fam, blocks[fam.layer], attn_layers)
        if attn_layers:
            self._route_attention(blocks)
        for path, kind, fn in self.extra_hooks:
            self._hook(get_module(root, path), kind, fn)

    def _register_rules(self, blocks: nn.ModuleList, attn_layers: set[int]) -> None:
        """LRP rules (`pathlens.attribution.lrp`), registered before the site hooks so that a site read at the
        same module sees the value and gradient the rest of the model sees."""
        from pathlens.attribution.lrp import rule_hooks

        if "AH" in self.rules:
            if self.model.arch.qkv != "interface":
                raise PathlensError(
                    f"the AH rule needs attention through the transformers attention interface, which "
                    f"{self.model.arch.family} does not use; drop 'AH' from rules=."
                )
            attn_layers.update(range(len(blocks)))
        for module, kind, fn in rule_hooks(self.model, self.rules):
            self._hook(module, kind, fn)

    def _register_layer_site(self, fam: Site, block: nn.Module, attn_layers: set[int]) -> None:
        arch, layer = self.model.arch, fam.layer
        assert layer is not None
        if fam.kind == "resid_pre":
            self._hook(block, "pre", self._block_input_hook(layer))
        elif fam.kind == "resid_post":
            self._hook(block, "fwd", self._output_hook(fam))
        elif fam.kind == "attn_out":
            if not self.wants(Site("resid_mid", layer)):
                self._hook(get_module(block, arch.attn_out), "fwd", self._attn_out_hook(layer))
        elif fam.kind == "resid_mid":
            if not self.wants(Site("resid_pre", layer)):
                self._hook(block, "pre", self._block_input_hook(layer))
            self._hook(get_module(block, arch.attn_out), "fwd", self._attn_out_hook(layer))
        elif fam.kind == "head_z":
            self._hook(get_module(block, arch.o_proj), "pre", self._first_input_hook(fam, split_heads=True))
        elif fam.kind == "head":
            self._hook(get_module(block, arch.o_proj), "fwd", self._head_hook(layer, get_module(block, arch.o_proj)))
        elif fam.kind == "attn_in":
            self._hook(get_module(block, arch.attn or arch.attn_out), "pre", self._hidden_input_hook(fam))
        elif fam.kind == "mlp_in":
            self._hook(get_module(block, arch.mlp or ""), "pre", self._first_input_hook(fam, split_heads=False))
        elif fam.kind == "mlp_post":
            self._hook(get_module(block, arch.mlp_down or ""), "pre", self._first_input_hook(fam, split_heads=False))
        elif fam.kind == "mlp_out":
            self._hook(get_module(block, arch.mlp_out or ""), "fwd", self._output_hook(fam))
        elif fam.kind in _ATTN_KINDS:
            if arch.qkv == "interface":
                attn_layers.add(layer)
            else:
                self._register_projection_site(fam, block)

    def _register_projection_site(self, fam: Site, block: nn.Module) -> None:
        """q/k/v as outputs of the projection layers; patterns read from the attention module's output."""
        arch = self.model.arch
        assert arch.qkv_proj is not None and arch.attn is not None
        if fam.kind == "attn_pattern":
            self._hook(get_module(block, arch.attn), "fwd", self._pattern_output_hook(fam))
            return
        path = arch.qkv_proj["qkv".index(fam.kind)]
        self._hook(get_module(block, path), "fwd", self._output_hook(fam, split_heads=True))

    def _route_attention(self, blocks: nn.ModuleList) -> None:
        """Send every layer's attention through `_attention` (layers without attention sites pass through)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        arch, config = self.model.arch, self.model.hf.config
        previous = config._attn_implementation
        routed = _register_attention_interface(previous)
        for layer in range(len(blocks)):
            attn = get_module(blocks[layer], arch.attn or "")
            own = ALL_ATTENTION_FUNCTIONS.get_interface(previous, _eager_function(attn))
            _ATTN_SESSIONS[id(attn)] = (self, layer, own)
            self._stack.callback(_ATTN_SESSIONS.pop, id(attn), None)
        config._attn_implementation = routed
        self._stack.callback(setattr, config, "_attn_implementation", previous)

    # ---- hook functions -----------------------------------------------------------------------------

    def _feeds_back(self, fam: Site) -> bool:
        """Whether the processed value must replace the model's: when written, or when read with gradients
        (a reshaped view the model never uses would receive no gradient)."""
        return fam in self._writes or (self.grad and fam in self._reads)

    def _output_hook(self, fam: Site, split_heads: bool = False) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            out = first_output(output)
            shaped = out.unflatten(-1, (-1, self.model.arch.d_head)) if split_heads else out
            new = self.process(fam, shaped)
            if not self._feeds_back(fam):
                return None
            return with_first_output(output, new.flatten(-2) if split_heads else new)

        return hook

    def _first_input_hook(self, fam: Site, split_heads: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0]
            shaped = x.unflatten(-1, (self.model.arch.n_heads, -1)) if split_heads else x
            new = self.process(fam, shaped)
            if not self._feeds_back(fam):
                return None
            return ((new.flatten(-2) if split_heads else new), *args[1:]), kwargs

        return hook

    def _record_hook(self, layer: int) -> Callable[..., Any]:
        """Keep the arguments the model passes block `layer` (masks, rotary embeddings, KV cache), so that a
        later run can call the block itself with exactly what the model would pass (the causal cone)."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.block_calls[layer] = (args, dict(kwargs))

        return hook

    def _block_input_hook(self, layer: int) -> Callable[..., Any]:
        return self._hidden_input_hook(Site("resid_pre", layer))

    def _hidden_input_hook(self, fam: Site) -> Callable[..., Any]:
        """A module's hidden-states input, passed positionally or as `hidden_states=` (blocks, attention)."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            new = self.process(fam, hidden_input(args, kwargs))
            if fam.kind == "resid_pre":
                assert fam.layer is not None
                self._resid_pre[fam.layer] = new
            if not self._feeds_back(fam):
                return None
            return with_hidden_input(args, kwargs, new)

        return hook

    def _attn_out_hook(self, layer: int) -> Callable[..., Any]:
        attn_fam, mid_fam = Site("attn_out", layer), Site("resid_mid", layer)

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            attn = self.process(attn_fam, first_output(output))
            changed = attn_fam in self._writes
            if self.wants(mid_fam):
                pre = self._resid_pre[layer]
                if mid_fam in self._writes:
                    attn, changed = self.process(mid_fam, pre + attn) - pre, True
                elif self.grad:
                    mid = self.process(mid_fam, (pre + attn).detach().requires_grad_())
                    attn, changed = attn + (mid - mid.detach()), True
                else:
                    self.process(mid_fam, pre + attn)
            return with_first_output(output, attn) if changed else None

        return hook

    def _head_hook(self, layer: int, o_proj: nn.Module) -> Callable[..., Any]:
        fam = Site("head", layer)
        arch = self.model.arch

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            z = args[0].unflatten(-1, (arch.n_heads, arch.d_head))
            w_o = output_weight_per_head(o_proj, arch.n_heads, arch.d_head)
            heads = torch.einsum("bphd,hde->bphe", z, w_o.to(z.dtype))
            new = self.process(fam, heads)
            if fam in self._writes:
                return output + (new - heads).sum(dim=2)
            if self.grad:
                total = new.sum(dim=2)
                return output.detach() + (total - total.detach())
            return None

        return hook

    def _pattern_output_hook(self, fam: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            self.process(fam, output[1].transpose(1, 2))
            return None

        return hook
