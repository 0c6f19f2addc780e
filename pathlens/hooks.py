"""The one mechanism that reads and writes sites: a `HookSession` whose hooks exist only inside its block.

On entry it registers PyTorch hooks on the real modules (and, for query/key/value/pattern sites, routes the
transformers attention-function interface through `_attention` for the duration); on exit — also after an
exception or KeyboardInterrupt — it removes every hook and restores the attention setting, so the model is
left exactly as it was. `Model.run` is one session around one forward; `Model.session` holds one across any
number of the model's own forwards (generation with a key/value cache, runs of different lengths, training).

Selections resolve per forward. A pre-hook on the wrapped model reads each call's `attention_mask`,
`past_key_values` / `cache_position` and input length: a call that continues a cached prefix of n tokens holds
positions n..n+p−1, and each row's left padding is counted, so explicit positions are each row's own token
positions. Blocks called directly (the causal-cone runner) have no such call: their selections resolve from
the value's own (batch, pos) shape. Cached reads of a call that continues the previous one are appended along
the position axis, so a session's cache holds the whole sequence (attention patterns padded with zeros for
keys not yet present).

Backward rules (e.g. LRP rules of `pathlens.attribution.lrp`) are objects with `hooks(model)` and a
`constant_attention` flag; the session registers their hooks before the site hooks and never names a rule.

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

import dataclasses
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from einops import rearrange
from torch import Tensor, nn

from pathlens.arch.base import get_blocks, get_module, output_weight_per_head
from pathlens.arch.calls import first_output, hidden_input, with_first_output, with_hidden_input
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Op, Selection, index_tensor, resolve_index
from pathlens.sites import Site, parse_site

Hook = tuple[nn.Module, str, Callable[..., Any]]


class Cache(dict[Site, Tensor]):
    """Cached activations, keyed by Site; string keys ("L3.resid_pre") work too."""

    def __getitem__(self, key: "Site | str") -> Tensor:
        site = parse_site(key)
        if not super().__contains__(site):
            raise KeyError(f"{site} was not cached in this run; cached: {[str(s) for s in self]}")
        return super().__getitem__(site)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(parse_site(key) if isinstance(key, (str, Site)) else key)


class BackwardRule(Protocol):
    """A rule that changes the backward pass only (e.g. an LRP rule): the hooks that put it in place on a model,
    and whether it needs attention probabilities held constant. The session registers what it is given."""

    @property
    def constant_attention(self) -> bool: ...

    def hooks(self, model: "Model") -> list[Hook]: ...


class Dictionary(Protocol):
    """What a spliced dictionary offers the core (e.g. a sparse autoencoder of `pathlens.features`): latents of a
    value (..., d_in) → (..., width), and the reconstruction of latents (..., width) → (..., d_out)."""

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, f: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Splice:
    """A dictionary spliced into every run of a model (`Model.splice`): it encodes the value of the site family
    `source`, and the value of `target` (the same family for an autoencoder, the MLP output for a transcoder)
    becomes decode(latents) + error. The latents are the site family `L{layer}.{name}` (one latent:
    `L{layer}.{name}.F{i}`), the error `L{layer}.{name}.err`; both read and write like any site."""

    dictionary: Dictionary
    source: Site
    target: Site
    name: str
    width: int

    @property
    def latents(self) -> Site:
        return Site("latent", self.target.layer, path=self.name)

    @property
    def error(self) -> Site:
        return Site("latent_err", self.target.layer, path=self.name)


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
    query = rearrange(session.process(Site("q", layer), rearrange(query, "b h p d -> b p h d")), "b p h d -> b h p d")
    q_len = query.shape[2]
    key = _process_new_positions(session, Site("k", layer), key, q_len)
    value = _process_new_positions(session, Site("v", layer), value, q_len)
    pattern_site = Site("attn_pattern", layer)
    constant_pattern = session.constant_attention
    if not session.wants(pattern_site) and not constant_pattern:
        return own(module, query, key, value, attention_mask, *args, **kwargs)
    eager = _eager_function(module)
    out, weights = eager(module, query, key, value, _additive_mask(attention_mask, query, key), *args, **kwargs)
    new = rearrange(session.process(pattern_site, rearrange(weights, "b h q k -> b q h k")), "b q h k -> b h q k")
    if session.writes_to(pattern_site) or constant_pattern or session.grad:
        probs = new.detach() if constant_pattern else new
        n_rep = query.shape[1] // value.shape[1]
        out = torch.matmul(probs.to(value.dtype), _repeat_kv(value, n_rep))  # (b, H, p_q, d_head)
        out = rearrange(out, "b h p d -> b p h d").contiguous()
    if constant_pattern and not session.writes_to(pattern_site):
        # constant attention changes gradients only: the value is the model's own attention output, bit for bit
        reference = own(module, query, key, value, attention_mask, *args, **kwargs)[0]
        out = reference.detach() + (out - out.detach())
    return out, new


def _process_new_positions(session: "HookSession", family: Site, states: Tensor, q_len: int) -> Tensor:
    """Process keys/values (b, G, p, d); with a key/value cache only the call's own (last q_len) positions
    are the site — the cached prefix comes from an earlier forward and is left as it is."""
    if not session.wants(family):
        return states
    prefix = states.shape[2] - q_len
    new = session.process(family, rearrange(states[:, :, prefix:], "b g p d -> b p g d"))  # (b, p, G, d_head)
    new = rearrange(new, "b p g d -> b g p d")
    return torch.cat([states[:, :, :prefix], new], dim=2) if prefix else new


@dataclass(frozen=True)
class CallContext:
    """Where one forward sits in its sequence: `batch` rows of `length` new tokens after `offset` tokens already
    in the key/value cache; per row, `pad` left-padding tokens, `real` real tokens through this call and `last`
    the absolute column of its last real token (None: no padding — every row is `offset + length` real tokens);
    `prompt` the real tokens of each row's prompt (the forward that started the sequence; None: unknown, all of
    the sequence is prompt)."""

    batch: int
    length: int
    offset: int = 0
    pad: Tensor | None = None
    real: Tensor | None = None
    last: Tensor | None = None
    prompt: Tensor | None = None

    def row_lengths(self) -> Tensor:
        """Real tokens of each row through this call (B,)."""
        return torch.full((self.batch,), self.offset + self.length) if self.real is None else self.real

    @staticmethod
    def of_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> "CallContext | None":
        """The context of a call of the wrapped model (its forward's args and kwargs), or None if it has no
        (batch, pos) token input."""
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, Tensor) or ids.ndim < 2:
            return None
        batch, length = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.ndim == 2 else None
        offset = _cached_length(kwargs, mask, length)
        if mask is None or bool(mask.all()):
            return CallContext(batch, length, offset)
        real_cells = mask.to(torch.bool)  # (B, offset + length)
        columns = torch.arange(real_cells.shape[1], device=real_cells.device)
        pad = (real_cells.cumsum(1) == 0).sum(1).cpu()  # (B,)
        last = torch.where(real_cells, columns, -1).amax(1).cpu()  # (B,)
        real = real_cells.sum(1).cpu()  # (B,)
        return CallContext(batch, length, offset, pad=pad if bool(pad.any()) else None, real=real, last=last)


def _cached_length(kwargs: dict[str, Any], mask: Tensor | None, length: int) -> int:
    """How many tokens of the sequence a call's key/value cache already holds."""
    position = kwargs.get("cache_position")
    if isinstance(position, Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    past = kwargs.get("past_key_values", kwargs.get("cache"))
    if past is not None and hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if mask is not None:
        return int(mask.shape[1]) - length
    return 0


def resolve_selection(iv: Intervention, ctx: CallContext) -> Selection | None:
    """The cells of `iv` that the call `ctx` holds, or None if it holds none of them."""
    rows = resolve_index(iv.rows, ctx.batch, f"rows of the intervention on {iv.site}")
    pos = iv.positions
    if pos is None or (isinstance(pos, str) and pos == "all"):
        cols = torch.arange(ctx.length)[None]
        return Selection(rows, cols, ctx.batch, ctx.length)
    if isinstance(pos, str):
        if pos in ("prompt", "generated"):
            return _prompt_or_generated(rows, ctx, generated=pos == "generated")
        if pos != "last":
            raise PathlensError(
                f"positions of the intervention on {iv.site}: unknown policy {pos!r}; use 'all', 'last', "
                "'prompt', 'generated', explicit positions or a slice."
            )
        if ctx.last is None:
            cols = torch.full((1, 1), ctx.offset + ctx.length - 1)
        else:
            cols = ctx.last[rows][:, None]  # (R, 1) absolute
        return _selection(rows, cols - ctx.offset, ctx)
    row_len = ctx.row_lengths()[rows]
    if isinstance(pos, slice):
        wanted = torch.arange(int(row_len.max()))[pos]
    else:
        wanted = index_tensor(pos, int(row_len.max()), f"positions of the intervention on {iv.site}")
        if wanted.numel() == 0:
            raise PathlensError(
                f"positions of the intervention on {iv.site}: empty selection; pass at least one index or None for all."
            )
    if wanted.numel() == 0:
        return None
    relative = torch.where(wanted[None] < 0, row_len[:, None] + wanted[None], wanted[None])  # (R, P')
    pad = torch.zeros(rows.numel(), dtype=torch.long) if ctx.pad is None else ctx.pad[rows]
    cols = pad[:, None] + relative - ctx.offset  # (R, P') call-local
    if ctx.pad is None and not bool((wanted < 0).any()):
        cols = cols[:1]
    return _selection(rows, cols, ctx)


def _prompt_or_generated(rows: Tensor, ctx: CallContext, generated: bool) -> Selection | None:
    """The call's cells that belong to each row's prompt, or to what was generated after it (row-relative
    positions at or past the prompt's length); padding columns belong to neither."""
    cols = torch.arange(ctx.length)[None].expand(rows.numel(), -1)  # (R, C)
    pad = torch.zeros(rows.numel(), dtype=torch.long) if ctx.pad is None else ctx.pad[rows]
    relative = ctx.offset + cols - pad[:, None]  # (R, C) each row's own token positions
    prompt = ctx.row_lengths()[rows] if ctx.prompt is None else ctx.prompt[rows]
    wanted = relative >= prompt[:, None] if generated else (relative >= 0) & (relative < prompt[:, None])
    return _selection(rows, cols, ctx, wanted)


def _selection(rows: Tensor, cols: Tensor, ctx: CallContext, wanted: Tensor | None = None) -> Selection | None:
    """A Selection of call-local `cols` (R or 1, P'), marking the cells outside the call (or not `wanted`, (R, P'))
    as absent."""
    inside = (cols >= 0) & (cols < ctx.length)
    if wanted is not None:
        inside = inside & wanted
    if not bool(inside.any()):
        return None
    present = None if bool(inside.all()) else inside.expand(rows.numel(), -1)
    return Selection(rows, cols.clamp(0, ctx.length - 1), ctx.batch, ctx.length, present)


@dataclass
class HookSession:
    """Hooks that `reads` (caches) sites and applies `interventions`, for as many forwards as run inside it.

    `model` is a `pathlens.Model`, or a plain `nn.Module` for `module:<path>` sites and extra hooks only.

    `grad_hooks` — (module, "pre" | "fwd", hook) — are backward-rule hooks, registered before the site hooks so
    that a site read at the same module sees what the rest of the model sees; `constant_attention` runs every
    layer's attention through the model's eager function with the probabilities held constant for gradients.
    `extra_hooks` — (module path, "pre" | "fwd", hook) — let an engine that is not a site intervention (edge
    patching) hook the model through the same registration and guaranteed removal. `record_blocks` keeps the
    arguments of every block call (for the causal-cone runner).
    """

    model: "Model | nn.Module"
    reads: Sequence[Site] = ()
    interventions: Sequence[Intervention] = ()
    grad: bool = False
    cache_device: torch.device | str | None = None
    cache_dtype: torch.dtype | None = None
    record_blocks: bool = False
    grad_hooks: Sequence[Hook] = ()
    constant_attention: bool = False
    extra_hooks: Sequence[tuple[str, str, Callable[..., Any]]] = ()
    cache: Cache = field(default_factory=Cache)
    block_calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    _writes: dict[Site, list[Intervention]] = field(default_factory=dict)
    _reads: dict[Site, list[Site]] = field(default_factory=dict)
    _resid_pre: dict[int, Tensor] = field(default_factory=dict)
    _stack: ExitStack = field(default_factory=ExitStack)
    _call: CallContext | None = None
    _prompt: Tensor | None = None
    _active: bool = False
    _resolved: dict[tuple[int, int, int], tuple[Intervention, Selection | None]] = field(default_factory=dict)
    _spliced: dict[Site, Splice] = field(default_factory=dict)
    _splice_sources: dict[Site, list[Splice]] = field(default_factory=dict)
    _splice_inputs: dict[Site, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for site in self.reads:
            self._reads.setdefault(site.family, []).append(site)
        for iv in self.interventions:
            self._writes.setdefault(iv.site.family, []).append(iv)
        for splice in () if isinstance(self.model, nn.Module) else self.model.splices:
            self._spliced[splice.target] = splice
            self._writes.setdefault(splice.target, [])  # the target's value is replaced (fed back to the model)
            if splice.source != splice.target:
                self._splice_sources.setdefault(splice.source, []).append(splice)
                self._reads.setdefault(splice.source, [])

    @property
    def wrapped(self) -> "Model":
        """The wrapped model (site hooks need its architecture map; a plain-module session has none)."""
        if isinstance(self.model, nn.Module):
            raise PathlensError("this session is over a plain nn.Module: only 'module:<path>' sites exist.")
        return self.model

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (inside the `with` block)."""
        return self._active

    def wants(self, family: Site) -> bool:
        return family in self._reads or family in self._writes

    def writes_to(self, family: Site) -> bool:
        return family in self._writes

    def process(self, family: Site, value: Tensor) -> Tensor:
        """Apply this family's interventions to `value` (site layout), then cache its reads; return the value.
        A family a dictionary is spliced into is first rebuilt from its latents and error (`_through`)."""
        splice = self._spliced.get(family)
        if splice is not None:
            value = self._through(splice, value)
        writes = self._writes.get(family)
        if writes:
            value = value.clone()
            for iv in writes:
                value = self._apply(iv, value)
        for site in self._reads.get(family, ()):
            self._store(site, value)
        for other in self._splice_sources.get(family, ()):
            self._splice_inputs[other.target] = value
        return value

    def _through(self, splice: Splice, value: Tensor) -> Tensor:
        """The target's `value` (b, p, d_out) rebuilt as decode(latents) + error, with the latents and the error
        processed as sites. Unwritten, the value is returned bit for bit (with `grad`, the latents and the error
        are spliced into the graph with `v + (y - y.detach())`, and the error is taken against the detached value
        so the gradient reaching the model upstream is the model's own). Written: decode(latents') + error'."""
        source = value if splice.source == splice.target else self._splice_inputs.pop(splice.target, None)
        if source is None:
            raise PathlensError(f"{splice.latents}: the value of {splice.source} did not reach its dictionary.")
        latents, error = splice.latents, splice.error
        written = latents in self._writes or error in self._writes
        if not (written or self.grad or self.wants(latents) or self.wants(error)):
            return value
        f = splice.dictionary.encode(source)  # (b, p, width)
        kept = f.clone()  # the latents site: a node of its own, so its gradient is the decoder path's alone
        if not written and not self.grad:
            self.process(latents, kept)
            if self.wants(error):
                self.process(error, value - splice.dictionary.decode(f).to(value.dtype))
            return value
        if not written:
            f_site = self.process(latents, kept)
            err_site = self.process(error, value.detach() - splice.dictionary.decode(f).to(value.dtype))
            rebuilt = splice.dictionary.decode(f_site).to(value.dtype)  # (b, p, d_out)
            return value + (rebuilt - rebuilt.detach()) + (err_site - err_site.detach())
        f_site = self.process(latents, kept)
        err_site = self.process(error, value - splice.dictionary.decode(f).to(value.dtype))
        return splice.dictionary.decode(f_site).to(value.dtype) + err_site

    def _context(self, value: Tensor) -> CallContext:
        """The current call's context; blocks called directly (no model call) take it from the value's shape."""
        if self._call is not None:
            return self._call
        return CallContext(int(value.shape[0]), int(value.shape[1]))

    def _resolve(self, iv: Intervention, ctx: CallContext) -> tuple[Intervention, Selection | None]:
        """`iv` for this call — its op cut to the call's window (`_in_window`) — and its cells; resolved once per
        (intervention, call shape)."""
        key = (id(iv), ctx.batch, ctx.length)
        hit = self._resolved.get(key)
        if hit is None:
            op = _in_window(iv.op, ctx)
            call_iv = iv if op is iv.op else Intervention(iv.site, op, iv.positions, iv.rows)
            hit = self._resolved[key] = (call_iv, resolve_selection(iv, ctx))
        return hit

    def _apply(self, intervention: Intervention, value: Tensor) -> Tensor:
        ctx = self._context(value)
        iv, sel = self._resolve(intervention, ctx)
        if value.shape[0] != ctx.batch or value.shape[1] != ctx.length:
            raise PathlensError(
                f"{iv.site}: its value has shape {tuple(value.shape)}, not "
                f"(batch={ctx.batch}, pos={ctx.length}, ...); "
                "rows and positions only apply to sites laid out (batch, pos, ...)."
            )
        if sel is None:
            return value
        cell = value.shape[2:] if iv.site.index is None else value.shape[3:]
        iv.op.check_fits(tuple(cell), str(iv.site))
        rows = sel.rows.to(value.device)[:, None]  # (R, 1)
        cols = sel.cols.to(value.device)  # (R or 1, P')
        index: tuple[Any, ...] = (rows, cols) if iv.site.index is None else (rows, cols, iv.site.index)
        full = value if iv.site.index is None else value.select(_INDEXED_AXIS, iv.site.index)
        x = value[index]  # (R, P', *rest)
        new = iv.op.apply(x, full, sel)
        if new.shape != x.shape:
            raise PathlensError(
                f"{type(iv.op).__name__} on {iv.site} produced shape {tuple(new.shape)}, expected {tuple(x.shape)} "
                "(selected rows x positions x the site's own dims)."
            )
        if sel.present is None:
            value[index] = new.to(value.dtype)
            return value
        present = sel.present.to(value.device)  # (R, P')
        cells: tuple[Any, ...] = (rows.expand_as(present)[present], cols.expand_as(present)[present])
        if iv.site.index is not None:
            cells = (*cells, iv.site.index)
        value[cells] = new[present].to(value.dtype)
        return value

    def _store(self, site: Site, value: Tensor) -> None:
        v = value if site.index is None else value.select(_INDEXED_AXIS, site.index)
        if not self.grad:
            v = v.detach()
        if self.cache_device is not None or self.cache_dtype is not None:
            v = v.to(device=self.cache_device or v.device, dtype=self.cache_dtype or v.dtype)
        earlier = self.cache.get(site)
        if self._call is not None and self._call.offset and earlier is not None and _continues(earlier, v, self._call):
            if site.kind == "attn_pattern":
                earlier = torch.nn.functional.pad(earlier, (0, v.shape[-1] - earlier.shape[-1]))
            v = torch.cat([earlier, v], dim=1)
        self.cache[site] = v

    # ---- registration -------------------------------------------------------------------------------

    def __enter__(self) -> "HookSession":
        if self._active:
            raise PathlensError("this session is already open; a HookSession is entered once at a time.")
        try:
            self._register()
        except BaseException:
            self._stack.close()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active, self._call, self._prompt = False, None, None
        self._resolved.clear()
        self._splice_inputs.clear()
        self._stack.close()

    def _hook(self, module: nn.Module, kind: str, fn: Callable[..., Any]) -> None:
        if kind == "pre":
            handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        else:
            handle = module.register_forward_hook(fn)
        self._stack.callback(handle.remove)

    def _register(self) -> None:
        families = set(self._reads) | set(self._writes)
        if isinstance(self.model, nn.Module):
            self._register_on_module(self.model, families)
            return
        arch, root = self.wrapped.arch, self.wrapped.hf
        blocks = get_blocks(root, arch.blocks)
        self._hook(root, "pre", self._call_start_hook)
        self._hook(root, "fwd", self._call_end_hook)
        if self.record_blocks:
            for layer, block in enumerate(blocks):
                self._hook(block, "pre", self._record_hook(layer))
        attn_layers: set[int] = set()
        if self.constant_attention:
            if arch.qkv != "interface":
                raise PathlensError(
                    f"constant attention (the AH rule) needs attention through the transformers attention interface, "
                    f"which {arch.family} does not use; drop 'AH' from rules=."
                )
            attn_layers.update(range(len(blocks)))
        for module, kind, fn in self.grad_hooks:
            self._hook(module, kind, fn)
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

    def _register_on_module(self, root: nn.Module, families: set[Site]) -> None:
        """A session over a plain `nn.Module` (no architecture map): `module:path` sites and extra hooks only."""
        for fam in sorted(families, key=str):
            if fam.kind != "module":
                raise PathlensError(
                    f"site {fam} needs a wrapped model (pathlens.Model); on a plain nn.Module only "
                    "'module:<path>' sites exist."
                )
            self._hook(get_module(root, fam.path or ""), "fwd", self._output_hook(fam))
        self._hook(root, "pre", self._call_start_hook)
        self._hook(root, "fwd", self._call_end_hook)
        for path, kind, fn in self.extra_hooks:
            self._hook(get_module(root, path), kind, fn)

    def _call_start_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ctx = CallContext.of_call(args, kwargs)
        if ctx is not None:
            if ctx.offset == 0:
                self._prompt = ctx.row_lengths()
            if self._prompt is not None and self._prompt.numel() == ctx.batch:
                ctx = dataclasses.replace(ctx, prompt=self._prompt)
        self._call = ctx
        self._resolved.clear()

    def _call_end_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._call = None
        self._resolved.clear()

    def _register_layer_site(self, fam: Site, block: nn.Module, attn_layers: set[int]) -> None:
        arch, layer = self.wrapped.arch, fam.layer
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
        arch = self.wrapped.arch
        assert arch.qkv_proj is not None and arch.attn is not None
        if fam.kind == "attn_pattern":
            self._hook(get_module(block, arch.attn), "fwd", self._pattern_output_hook(fam))
            return
        path = arch.qkv_proj["qkv".index(fam.kind)]
        self._hook(get_module(block, path), "fwd", self._output_hook(fam, split_heads=True))

    def _route_attention(self, blocks: nn.ModuleList) -> None:
        """Send every layer's attention through `_attention` (layers without attention sites pass through)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        arch, config = self.wrapped.arch, self.wrapped.config
        previous = str(config._attn_implementation)
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
            shaped = out.unflatten(-1, (-1, self.wrapped.arch.d_head)) if split_heads else out
            new = self.process(fam, shaped)
            if not self._feeds_back(fam):
                return None
            return with_first_output(output, new.flatten(-2) if split_heads else new)

        return hook

    def _first_input_hook(self, fam: Site, split_heads: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0]
            shaped = x.unflatten(-1, (self.wrapped.arch.n_heads, -1)) if split_heads else x
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
        arch = self.wrapped.arch

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            z = rearrange(args[0], "b p (h d) -> b p h d", h=arch.n_heads)  # (b, p, H, d_head)
            w_o = output_weight_per_head(o_proj, arch.n_heads, arch.d_head)
            heads = torch.einsum("bphd,hde->bphe", z, w_o.to(z.dtype))  # (b, p, H, d_model)
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
            self.process(fam, rearrange(output[1], "b h q k -> b q h k"))
            return None

        return hook


def _continues(earlier: Tensor, new: Tensor, ctx: CallContext) -> bool:
    """Whether `new` (a call's read) continues `earlier` (the reads so far of the same rows)."""
    return earlier.shape[0] == new.shape[0] == ctx.batch and earlier.shape[1] == ctx.offset


def _in_window(op: Op, ctx: CallContext) -> Op:
    """`op` cut to the call's positions offset..offset+length when its (batch, pos, ...) tensors cover more than the
    call (a source laid out along the whole sequence, read by a prefix forward and then by each cached step);
    tensors of the call's own length, the selected length or 1 are used as they are."""
    end = ctx.offset + ctx.length
    lengths = [
        int(t.shape[1])
        for t in (getattr(op, name) for name in op.laid_out)
        if isinstance(t, Tensor) and t.ndim >= op.laid_out_ndim and t.shape[1] != 1
    ]
    if not lengths or not all(n >= end and n > ctx.length for n in lengths):
        return op
    return op.restrict(None, slice(ctx.offset, end))
