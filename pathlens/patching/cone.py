"""Run patched variants inside their causal cone only.

A patch at layer L and position p changes nothing before layer L, and (causal attention) nothing at positions
before p. So a variant starts from the base run's block-L input at positions p.., calls the model's own blocks
L..n−1 with exactly the arguments the model passed them in the base run (recorded by the HookSession:
attention masks, rotary embeddings, position ids), sliced to positions p.., and lets attention read positions < p
from the base run's own key/value cache. Logits are computed only at the scored positions. Nothing of the model
is re-implemented except the tail (final norm → unembedding → the config's logit soft-cap), which every test
checks against the full model.

K variants of N prompts run as one batch of K·N rows; the sweep (`pathlens.patching.sweep`) sizes the chunks.

Latents of a spliced dictionary (`Model.splice`: `L6.sae.F12`, `L6.sae.err`) are sites of their splice's target:
writing them changes that site's value and nothing upstream of it. Where the target is a block's last word —
`resid_post[l]`, or `mlp_out[l]` (also a transcoder's), which the block adds to `resid_mid[l]` to make it — a
variant enters at layer l + 1 (`entry_layer`): the runner rebuilds the target from the base run's values with
the patch applied (the session's own splice, `HookSession.process`) and feeds layer l + 1 the patched stream,
`resid_post[l]` itself or `resid_mid[l]` + the patched `mlp_out[l]`. It checks on its base run that this is what
the model computes, bit for bit (the next block reads resid_post[l]; resid_post[l] = resid_mid[l] + mlp_out[l]),
and otherwise, like for every other target, starts at layer l, whose own hooks run the splice.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache

from pathlens.arch.base import get_blocks
from pathlens.arch.calls import first_output
from pathlens.hooks import HookSession, Splice
from pathlens.interventions import Intervention, Op
from pathlens.model import Model
from pathlens.sites import LAYER_KINDS, SPLICE_KINDS, Site


@dataclass
class ConePatch:
    """One variant inside a cone run: an op on `site` at absolute `positions` (None = all), on `rows` of the task."""

    site: Site
    op: Op
    positions: tuple[int, ...] | None


class ConeRunner:
    """Base run of N prompts (P tokens) with everything needed to run patched variants from any (layer, position).

    Attributes after construction: `resid_pre[L]` (N, P, d) block inputs, `calls[L]` the named arguments of
    block L, `kv` per-layer (keys, values) of the base run (None when the model keeps no cache: then only the
    layer cone is used), `answer_logits` (N, V) at the scored positions, `entries` the layer each spliced
    dictionary's latents start at (by latent family) and `entry_values` the base values that rebuild the stream
    there.
    """

    def __init__(self, model: Model, ids: Tensor, mask: Tensor | None, answer_pos: Tensor):
        self.model, self.ids, self.mask, self.answer_pos = model, ids, mask, answer_pos
        self.n, self.seq_len = int(ids.shape[0]), int(ids.shape[1])
        a = model.arch
        self.blocks = get_blocks(model.hf, a.blocks)
        reads = [Site("resid_pre", layer) for layer in range(a.n_layers)]
        entering = [sp for sp in model.splices if entry_layer(model, sp) != sp.target.layer]
        for sp in entering:
            reads += _entry_reads(sp)
        session = HookSession(model, sorted(set(reads), key=str), record_blocks=True)
        with torch.no_grad():
            self.answer_logits = model.scored_logits(ids, mask, session, answer_pos, use_cache=True).detach()
        self.resid_pre = {layer: session.cache[Site("resid_pre", layer)] for layer in range(a.n_layers)}
        self.entry_values = {site: session.cache[site] for sp in entering for site in _entry_reads(sp)}
        self.entries = {sp.latents: self._checked_entry(sp) for sp in model.splices}
        self.calls = {layer: self._named(layer, *session.block_calls[layer]) for layer in range(a.n_layers)}
        self.cache_arg = self._find_cache_arg()
        self.kv = self._kv_from_cache() if self.cache_arg else None

    @property
    def supports_position_cone(self) -> bool:
        return self.kv is not None

    def _checked_entry(self, splice: Splice) -> int:
        """The layer a variant writing `splice`'s latents starts at: its `entry_layer` if the base run shows that the
        model builds the next layer's input from the target as `_entry` does (bit for bit), else the target's."""
        layer, target = entry_layer(self.model, splice), splice.target
        assert target.layer is not None
        if layer == target.layer:
            return layer
        values = self.entry_values
        post = values[Site("resid_post", target.layer)]  # (N, P, d_model)
        exact = target.kind != "mlp_out" or torch.equal(values[Site("resid_mid", target.layer)] + values[target], post)
        if layer < len(self.blocks):
            exact = exact and torch.equal(post, self.resid_pre[layer])
        return layer if exact else target.layer

    def _named(self, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The block call as one name → value mapping (positional arguments named by the signature)."""
        block = self.blocks[layer]
        bound = inspect.signature(block.forward).bind_partial(*args, **kwargs)
        named = dict(bound.arguments)
        extra = named.pop(
            next((k for k, p in inspect.signature(block.forward).parameters.items() if p.kind is p.VAR_KEYWORD), "\0"),
            {},
        )
        named.update(extra)
        return named

    def _find_cache_arg(self) -> str | None:
        cache_cls = Cache
        for name, value in self.calls[0].items():
            if isinstance(value, cache_cls):
                return name
        return None

    def _kv_from_cache(self) -> list[tuple[Tensor, Tensor]] | None:
        assert self.cache_arg is not None
        cache = self.calls[0][self.cache_arg]
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.blocks):
            return None
        kv = []
        for layer in layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, Tensor) or not isinstance(values, Tensor) or keys.shape[-2] != self.seq_len:
                return None
            kv.append((keys, values))
        return kv

    # ---- one cone run -------------------------------------------------------------------------------

    def run(self, layer: int, start: int, patches: Sequence[ConePatch], rows: Tensor) -> Tensor:
        """Logits (K·R, V) at the scored positions for K = len(patches) variants on task `rows` (R,).

        Every patch must act at layers ≥ `layer` and positions ≥ `start` (`start` = 0 when the model has no cache).
        Row k·R + i holds variant k on prompt rows[i]. Rows whose scored position lies before `start` cannot
        change and take the base run's logits.
        """
        k, r = len(patches), int(rows.numel())
        interventions = [
            Intervention(
                p.site,
                p.op.restrict(rows, slice(start, None)),
                positions=None if p.positions is None else [q - start for q in p.positions],
                rows=slice(i * r, (i + 1) * r),
            )
            for i, p in enumerate(patches)
        ]
        session = HookSession(self.model, interventions=interventions)
        with torch.no_grad(), session:
            hidden = self._entry(layer, start, rows, k, patches, session)  # (K·R, P − start, d_model)
            for index in range(layer, len(self.blocks)):
                kwargs = self._call(index, layer, start, rows, k)
                hidden = first_output(self.blocks[index](hidden, **kwargs))  # (K·R, P − start, d_model)
            pos = (self.answer_pos[rows] - start).repeat(k)  # (K·R,)
            inside = pos >= 0
            picked = hidden[torch.arange(k * r), pos.clamp(min=0)]  # (K·R, d_model)
            logits = self._logits(picked)  # (K·R, V)
        base = self.answer_logits[rows].repeat(k, 1).to(logits.device)  # (K·R, V)
        return torch.where(inside[:, None].to(logits.device), logits, base)

    def _entry(
        self, layer: int, start: int, rows: Tensor, k: int, patches: Sequence[ConePatch], session: HookSession
    ) -> Tensor:
        """Layer `layer`'s input (K·R, P − start, d_model) for the variants: the base run's, or, where the patches
        write latents of splices that enter here (`entries`), the stream rebuilt from their targets by `session`
        (whose splices apply the patches): resid_post[l] itself, or resid_mid[l] + mlp_out[l]. MLP targets go
        first, so a dictionary at resid_post[l] encodes a stream an MLP-side patch changed."""
        written = {p.site.family for p in patches}
        entering = sorted(
            (
                sp
                for sp in self.model.splices
                if self.entries[sp.latents] == layer != sp.target.layer and written & {sp.latents, sp.error}
            ),
            key=lambda sp: sp.target.kind != "mlp_out",
        )
        if not entering:
            return _rows_tiled(self.resid_pre[layer][:, start:], rows, k)

        def base(site: Site) -> Tensor:
            return _rows_tiled(self.entry_values[site][:, start:], rows, k)  # (K·R, P − start, d)

        stream: Tensor | None = None
        for sp in entering:
            if sp.source != sp.target:
                session.process(sp.source, base(sp.source))  # hands the source to its dictionary
            if sp.target.kind == "mlp_out":
                stream = base(Site("resid_mid", layer - 1)) + session.process(sp.target, base(sp.target))
            else:
                stream = session.process(sp.target, base(sp.target) if stream is None else stream)
        assert stream is not None
        return stream

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.model.unembed(hidden)

    def _call(self, index: int, layer: int, start: int, rows: Tensor, k: int) -> dict[str, Any]:
        """Block `index`'s recorded arguments for rows × k variants, sliced to positions start.."""
        named = dict(self.calls[index])
        hidden_name = next(iter(named))
        named.pop(hidden_name)
        out: dict[str, Any] = {}
        for name, value in named.items():
            if name == self.cache_arg:
                out[name] = self._prefix_cache(layer, start, rows, k) if start > 0 else None
            elif name == "attention_mask":
                out[name] = self._mask(value, start, rows, k)
            elif name == "use_cache":
                out[name] = start > 0
            else:
                out[name] = _slice_and_tile(value, name, self.n, self.seq_len, start, rows, k)
        return out

    def _prefix_cache(self, layer: int, start: int, rows: Tensor, k: int) -> Any:
        assert self.kv is not None
        data: list[tuple[Tensor | None, Tensor | None]] = []
        for index, (keys, values) in enumerate(self.kv):
            if index < layer:
                data.append((None, None))
            else:
                data.append((_rows_tiled(keys[:, :, :start], rows, k), _rows_tiled(values[:, :, :start], rows, k)))
        return DynamicCache(ddp_cache_data=data)

    def _mask(self, mask: Any, start: int, rows: Tensor, k: int) -> Any:
        if isinstance(mask, Tensor) and mask.ndim == 4:
            sliced = mask[:, :, start:]
            return _rows_tiled(sliced, rows, k) if sliced.shape[0] == self.n else sliced
        if mask is None and start > 0:
            q = torch.arange(start, self.seq_len)[:, None]
            allowed = torch.arange(self.seq_len)[None, :] <= q
            if self.model.config._attn_implementation == "eager":
                dtype = self.resid_pre[0].dtype
                return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]
            return allowed[None, None]
        return mask


