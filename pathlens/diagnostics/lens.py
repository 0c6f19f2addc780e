"""Direct logit attribution: how much each component's write into the residual stream moves the metric
direction (answer − wrong logit) at the scored position, through the final norm with its scale frozen.

The final norm is linear once its scale is fixed at the value the full residual stream gives it:
LayerNorm:  c ↦ g ⊙ (c − mean(c)) / sqrt(var(x) + eps),   RMSNorm: c ↦ g ⊙ c / sqrt(mean(x²) + eps),
where x is the final residual stream. So the attributions of a complete decomposition of x add up to
logit(answer) − logit(wrong) minus what the norm's bias contributes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from pathlens.arch.base import get_module
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.tasks.base import Task


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
        centers = bool(torch.allclose(norm(x + 3.0), norm(x), atol=1e-4))
        bias = norm(torch.zeros(1, d, dtype=dtype))[0].double()
        probe = torch.ones(1, d, dtype=dtype)
        probe[:, 1::2] = -1.0
        eps = _eps(norm, probe, bias)
        gain = (norm(probe)[0].double() - bias) * probe[0].double() * math.sqrt(1.0 + eps)
    return centers, gain, eps


def frozen_final_norm(model: Model, resid_final: Tensor) -> Callable[[Tensor], Tensor]:
    """The final norm as a linear map with its scale frozen at `resid_final` (N, d_model).

    Returns f(c) for components c of shape (N, ..., d_model): g ⊙ (c − [mean c]) / s, with s the norm's
    scale on the actual final residual stream. The norm's bias is a constant and is not included.
    """
    path = model.arch.final_norm
    if path is None:
        return lambda c: c.double()
    norm = get_module(model.hf, path)
    centers, gain, eps = norm_parts(norm, resid_final.shape[-1])
    x = resid_final.double()
    stat = x.var(-1, unbiased=False) if centers else x.pow(2).mean(-1)
    scale = torch.sqrt(stat + eps)

    def frozen(c: Tensor) -> Tensor:
        c = c.double()
        if centers:
            c = c - c.mean(-1, keepdim=True)
        return gain * c / scale.reshape(scale.shape + (1,) * (c.ndim - scale.ndim))

    return frozen


def logit_direction(model: Model, task: Task) -> Tensor:
    """W_U[answer] − W_U[wrong] per prompt: (N, d_model), float64."""
    w_u = get_module(model.hf, model.arch.unembed).weight.detach().double()
    return w_u[task.answer_ids] - w_u[task.wrong_ids]


def head_logit_attribution(model: Model, task: Task) -> Scores:
    """Direct logit attribution of every attention head on the clean prompts: Scores (layer, head).

    Value = mean over prompts of f(head_output at answer_pos) · (W_U[answer] − W_U[wrong]), with f the final
    norm frozen at the clean run's final residual stream.
    """
    a = model.arch
    last = f"L{a.n_layers - 1}.resid_post"
    sites = [f"L{layer}.head" for layer in range(a.n_layers)] + [last]
    run = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=sites)
    rows = torch.arange(task.n)
    at = task.answer_pos
    norm = frozen_final_norm(model, run.cache[last][rows, at])
    direction = logit_direction(model, task)
    heads = torch.stack([run.cache[f"L{layer}.head"][rows, at] for layer in range(a.n_layers)], dim=1)
    dla = torch.einsum("nlhd,nd->nlh", norm(heads), direction).mean(0)
    return Scores(
        values=dla.float(),
        dims=("layer", "head"),
        coords={"layer": list(range(a.n_layers)), "head": list(range(a.n_heads))},
        metric="logit_diff",
        method="direct_logit_attribution",
        meta={"model": model.name, "task": task.name, "n_prompts": task.n},
    )
