"""Direct logit attribution: how much each component's write into the residual stream moves the metric
direction (answer − wrong logit) at the scored position, through the final norm with its scale frozen.

The final norm is linear once its scale is fixed at the value the full residual stream gives it:
LayerNorm:  c ↦ g ⊙ (c − mean(c)) / sqrt(var(x) + eps),   RMSNorm: c ↦ g ⊙ c / sqrt(mean(x²) + eps),
where x is the final residual stream. So the attributions of a complete decomposition of x add up to
logit(answer) − logit(wrong) minus what the norm's bias contributes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pathlens.arch.base import get_module
from pathlens.arch.norms import norm_parts
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.tasks.base import Task


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
    weight = get_module(model.hf, model.arch.unembed).weight
    assert isinstance(weight, Tensor)
    w_u = weight.detach().double()  # (vocab, d_model)
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
