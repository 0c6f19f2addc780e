"""`SteeringVector`: one or more (site, vector) pairs, how they apply, and where they came from.

A steering vector is added to its sites' values (`Add`) while the model runs. It records how it applies —
`positions` (a policy of `pathlens.hooks`: "all", "prompt", "generated", "last", explicit positions or a
slice), `scale`, and `normalize` (each site's vector rescaled to unit length times that site's typical norm,
measured when the vector was found, so that scale 0.2 means "a fifth of a typical activation") — and its
provenance in `meta` (model, site, method, data, date). It is saved as safetensors + JSON through
`pathlens.results.io` (nothing pickled) and applied through a `model.session`: `with vec.applied(model):` any
forward or `model.hf.generate(...)` inside sees it, and no hook outlives the block, also after an exception.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Add, Intervention, Positions
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import Site, parse_site

if TYPE_CHECKING:
    from pathlens.hooks import HookSession
    from pathlens.model import Model

FORMAT = "pathlens.SteeringVector"
POLICIES = ("all", "prompt", "generated", "last")
_VECTOR_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "attn_in", "mlp_in", "mlp_out")


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """(site, vector) pairs added while the model runs; see the module docstring.

    vectors: site name ("L10.resid_post") -> (d,) tensor; several sites (e.g. one per layer) apply together.
    positions: where each forward adds it: "all", "prompt", "generated", "last", explicit positions (each row's
        own token positions, negatives from the end) or a slice.
    scale: multiplies every vector (0 = no steering).
    normalize: add vector / |vector| * norms[site] (the site's typical activation norm) instead of the vector.
    norms: each site's typical activation norm (measured by the finders), used when normalize is True.
    meta: provenance — model, site, method, data, date, and anything else a finder records.
    """

    vectors: Mapping[str, Tensor]
    positions: Positions = "all"
    scale: float = 1.0
    normalize: bool = False
    norms: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise PathlensError("SteeringVector: vectors is empty; give at least one {site: (d,) vector}.")
        clean: dict[str, Tensor] = {}
        for name, vec in self.vectors.items():
            site = str(parse_site(name))
            if not isinstance(vec, Tensor) or vec.ndim != 1 or not vec.is_floating_point():
                shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
                raise PathlensError(f"SteeringVector: the vector for {site} must be a (d,) float tensor, got {shape}.")
            if not bool(torch.isfinite(vec).all()):
                raise PathlensError(f"SteeringVector: the vector for {site} holds NaN/inf values.")
            clean[site] = vec.detach()
        object.__setattr__(self, "vectors", clean)
        object.__setattr__(self, "norms", {str(parse_site(k)): float(v) for k, v in self.norms.items()})
        object.__setattr__(self, "meta", dict(self.meta))
        check_scale(self.scale, "scale")
        check_positions(self.positions)
        if self.normalize:
            missing = [s for s in clean if not (s in self.norms and math.isfinite(self.norms[s]) and self.norms[s] > 0)]
            if missing:
                raise PathlensError(
                    f"SteeringVector: normalize=True needs a positive typical norm for every site, missing for "
                    f"{missing}; pass norms={{site: norm}} or normalize=False."
                )
            zero = [s for s, v in clean.items() if float(v.norm()) == 0.0]
            if zero:
                raise PathlensError(f"SteeringVector: normalize=True cannot rescale the zero vector at {zero}.")

    def __repr__(self) -> str:
        sites = ", ".join(f"{s} (|v|={float(v.norm()):.3g})" for s, v in self.vectors.items())
        return (
            f"SteeringVector({sites}; positions={self.positions!r}, scale={self.scale}, normalize={self.normalize}, "
            f"method={self.meta.get('method')!r})"
        )

    @property
    def sites(self) -> list[str]:
        return list(self.vectors)

    def effective(self, site: str) -> Tensor:
        """What is added at `site` per unit of scale: the vector, or (normalize) its direction at the typical norm."""
        vec = self.vectors[str(parse_site(site))]
        if not self.normalize:
            return vec
        return vec / vec.norm() * self.norms[str(parse_site(site))]

    # ---- arithmetic ---------------------------------------------------------------------------------

    def _derived(self, vectors: dict[str, Tensor], how: str) -> "SteeringVector":
        norms = {s: n for s, n in self.norms.items() if s in vectors}
        return replace(self, vectors=vectors, norms=norms, meta={**self.meta, "derived": how})

    def __add__(self, other: "SteeringVector") -> "SteeringVector":
        """Site-wise sum (a site of only one operand keeps its vector); positions, scale and norms from self."""
        if not isinstance(other, SteeringVector):
            return NotImplemented
        vectors = dict(self.vectors)
        for site, vec in other.vectors.items():
            vectors[site] = vectors[site] + vec.to(vectors[site]) if site in vectors else vec
        norms = {**other.norms, **self.norms}
        return replace(self, vectors=vectors, norms=norms, meta={**self.meta, "derived": "sum"})

    def __sub__(self, other: "SteeringVector") -> "SteeringVector":
        return self + (-other)

    def __mul__(self, factor: float) -> "SteeringVector":
        """Every vector times `factor` (the recorded scale is kept; see `with_scale` to change that instead)."""
        check_scale(factor, "factor")
        return self._derived({s: v * float(factor) for s, v in self.vectors.items()}, f"times {factor}")

    __rmul__ = __mul__

    def __neg__(self) -> "SteeringVector":
        return self._derived({s: -v for s, v in self.vectors.items()}, "negated")

    def project_out(self, other: "SteeringVector | Tensor") -> "SteeringVector":
        """Remove from each site's vector its component along `other` (that site's vector of another
        SteeringVector, or one (d,) direction for every site)."""
        vectors = {}
        for site, vec in self.vectors.items():
            direction = other if isinstance(other, Tensor) else other.vectors.get(site)
            if direction is None:
                vectors[site] = vec
                continue
            if direction.shape != vec.shape:
                raise PathlensError(
                    f"project_out: the direction for {site} has shape {tuple(direction.shape)}, the vector "
                    f"{tuple(vec.shape)}."
                )
            unit = direction.to(vec) / direction.to(vec).norm().clamp_min(torch.finfo(vec.dtype).tiny)
            vectors[site] = vec - (vec @ unit) * unit
        return self._derived(vectors, "projected out")

    def with_scale(self, scale: float) -> "SteeringVector":
        """This vector applied at `scale`."""
        return replace(self, scale=scale)

    # ---- application --------------------------------------------------------------------------------

    def check(self, model: "Model") -> None:
        """Raise PathlensError unless every site exists on `model` and every vector has that site's width."""
        for site in self.vectors:
            resolved = model.resolve(site, write=True)
            width = site_width(model, resolved)
            got = int(self.vectors[site].shape[0])
            if got != width:
                raise PathlensError(
                    f"SteeringVector: the vector for {site} has {got} entries, but {model.name}'s {site} is {width} "
                    "wide; find the vector on this model (or one with the same width)."
                )

    def interventions(
        self, scale: float | None = None, positions: Positions | None = None, rows: Sequence[int] | None = None
    ) -> list[Intervention]:
        """Ordinary interventions that add this vector: one `Add` per site at `positions` (default: the vector's
        own) in `rows` (default: all), at `scale` (default: the vector's own)."""
        s = self.scale if scale is None else scale
        check_scale(s, "scale")
        pos = self.positions if positions is None else positions
        check_positions(pos)
        return [
            Intervention(parse_site(site), Add(self.effective(site), float(s)), positions=pos, rows=rows)
            for site in self.vectors
        ]

    @contextmanager
    def applied(
        self, model: "Model", scale: float | None = None, positions: Positions | None = None
    ) -> Iterator["HookSession"]:
        """Every forward of `model.hf` inside the block (including `generate` with its key/value cache) is
        steered; every hook is removed when the block ends, also after an exception or KeyboardInterrupt."""
        self.check(model)
        with model.session(self.interventions(scale, positions)) as session:
            yield session

    # ---- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (the vectors) and `<path>.json` (sites, how it applies, provenance)."""
        header = {
            "sites": self.sites,
            "positions": positions_to_json(self.positions),
            "scale": self.scale,
            "normalize": self.normalize,
            "norms": dict(self.norms),
            "meta": dict(self.meta),
        }
        tensors = {site: vec.detach().contiguous().cpu() for site, vec in self.vectors.items()}
        save_pair(path, FORMAT, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SteeringVector":
        """Read a vector written by `save` (checksums checked: an edited or mismatched pair is refused)."""
        json_path = _json_path(path)
        try:
            sites = json.loads(json_path.read_text(encoding="utf-8")).get("sites")
        except (OSError, ValueError, AttributeError):
            sites = None  # load_pair names what is wrong with the file
        names = [str(s) for s in sites] if isinstance(sites, list) else []
        keys = ["sites", "positions", "scale", "normalize", "norms", "meta"]
        tensors, header = load_pair(path, FORMAT, names, keys)
        return cls(
            vectors={site: tensors[site] for site in names},
            positions=positions_from_json(header["positions"]),
            scale=float(header["scale"]),
            normalize=bool(header["normalize"]),
            norms=header["norms"],
            meta=header["meta"],
        )


def _json_path(path: str | os.PathLike[str]) -> Path:
    """The JSON half of a pair saved at `path` (given with either suffix or none), as `save_pair` names it."""
    base = Path(os.fspath(path)).expanduser()
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".json")


