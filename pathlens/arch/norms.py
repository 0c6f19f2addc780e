"""Norm modules measured by probing them, so that any LayerNorm / RMSNorm variant can be linearised or given an
LRP rule without re-implementing it: whether it centers, its per-feature gain and its epsilon."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pathlens.errors import PathlensError


def _eps(norm: nn.Module, probe: Tensor, bias: Tensor) -> float:
    """The norm's epsilon: its attribute, or measured from the response to a small probe.

    For a probe e with mean 0 and mean square 1, norm(t·e) − b = g ⊙ t·e / sqrt(t² + eps); the ratio r of the
    responses at t and at 1 gives eps = t²(1 − r²) / (r² − t²).
    """
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    t = 1e-2
    with torch.no_grad():
        r = float((norm(t * probe)[0].double() - bias).norm() / (norm(probe)[0].double() - bias).norm())
    return max(t * t * (1 - r * r) / (r * r - t * t), 0.0)


def norm_parts(norm: nn.Module, d: int) -> tuple[bool, Tensor, float]:
    """Measure a norm module by applying it to probes: (centers, per-feature gain (d,), eps).

    A norm computes g ⊙ (x − [mean x]) / sqrt(stat(x) + eps) + b. Whether it subtracts the mean is seen by
    shifting the input; b is norm(0); g comes from a ±1 probe (mean 0, mean square 1). This covers
    LayerNorm, RMSNorm, Gemma's (1 + w) form and parameter-free norms without reimplementing any of them.
    """
    if d % 2:
        raise PathlensError(f"cannot probe a norm over an odd width {d}; pass the residual width of the model.")
    dtype = next(iter(norm.parameters()), torch.zeros((), dtype=torch.float32)).dtype
    with torch.no_grad():
        x = torch.linspace(-2.0, 3.0, d, dtype=dtype)[None]
        rounding = 1e-4 if torch.finfo(dtype).bits > 16 else 0.1  # bf16/fp16 outputs round ~1e-2 apart
        centers = bool(torch.allclose(norm(x + 3.0), norm(x), atol=rounding))
        bias = norm(torch.zeros(1, d, dtype=dtype))[0].double()
        probe = torch.ones(1, d, dtype=dtype)
        probe[:, 1::2] = -1.0
        eps = _eps(norm, probe, bias)
        gain = (norm(probe)[0].double() - bias) * probe[0].double() * math.sqrt(1.0 + eps)
    return centers, gain, eps
