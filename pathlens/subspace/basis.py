"""`Subspace`: an orthonormal basis of directions at one site, where it applies, and where it came from.

A subspace patch replaces the component of a site's value inside span(B) with the source's (METHODS §2):

    h' = h + (h_src − h) B Bᵀ          B (d, k), orthonormal columns

which for k = 1 and an unnormalised direction v is the 1-D formula h' = h + ((⟨h_src, v⟩ − ⟨h, v⟩)/‖v‖²) v. It runs
through the library's one intervention mechanism (`pathlens.interventions.Project`), so it batches, chunks and
rides on any session like every other patch. Every finder (`pathlens.subspace.finders`, `pathlens.subspace.das`)
returns this type; it is saved as safetensors (the basis) + JSON (site, positions, provenance) through
`pathlens.results.io`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Positions, Project
from pathlens.model import Model
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import Site, parse_site

FORMAT = "pathlens.Subspace"
ORTHONORMAL_TOL = 1e-4
PositionSpec = str | Sequence[int]
"""Where a subspace applies in each row: "last" (each row's last real token: where DAS is trained), "all", or
explicit positions."""


@dataclass(frozen=True, eq=False)
class Subspace:
    """k orthonormal directions at `site`.

    basis: (d, k) with orthonormal columns (checked to `ORTHONORMAL_TOL`); d is the site's last dim.
    site: where it applies, e.g. "L15.mlp_post"; positions: "last", "all" or explicit positions.
    meta: provenance — finder, model, task, seed, training curve, the unnormalised direction's norm, ...
    """

    basis: Tensor
    site: Site
    positions: PositionSpec = "last"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", parse_site(self.site))
        b = self.basis
        if not isinstance(b, Tensor) or b.ndim != 2 or not b.is_floating_point() or 0 in b.shape:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise PathlensError(
                f"Subspace basis must be a non-empty float (d, k) tensor, got {shape}; a single direction is "
                "Subspace.from_direction(v, site)."
            )
        if b.shape[1] > b.shape[0]:
            raise PathlensError(f"Subspace basis {tuple(b.shape)} has more directions (k) than dimensions (d).")
        if not bool(torch.isfinite(b).all()):
            raise PathlensError("Subspace basis holds NaN/inf; pass finite directions.")
        gram = b.detach().double().T @ b.detach().double()  # (k, k)
        error = float((gram - torch.eye(b.shape[1], dtype=torch.float64)).abs().max())
        if error > ORTHONORMAL_TOL:
            raise PathlensError(
                f"Subspace basis columns are not orthonormal (|BᵀB − I| max {error:.2g} > {ORTHONORMAL_TOL}); "
                "pass Subspace.from_basis(basis, site, orthonormalize=True) or torch.linalg.qr(basis).Q."
            )
        if isinstance(self.positions, str) and self.positions not in ("last", "all"):
            raise PathlensError(f"Subspace positions must be 'last', 'all' or a list of ints, got {self.positions!r}.")

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def direction(self) -> Tensor:
        """The unit direction (d,) of a 1-D subspace."""
        if self.k != 1:
            raise PathlensError(f"Subspace.direction: this subspace has k={self.k} directions; use .basis.")
        return self.basis[:, 0]

    @classmethod
    def from_direction(
        cls, v: Tensor, site: Site | str, positions: PositionSpec = "last", meta: Mapping[str, Any] | None = None
    ) -> Subspace:
        """The 1-D subspace along `v` (d,), unnormalised: the patch depends only on v/‖v‖; ‖v‖ is kept in meta."""
        if not isinstance(v, Tensor) or v.ndim != 1 or not v.is_floating_point():
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise PathlensError(f"Subspace.from_direction: v must be a float (d,) vector, got {shape}.")
        norm = float(v.detach().double().norm())
        if not norm > 0.0 or not bool(torch.isfinite(v).all()):
            raise PathlensError("Subspace.from_direction: v must be finite and non-zero; it names the direction.")
        unit = (v.detach().double() / norm).to(v.dtype)
        return cls(unit[:, None], parse_site(site), positions, {"norm": norm, **dict(meta or {})})

    @classmethod
    def from_basis(
        cls,
        basis: Tensor,
        site: Site | str,
        positions: PositionSpec = "last",
        meta: Mapping[str, Any] | None = None,
        orthonormalize: bool = False,
    ) -> Subspace:
        """A user-given basis (d, k); with `orthonormalize`, its span is kept and the columns made orthonormal."""
        if orthonormalize and isinstance(basis, Tensor) and basis.ndim == 2:
            basis = torch.linalg.qr(basis.detach().double()).Q.to(basis.dtype)
        return cls(basis.detach(), parse_site(site), positions, dict(meta or {}))

    def op(self, source: Tensor) -> Project:
        """The subspace patch toward `source` (laid out like the site: (batch, pos or 1, ..., d))."""
        return Project(self.basis, source)

    def intervention(self, source: Tensor, rows: Any = None) -> Intervention:
        """The subspace patch at this subspace's site and positions, on batch `rows` (None: all)."""
        positions: Positions = "last" if self.positions == "last" else "all" if self.positions == "all" else None
        if positions is None:
            positions = [int(p) for p in self.positions]
        return Intervention(self.site, self.op(source), positions=positions, rows=rows)

    def check_fits(self, model: Model) -> None:
        """Raise PathlensError unless the basis width equals the site's last dim in `model`."""
        width = site_width(model, self.site)
        if width != self.d:
            raise PathlensError(
                f"Subspace at {self.site}: its basis has width d={self.d}, but {self.site} of {model.name} has "
                f"{width} dims; find the subspace on this site of this model, or give a ({width}, k) basis."
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (the basis) and `<path>.json` (site, positions, provenance)."""
        header = {
            "site": str(self.site),
            "positions": self.positions if isinstance(self.positions, str) else [int(p) for p in self.positions],
            "shape": [self.d, self.k],
            "meta": dict(self.meta),
        }
        save_pair(path, FORMAT, {"basis": self.basis.detach().contiguous().cpu()}, header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Subspace:
        """Read a subspace written by `save` (checksums checked: an edited or mismatched pair is refused)."""
        tensors, header = load_pair(path, FORMAT, ["basis"], ["site", "positions", "shape", "meta"])
        return cls(tensors["basis"], parse_site(header["site"]), header["positions"], header["meta"])


def site_width(model: Model, site: Site | str) -> int:
    """The last dim of `site`'s value in `model`, read from a one-token run (works for every site kind)."""
    resolved = model.resolve(site)
    run = model.run(torch.zeros(1, 1, dtype=torch.long), cache=[resolved])
    return int(run.cache[resolved].shape[-1])
