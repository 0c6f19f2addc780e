"""What a patching sweep patches: site families × positions → variants, and the dims of the resulting Scores.

A *variant* is one patched forward of the whole task batch: one indexed site (e.g. L3.H2) at a set of positions
(all of them, or one). `SWEEP_GROUPS` names the groups of sites the field sweeps (not to be confused with the
architecture families of `pathlens.arch.families`):

    heads  (layer, head)     z / q (layer, head)      k / v (layer, group)
    attn_out, mlp_in, mlp_out, resid_pre, resid_mid, resid_post   (layer,)   (short: attn, mlp, resid)
    neurons (site,)  — MLP neurons given as {layer: [neuron, ...]}
    an explicit list of sites, e.g. ["L3.H2", "L5.mlp_out", "module:transformer.h.3.mlp"]  (site,)

positions="all" patches every position at once; "each" adds a `pos` dim with one variant per position; a list of
ints patches each of those positions separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.sites import Site

SWEEP_GROUPS = {  # the `sites=` name of a sweep → the site kind it patches at every layer
    "heads": "head",
    "z": "head_z",
    "q": "q",
    "k": "k",
    "v": "v",
    "attn_out": "attn_out",
    "mlp_in": "mlp_in",
    "mlp_out": "mlp_out",
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
}
GROUP_ALIASES = {"resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}  # short names (as the CLI offers)


def sweep_group(sites: Any) -> Any:
    """`sites` with a short group name replaced by the group it stands for ("resid" → "resid_pre")."""
    return GROUP_ALIASES.get(sites, sites) if isinstance(sites, str) else sites


@dataclass(frozen=True)
class Variant:
    """One patched forward: `site` at `positions` (None = all positions); `cell` is its flat index in Scores."""

    site: Site
    positions: tuple[int, ...] | None
    cell: int

    @property
    def start_position(self) -> int:
        return 0 if self.positions is None else min(self.positions)


@dataclass(frozen=True)
class Plan:
    """The variants of a sweep and the labelled grid their metric values fill."""

    dims: tuple[str, ...]
    coords: dict[str, list[Any]]
    variants: tuple[Variant, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.coords[d]) for d in self.dims)


def _positions(spec: "str | Sequence[int]", seq_len: int) -> list[tuple[int, ...] | None]:
    if spec == "all":
        return [None]
    if spec == "each":
        return [(p,) for p in range(seq_len)]
    if isinstance(spec, str):
        raise PathlensError(f"positions must be 'all', 'each' or a list of ints, got {spec!r}.")
    out: list[tuple[int, ...] | None] = []
    for p in spec:
        if not -seq_len <= int(p) < seq_len:
            raise PathlensError(f"position {p} out of range for prompts of {seq_len} tokens (valid 0..{seq_len - 1}).")
        out.append((int(p) % seq_len,))
    if not out:
        raise PathlensError("positions: empty list; pass 'all', 'each' or at least one position.")
    return out


def _site_grid(
    model: Model, sites: Any, layers: Sequence[int] | None, neurons: Any
) -> tuple[tuple[str, ...], dict[str, list[Any]], list[Site]]:
    """The site part of the grid: dims, coords and the indexed sites in row-major order."""
    a = model.arch
    sites = sweep_group(sites)
    if isinstance(sites, str) and sites == "neurons":
        if not neurons:
            raise PathlensError("sites='neurons' needs neurons={layer: [index, ...]} naming the neurons to patch.")
        chosen = [
            model.resolve(Site("mlp_post", int(layer), int(i))) for layer, idx in dict(neurons).items() for i in idx
        ]
        return ("site",), {"site": [str(s) for s in chosen]}, chosen
    if isinstance(sites, str):
        if sites not in SWEEP_GROUPS:
            raise PathlensError(
                f"unknown site family {sites!r}; use one of {', '.join([*SWEEP_GROUPS, *GROUP_ALIASES])}, 'neurons', "
                "or a list of sites."
            )
        kind = SWEEP_GROUPS[sites]
        layer_list = list(range(a.n_layers)) if layers is None else [int(x) for x in layers]
        for layer in layer_list:
            model.resolve(Site(kind, layer))
        if kind in ("head", "head_z", "q", "k", "v"):
            count = a.n_kv_heads if kind in ("k", "v") else a.n_heads
            index_dim = "group" if kind in ("k", "v") else "head"
            grid = [Site(kind, layer, i) for layer in layer_list for i in range(count)]
            return ("layer", index_dim), {"layer": layer_list, index_dim: list(range(count))}, grid
        return ("layer",), {"layer": layer_list}, [Site(kind, layer) for layer in layer_list]
    chosen = [model.resolve(s, write=True) for s in sites]
    if not chosen:
        raise PathlensError("sites: empty list; name at least one site or a family such as 'heads'.")
    return ("site",), {"site": [str(s) for s in chosen]}, chosen


def make_plan(
    model: Model,
    sites: Any,
    positions: "str | Sequence[int]",
    seq_len: int,
    layers: Sequence[int] | None = None,
    neurons: Any = None,
) -> Plan:
    """Variants for `sites` × `positions`, with the dims/coords of the Scores they fill."""
    dims, coords, grid = _site_grid(model, sites, layers, neurons)
    pos_list = _positions(positions, seq_len)
    if positions != "all":
        dims = dims + ("pos",)
        coords = {**coords, "pos": [p[0] for p in pos_list if p is not None]}
    variants = []
    for i, site in enumerate(grid):
        for j, pos in enumerate(pos_list):
            variants.append(Variant(site=site, positions=pos, cell=i * len(pos_list) + j))
    return Plan(dims=dims, coords=coords, variants=tuple(variants))
