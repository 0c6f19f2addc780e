"""`TransportSteer`: learned per-unit affine maps on sites — what Linear-AcT and LinEAS return.

Each `AffineMap` moves one site's values unit by unit, x ← ω ⊙ x + b, optionally only strictly inside a source
range (lo, hi) per unit (Linear-AcT leaves values outside the range it was fitted on as they are). A steer holds
any number of maps, applied in order (two on one site compose: that is how two concepts are steered at once), a
`strength` λ that interpolates every map from the identity, x ← (1 − λ) x + λ (ω ⊙ x + b), the positions it
acts on ("all" by default, as both papers do) and its provenance in `meta`.

It runs through the ordinary machinery: `interventions(scale, positions, rows)` gives one `Affine` intervention
per map (scale is the strength λ, named as every steer's is so that `pathlens.generate`, the evaluation harness
and the dose–response sweep take it as they take a `SteeringVector`); `with steer.applied(model):` holds them in a
`model.session`. It is saved as safetensors + JSON through `pathlens.results.io` (nothing pickled).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Affine, Intervention, Positions
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import parse_site
from pathlens.steering.vector import check_positions, positions_from_json, positions_to_json, site_width

if TYPE_CHECKING:
    from pathlens.hooks import HookSession
    from pathlens.model import Model

FORMAT = "pathlens.TransportSteer"
ACTIVE_TOL = 1e-5
"""A unit counts as active (intervened on) when |ω − 1| or |b| exceeds this (the LinEAS code's support test)."""


def check_strength(strength: object, what: str = "strength") -> float:
    """`strength` as a float, or a PathlensError naming `what` unless it is a finite real number."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(float(strength)):
        raise PathlensError(f"transport steering {what} must be a finite number, got {strength!r}.")
    return float(strength)


@dataclass(frozen=True, eq=False)
class AffineMap:
    """x ← weight ⊙ x + bias at `site`, unit by unit; with `lo` / `hi` only where lo < x < hi (per unit)."""

    site: str
    weight: Tensor  # (d,)
    bias: Tensor  # (d,)
    lo: Tensor | None = None  # (d,)
    hi: Tensor | None = None  # (d,)

    def __post_init__(self) -> None:
        site = str(parse_site(self.site))
        object.__setattr__(self, "site", site)
        width = None
        for name in ("weight", "bias", "lo", "hi"):
            value = getattr(self, name)
            if value is None and name in ("lo", "hi"):
                continue
            if not isinstance(value, Tensor) or value.ndim != 1 or not value.is_floating_point():
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise PathlensError(f"AffineMap at {site}: {name} must be a (d,) float tensor, got {shape}.")
            if width is not None and value.shape[0] != width:
                raise PathlensError(
                    f"AffineMap at {site}: {name} has {value.shape[0]} entries but weight has {width}; give every "
                    "tensor one entry per unit."
                )
            if not bool(torch.isfinite(value).all()):
                raise PathlensError(f"AffineMap at {site}: {name} holds NaN/inf values.")
            width = int(value.shape[0])
            object.__setattr__(self, name, value.detach())

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def active(self, tol: float = ACTIVE_TOL) -> Tensor:
        """Which units (d,) the map moves: |ω − 1| > tol or |b| > tol."""
        return ((self.weight - 1).abs() > tol) | (self.bias.abs() > tol)

    def at_strength(self, strength: float) -> "AffineMap":
        """The map that strength λ turns this one into, at strength 1: ω' = 1 + λ(ω − 1), b' = λb (same range)."""
        return replace(self, weight=1 + strength * (self.weight - 1), bias=strength * self.bias)


@dataclass(frozen=True, eq=False)
class TransportSteer:
    """Affine maps applied in order while the model runs; see the module docstring.

    maps: the maps, in the order they apply (several on one site compose).
    strength: λ, interpolating every map from the identity (0: no steering, 1: the fitted maps; beyond 1
        extrapolates).
    positions: where each forward applies them ("all", "prompt", "generated", "last", explicit, a slice).
    meta: provenance — model, method, sites, data, settings, fit statistics, date.
    """

    maps: Sequence[AffineMap]
    strength: float = 1.0
    positions: Positions = "all"
    meta: Mapping[str, Any] = field(default_factory=dict)

    normalize: ClassVar[bool] = False
    """Maps are never rescaled to a typical norm (the dose–response summary records this for every steer)."""

    def __post_init__(self) -> None:
        maps = list(self.maps)
        if not maps or not all(isinstance(m, AffineMap) for m in maps):
            raise PathlensError("TransportSteer: maps must be a non-empty list of AffineMap.")
        object.__setattr__(self, "maps", maps)
        object.__setattr__(self, "strength", check_strength(self.strength))
        object.__setattr__(self, "meta", dict(self.meta))
        check_positions(self.positions)

    def __repr__(self) -> str:
        active = sum(int(m.active().sum()) for m in self.maps)
        total = sum(m.width for m in self.maps)
        return (
            f"TransportSteer({len(self.maps)} maps on {len(self.sites)} sites, {active}/{total} units active; "
            f"strength={self.strength}, positions={self.positions!r}, method={self.meta.get('method')!r})"
        )

    @property
    def sites(self) -> list[str]:
        """The sites the maps act on, in order of first appearance."""
        return list(dict.fromkeys(m.site for m in self.maps))

    def with_strength(self, strength: float) -> "TransportSteer":
        return replace(self, strength=check_strength(strength))

    def active_units(self, tol: float = ACTIVE_TOL) -> pd.DataFrame:
        """One row per map: site, active units (|ω − 1| or |b| above `tol`), width and the active fraction."""
        rows = []
        for m in self.maps:
            n = int(m.active(tol).sum())
            rows.append({"site": m.site, "active": n, "width": m.width, "fraction": n / m.width})
        return pd.DataFrame(rows)

    def compose(self, other: "TransportSteer") -> "TransportSteer":
        """Both steers at once (e.g. two concepts): this one's maps, then the other's, each at its own strength
        (baked into its maps: ω' = 1 + λ(ω − 1), b' = λb), under a strength of 1 that scales them all together."""
        if not isinstance(other, TransportSteer):
            raise PathlensError(f"TransportSteer.compose: other must be a TransportSteer, got {type(other).__name__}.")
        if positions_to_json(self.positions) != positions_to_json(other.positions):
            raise PathlensError(
                f"TransportSteer.compose: the steers apply at different positions ({self.positions!r} and "
                f"{other.positions!r}); give both the same positions."
            )
        maps = [m.at_strength(self.strength) for m in self.maps] + [m.at_strength(other.strength) for m in other.maps]
        meta = {"method": "composed", "parts": [dict(self.meta), dict(other.meta)]}
        return TransportSteer(maps, 1.0, self.positions, meta)

    # ---- application --------------------------------------------------------------------------------

    def check(self, model: "Model") -> None:
        """Raise PathlensError unless every site exists on `model` and every map has that site's width."""
        for m in self.maps:
            site = model.resolve(m.site, write=True)
            width = site_width(model, site)
            if m.width != width:
                raise PathlensError(
                    f"TransportSteer: the map at {m.site} has {m.width} units, but {model.name}'s {m.site} is {width} "
                    "wide; fit the steer on this model (or one with the same width)."
                )

    def interventions(
        self, scale: float | None = None, positions: Positions | None = None, rows: Sequence[int] | None = None
    ) -> list[Intervention]:
        """One `Affine` intervention per map, in order, at strength `scale` (default: the steer's own strength λ),
        at `positions` (default: its own) in `rows` (default: all)."""
        strength = self.strength if scale is None else check_strength(scale, "scale (strength)")
        pos = self.positions if positions is None else positions
        check_positions(pos)
        return [
            Intervention(parse_site(m.site), Affine(m.weight, m.bias, strength, m.lo, m.hi), positions=pos, rows=rows)
            for m in self.maps
        ]

    @contextmanager
    def applied(
        self, model: "Model", strength: float | None = None, positions: Positions | None = None
    ) -> Iterator["HookSession"]:
        """Every forward of `model.hf` inside the block (including `generate`) is steered; every hook is removed
        when the block ends, also after an exception."""
        self.check(model)
        with model.session(self.interventions(strength, positions)) as session:
            yield session

    # ---- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (each map's tensors, keyed "<i>.weight", "<i>.bias", "<i>.lo", "<i>.hi") and
        `<path>.json` (the maps' sites and ranges, strength, positions, provenance)."""
        tensors: dict[str, Tensor] = {}
        layout = []
        for i, m in enumerate(self.maps):
            tensors[f"{i}.weight"] = m.weight.contiguous().cpu()
            tensors[f"{i}.bias"] = m.bias.contiguous().cpu()
            for name in ("lo", "hi"):
                value = getattr(m, name)
                if value is not None:
                    tensors[f"{i}.{name}"] = value.contiguous().cpu()
            layout.append({"site": m.site, "lo": m.lo is not None, "hi": m.hi is not None})
        header = {
            "maps": layout,
            "strength": self.strength,
            "positions": positions_to_json(self.positions),
            "meta": dict(self.meta),
        }
        save_pair(path, FORMAT, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "TransportSteer":
        """Read a steer written by `save` (checksums checked: an edited or mismatched pair is refused)."""
        layout = _layout(path)
        names = [f"{i}.{n}" for i, entry in enumerate(layout) for n in ("weight", "bias", "lo", "hi") if _has(entry, n)]
        tensors, header = load_pair(path, FORMAT, names, ["maps", "strength", "positions", "meta"])
        maps = [
            AffineMap(
                str(entry["site"]),
                tensors[f"{i}.weight"],
                tensors[f"{i}.bias"],
                tensors.get(f"{i}.lo"),
                tensors.get(f"{i}.hi"),
            )
            for i, entry in enumerate(header["maps"])
        ]
        return cls(maps, float(header["strength"]), positions_from_json(header["positions"]), header["meta"])


def _has(entry: Mapping[str, Any], name: str) -> bool:
    return name in ("weight", "bias") or bool(entry.get(name))


def _layout(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The "maps" list of a saved steer's JSON (empty if unreadable: `load_pair` then names what is wrong)."""
    base = Path(os.fspath(path)).expanduser()
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    try:
        maps = json.loads(base.with_name(base.name + ".json").read_text(encoding="utf-8")).get("maps")
    except (OSError, ValueError, AttributeError):
        return []
    return [m for m in maps if isinstance(m, dict) and "site" in m] if isinstance(maps, list) else []