def site_width(model: "Model", site: Site) -> int:
    """The width of a site a steering vector can be added to: d_model for the residual stream and the
    attention/MLP inputs and outputs (and one head's write `L.H.head`), d_mlp for MLP neurons."""
    arch = model.arch
    if site.kind in _VECTOR_KINDS or (site.kind == "head" and site.index is not None):
        return arch.d_model
    if site.kind == "mlp_post" and site.index is None:
        return int(arch.d_mlp or 0)
    if site.kind == "head_z" and site.index is not None:
        return arch.d_head
    raise PathlensError(
        f"SteeringVector: {site} is not a site a (d,) vector is added to; use the residual stream "
        "(resid_pre/resid_mid/resid_post), attn_out, mlp_out, attn_in, mlp_in, embed, mlp_post or one head."
    )


def check_scale(scale: object, what: str) -> None:
    """Raise PathlensError unless `scale` is a finite real number, naming `what`."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale)):
        raise PathlensError(f"steering {what} must be a finite number, got {scale!r}.")


def check_positions(positions: object) -> None:
    """Raise PathlensError unless `positions` is a policy name, a slice, or integer positions."""
    if positions is None or isinstance(positions, slice):
        return
    if isinstance(positions, str):
        if positions not in POLICIES:
            raise PathlensError(
                f"steering positions {positions!r} is not a policy; use one of {list(POLICIES)}, integer "
                "positions or a slice."
            )
        return
    values = positions.tolist() if isinstance(positions, Tensor) else positions
    values = [values] if isinstance(values, int) else values
    if (
        not isinstance(values, (list, tuple))
        or not values
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in values)
    ):
        raise PathlensError(
            f"steering positions {positions!r}: give a policy ({list(POLICIES)}), a slice, or a non-empty list "
            "of integer positions."
        )


def positions_to_json(positions: Positions) -> Any:
    """A positions value as JSON: the policy name, a list of ints, or {"slice": [start, stop, step]}."""
    if positions is None or isinstance(positions, str):
        return positions
    if isinstance(positions, slice):
        return {"slice": [positions.start, positions.stop, positions.step]}
    values = positions.tolist() if isinstance(positions, Tensor) else positions
    return [int(values)] if isinstance(values, int) else [int(p) for p in values]  # type: ignore[union-attr]


def positions_from_json(value: Any) -> Positions:
    if isinstance(value, dict) and "slice" in value:
        return slice(*value["slice"])
    return value  # type: ignore[no-any-return]
