"""Run patched variants inside their causal cone only.

A patch at layer L and position p changes nothing before layer L, and (causal attention) nothing at positions
before p. So a variant starts from the base run's block-L input at positions p.., calls the model's own blocks
L..n−1 with exactly the arguments the model passed them in the base run (recorded by the HookSession:
attention masks, rotary embeddings, position ids), sliced to positions p.., and lets attention read positions < p
from the base run's own key/value cache. Logits are computed only at the scored positions. Nothing of the model
is re-implemented except the tail (final norm → unembedding → the config's logit soft-cap), which every test
checks against the full model.

K variants of N prompts run as one batch of K·N rows; the sweep (`pathlens.patching.sweep`) sizes the chunks.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache

from pathlens.arch.base import get_blocks
from pathlens.arch.calls import first_output
from pathlens.hooks import HookSession
from pathlens.interventions import Intervention, Op
from pathlens.model import Model
from pathlens.sites import LAYER_KINDS, Site


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
    layer cone is used), `answer_logits` (N, V) at the scored positions.
    """

    def __init__(self, model: Model, ids: Tensor, mask: Tensor | None, answer_pos: Tensor):
        self.model, self.ids, self.mask, self.answer_pos = model, ids, mask, answer_pos
        self.n, self.seq_len = int(ids.shape[0]), int(ids.shape[1])
        a = model.arch
        self.blocks = get_blocks(model.hf, a.blocks)
        reads = [Site("resid_pre", layer) for layer in range(a.n_layers)]
        session = HookSession(model, reads, record_blocks=True)
        with torch.no_grad():
            self.answer_logits = model.scored_logits(ids, mask, session, answer_pos, use_cache=True).detach()
        self.resid_pre = {layer: session.cache[Site("resid_pre", layer)] for layer in range(a.n_layers)}
        self.calls = {layer: self._named(layer, *session.block_calls[layer]) for layer in range(a.n_layers)}
        self.cache_arg = self._find_cache_arg()
        self.kv = self._kv_from_cache() if self.cache_arg else None

    @property
    def supports_position_cone(self) -> bool:
        return self.kv is not None

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
        hidden = _rows_tiled(self.resid_pre[layer][:, start:], rows, k)  # (K·R, P − start, d_model)
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
            for index in range(layer, len(self.blocks)):
                kwargs = self._call(index, layer, start, rows, k)
                hidden = first_output(self.blocks[index](hidden, **kwargs))  # (K·R, P − start, d_model)
            pos = (self.answer_pos[rows] - start).repeat(k)  # (K·R,)
            inside = pos >= 0
            picked = hidden[torch.arange(k * r), pos.clamp(min=0)]  # (K·R, d_model)
            logits = self._logits(picked)  # (K·R, V)
        base = self.answer_logits[rows].repeat(k, 1).to(logits.device)  # (K·R, V)
        return torch.where(inside[:, None].to(logits.device), logits, base)

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


def cone_start(site: Site, positions: tuple[int, ...] | None, position_cone: bool) -> tuple[int, int] | None:
    """(layer, position) where a patch's cone starts, or None if the site is outside blocks (embed, modules)."""
    if site.kind not in LAYER_KINDS or site.layer is None:
        return None
    start = 0 if positions is None or not position_cone else min(positions)
    return site.layer, start