def _rows_tiled(t: Tensor, rows: Tensor, k: int) -> Tensor:
    """t[rows] repeated k times along the batch; a view (no copy) when rows is a contiguous range and k == 1."""
    first, count = int(rows[0]), int(rows.numel())
    contiguous = bool((rows == torch.arange(first, first + count)).all())
    picked = t[first : first + count] if contiguous else t[rows]
    return picked if k == 1 else picked.repeat(k, *([1] * (t.ndim - 1)))


def _slice_and_tile(value: Any, name: str, n: int, seq_len: int, start: int, rows: Tensor, k: int) -> Any:
    """Slice a recorded block argument to positions start.. and to rows × k variants (by name and shape)."""
    if isinstance(value, tuple):
        return tuple(_slice_and_tile(v, name, n, seq_len, start, rows, k) for v in value)
    if not isinstance(value, Tensor):
        return value
    if name in ("position_embeddings", "position_ids") and value.ndim >= 2 and value.shape[1] == seq_len:
        value = value[:, start:]
    elif name == "cache_position" and value.ndim == 1:
        value = value[start:]
    if value.ndim >= 1 and value.shape[0] == n and n > 1:
        value = _rows_tiled(value, rows, k)
    return value


def entry_layer(model: Model, splice: Splice) -> int:
    """The first layer a write to `splice`'s latents can change, from the model's structure: the layer after its
    target when the target ends a block (`resid_post`, or `mlp_out` without a parallel residual), else the
    target's own layer (`ConeRunner` confirms the first case on its base run)."""
    target = splice.target
    assert target.layer is not None
    ends_block = target.kind == "resid_post" or (target.kind == "mlp_out" and not model.arch.parallel)
    return target.layer + 1 if ends_block else target.layer


