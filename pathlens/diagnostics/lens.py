"""Direct logit attribution: how much each component's write into the residual stream moves the metric
direction (answer − wrong logit) at the scored position, through the final norm with its scale frozen.

The final norm is linear once its scale is fixed at the value the full residual stream gives it:
LayerNorm:  c ↦ w ⊙ (c − mean(c)) / sqrt(var(x) + eps),   RMSNorm: c ↦ g ⊙ c / sqrt(mean(x²) + eps),
where x is the final residual stream. So the attributions of a complete decomposition of x add up to
logit(answer) − logit(wrong) (minus what the norm's bias contributes, for LayerNorm).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pathlens.arch.base import get_module
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.tasks.base import Task


def _eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    raise PathlensError(f"cannot read the epsilon of the final norm {type(norm).__name__}.")


def frozen_final_norm(model: Model, resid_final: Tensor) -> "callable[[Tensor], Tensor]":  # type: ignore[valid-type]
    """The final norm as a linear map with its scale frozen at `resid_final` (N, d_model).

    Returns f(c) for components c of shape (N, ..., d_model). LayerNorm (torch) is read from its weight;
    any other norm is treated as RMSNorm, with its per-feature gain measured by applying it to a ones vector
    (this covers Llama's w·x̂ and Gemma's (1+w)·x̂ forms without reimplementing either).
    """
    path = model.arch.final_norm
    if path is None:
        return lambda c: c
    norm = get_module(model.hf, path)
    d = resid_final.shape[-1]
    eps = _eps(norm)
    x = resid_final.double()
    if isinstance(norm, nn.LayerNorm):
        scale = torch.sqrt(x.var(-1, unbiased=False) + eps)
        gain = norm.weight.double() if norm.weight is not None else torch.ones(d, dtype=torch.float64)

        def layer_norm(c: Tensor) -> Tensor:
            c = c.double()
            s = scale.reshape(scale.shape + (1,) * (c.ndim - scale.ndim))
            return gain * (c - c.mean(-1, keepdim=True)) / s

        return layer_norm
    with torch.no_grad():
        ones = torch.ones(1, d, dtype=next(norm.parameters()).dtype)
        gain = norm(ones)[0].double() * math.sqrt(1.0 + eps)
    scale = torch.sqrt(x.pow(2).mean(-1) + eps)

    def rms_norm(c: Tensor) -> Tensor:
        c = c.double()
        s = scale.reshape(scale.shape + (1,) * (c.ndim - scale.ndim))
        return gain * c / s

    return rms_norm


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
