"""Linear-AcT (Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations"): per-unit
affine transport maps from unpaired source and target sets, fitted in closed form.

Per site and unit, the source set's pooled activations x and the target set's y are coupled in sorted order (the
1-D optimal transport coupling; `ot.matched_quantiles` pairs unequal set sizes by quantile matching) and the map
T(x) = ωx + b is the least-squares line through the sorted pairs: ω = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², b = ȳ − ωx̄
(float64). Variants: "gaussian" matches mean and standard deviation, ω = σ_y/σ_x, b = μ_y − ωμ_x; "mean" shifts the
mean only, ω = 1, b = μ_y − μ_x. Units whose source standard deviation is at most 1e-4 are left as they are (the
official code masks them for the Gaussian variant; we do so for all three rather than add 1e-8 noise to x).

The map applies only strictly inside the source range of each unit (`source_range`, percentiles of the source
values: (0, 100) = [min, max] by default for "linear"; None — everywhere — by default for the other variants), at
every position, with strength λ: x ← (1 − λ)x + λT(x).

Modes: "incr" (the paper's default) fits the sites in forward order (by layer; sites of one layer in the order
given), each on source activations recomputed with the maps of the sites before it applied; "atonce" fits every
site from the unsteered model. In both, target activations come from the unsteered model.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.steering.learned.activations import check_pooling, check_texts, pooled
from pathlens.steering.learned.ot import matched_quantiles
from pathlens.steering.learned.transport import AffineMap, TransportSteer
from pathlens.steering.vector import site_width

Variant = Literal["linear", "gaussian", "mean"]
Mode = Literal["incr", "atonce"]
VARIANTS = ("linear", "gaussian", "mean")
MODES = ("incr", "atonce")
MIN_STD = 1e-4
"""Units whose source standard deviation is at most this are left unmapped."""


def fit_units(source: Tensor, target: Tensor, variant: str = "linear") -> tuple[Tensor, Tensor, Tensor]:
    """Per-unit maps from source samples (N, d) to target samples (M, d): (weight (d,), bias (d,), fitted (d,)
    bool), float64; units not fitted (source std ≤ MIN_STD) get weight 1 and bias 0."""
    if variant not in VARIANTS:
        raise PathlensError(f"Linear-AcT variant {variant!r} is not one of {list(VARIANTS)}.")
    x, y = source.double(), target.double()
    fitted = x.std(dim=0, unbiased=False) > MIN_STD  # (d,)
    if variant == "linear":
        xs = x.sort(dim=0).values  # (N, d)
        ys = matched_quantiles(y, xs.shape[0])  # (N, d)
        dx, dy = xs - xs.mean(0), ys - ys.mean(0)
        weight = (dx * dy).sum(0) / (dx * dx).sum(0).clamp_min(torch.finfo(torch.float64).tiny)
        bias = ys.mean(0) - weight * xs.mean(0)
    elif variant == "gaussian":
        weight = y.std(dim=0, unbiased=False) / x.std(dim=0, unbiased=False).clamp_min(MIN_STD)
        bias = y.mean(0) - weight * x.mean(0)
    else:
        weight = torch.ones(x.shape[1], dtype=torch.float64)
        bias = y.mean(0) - x.mean(0)
    weight = torch.where(fitted, weight, torch.ones_like(weight))
    bias = torch.where(fitted, bias, torch.zeros_like(bias))
    return weight, bias, fitted


def source_bounds(source: Tensor, source_range: tuple[float, float] | None) -> tuple[Tensor | None, Tensor | None]:
    """Per-unit (lo, hi) (d,) at the given percentiles of the source samples (N, d), or (None, None)."""
    if source_range is None:
        return None, None
    q_lo, q_hi = source_range
    x = source.double()
    return torch.quantile(x, q_lo / 100, dim=0), torch.quantile(x, q_hi / 100, dim=0)


def _check_range(source_range: object) -> tuple[float, float] | None:
    if source_range is None:
        return None
    if (
        not isinstance(source_range, (tuple, list))
        or len(source_range) != 2
        or not all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in source_range)
        or not 0 <= source_range[0] < source_range[1] <= 100
    ):
        raise PathlensError(
            f"source_range {source_range!r}: give two percentiles 0 <= lo < hi <= 100 (e.g. (0, 100) for the source "
            "[min, max]), or None to map every value."
        )
    return float(source_range[0]), float(source_range[1])


def _ordered_sites(model: Model, sites: Sequence[str] | str) -> list[str]:
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise PathlensError("linear_act: sites is empty; name at least one site (e.g. 'L10.mlp_out').")
    resolved = [model.resolve(s, write=True) for s in names]
    for site in resolved:
        site_width(model, site)
    order = sorted(range(len(resolved)), key=lambda i: (resolved[i].layer if resolved[i].layer is not None else -1, i))
    ordered = list(dict.fromkeys(str(resolved[i]) for i in order))
    if len(ordered) != len(names):
        raise PathlensError(f"linear_act: sites {names} name a site twice; give each site once.")
    return ordered


def linear_act(
    model: Model,
    source: Sequence[str],
    target: Sequence[str],
    sites: Sequence[str] | str,
    *,
    variant: str = "linear",
    mode: str = "incr",
    source_range: tuple[float, float] | None | Literal["default"] = "default",
    pooling: str = "mean",
    strength: float = 1.0,
    batch_size: int = 32,
    data: str = "",
) -> TransportSteer:
    """Fit Linear-AcT maps moving the `source` set's activations at `sites` onto the `target` set's (unpaired, any
    sizes of at least two); see the module docstring. Returns a `TransportSteer` at `strength`."""
    if mode not in MODES:
        raise PathlensError(f"Linear-AcT mode {mode!r} is not one of {list(MODES)}.")
    if variant not in VARIANTS:
        raise PathlensError(f"Linear-AcT variant {variant!r} is not one of {list(VARIANTS)}.")
    check_pooling(pooling)
    src, tgt = check_texts(source, "source"), check_texts(target, "target")
    ordered = _ordered_sites(model, sites)
    if source_range == "default":
        source_range = (0.0, 100.0) if variant == "linear" else None
    bounds = _check_range(source_range)
    targets = pooled(model, tgt, ordered, pooling=pooling, batch_size=batch_size)
    sources = pooled(model, src, ordered, pooling=pooling, batch_size=batch_size) if mode == "atonce" else {}
    maps: list[AffineMap] = []
    stats: dict[str, Any] = {}
    for site in ordered:
        if mode == "incr":
            so_far = TransportSteer(maps).interventions() if maps else []
            sources[site] = pooled(model, src, [site], so_far, pooling=pooling, batch_size=batch_size)[site]
        weight, bias, fitted = fit_units(sources[site], targets[site], variant)
        lo, hi = source_bounds(sources[site], bounds)
        maps.append(
            AffineMap(
                site,
                weight.float(),
                bias.float(),
                None if lo is None else lo.float(),
                None if hi is None else hi.float(),
            )
        )
        stats[site] = {"unfitted_units": int((~fitted).sum()), "width": int(fitted.numel())}
    n_source, n_target = int(sources[ordered[0]].shape[0]), int(targets[ordered[0]].shape[0])
    meta = {
        "model": model.name,
        "method": "linear-act",
        "variant": variant,
        "mode": mode,
        "sites": ordered,
        "pooling": pooling,
        "source_range": list(bounds) if bounds is not None else None,
        "n_source": len(src),
        "n_target": len(tgt),
        "coupling": "sorted" if n_source == n_target else f"quantile-matched ({n_source} vs {n_target} samples)",
        "units": stats,
        "data": data,
        "date": datetime.date.today().isoformat(),
    }
    return TransportSteer(maps, strength, "all", meta)