def splice_entries(model: Model) -> dict[Site, int]:
    """`entry_layer` of every dictionary spliced into `model`, by its latent family (what `cone_start` takes
    when planning without a base run; `ConeRunner.entries` holds the confirmed ones)."""
    return {sp.latents: entry_layer(model, sp) for sp in model.splices}


def _entry_reads(splice: Splice) -> list[Site]:
    """What the base run keeps to rebuild the stream after `splice`'s target: resid_post (the stream itself),
    resid_mid and the target for an MLP target, and a transcoder's source."""
    layer = splice.target.layer
    reads = [Site("resid_post", layer)]
    if splice.target.kind == "mlp_out":
        reads += [Site("resid_mid", layer), splice.target]
    if splice.source != splice.target:
        reads.append(splice.source)
    return reads


def cone_start(
    site: Site, positions: tuple[int, ...] | None, position_cone: bool, entries: Mapping[Site, int] | None = None
) -> tuple[int, int] | None:
    """(layer, position) where a patch's cone starts, or None if the site is outside blocks (embed, modules).
    A spliced dictionary's latent or error starts at its splice's entry layer (`entries`, by latent family,
    from `ConeRunner.entries` or `splice_entries`); without it, latents run the whole model."""
    start = 0 if positions is None or not position_cone else min(positions)
    if site.kind in SPLICE_KINDS and entries is not None:
        family = Site("latent", site.layer, path=site.path)
        return (entries[family], start) if family in entries else None
    if site.kind not in LAYER_KINDS or site.layer is None:
        return None
    return site.layer, start
