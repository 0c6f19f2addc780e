"""One-dimensional optimal transport, unit by unit: the coupling both Linear-AcT and LinEAS are built on.

In one dimension the optimal (W2) coupling of two empirical distributions pairs them in sorted order. With equal
sample counts that is sort(x)_i ↔ sort(y)_i; with N source and M ≠ N target samples, each sorted source sample i
is paired with the target's quantile at the same level (i + ½)/N, read off the sorted target by linear
interpolation (quantile matching) — which reduces to sort(y)_i when M = N.
"""

from __future__ import annotations

import torch
from torch import Tensor


def matched_quantiles(target: Tensor, n: int) -> Tensor:
    """The target's per-unit quantiles (n, d) at the levels (i + ½)/n of n sorted source samples; target (M, d).
    Equal to `target.sort(0).values` when M == n (no interpolation)."""
    ys = target.sort(dim=0).values  # (M, d)
    m = ys.shape[0]
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) * m / n - 0.5  # (n,) positions in the sorted target
    pos = levels.clamp(0, m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo).to(ys.dtype).to(ys.device)[:, None]  # (n, 1)
    return ys[lo.to(ys.device)] * (1 - frac) + ys[hi.to(ys.device)] * frac


def wasserstein2(source: Tensor, matched: Tensor) -> Tensor:
    """Per-coordinate squared 1-D W2 between source samples (n, d) and the target's matched quantiles (n, d)
    (`matched_quantiles`), averaged over coordinates: (1/d) Σ_j (1/n) Σ_i (sort(source)_ij − matched_ij)².
    Differentiable in `source` (a sort is a permutation)."""
    return (source.sort(dim=0).values - matched).pow(2).mean()
