"""Direction finders that need no training loop: difference in means, logistic probe, gradient, random placebo.

Each reads the site at every prompt's scored position and returns a 1-D `Subspace` (DAS, the trained finder, is
in `pathlens.subspace.das`; a user-given direction is `Subspace.from_direction`). They contrast two groups of
prompts:

- `groups` (N,) bool, given; or for IOI-shaped tasks (roles "IO" and "S1") the name order, IO before S1 ("ABB")
  against S1 before IO ("BAB") — the paper's mean(·|ABB) − mean(·|BAB) contrast;
- otherwise the clean prompts against the corrupted ones.

`gradient` is the gradient of the task's metric with respect to the site, signed per group (+1 / −1) and
averaged, so that for IOI it points along "the name at the first slot wins" (the paper's positional gradient,
read through the task's logit difference rather than named heads' attention scores).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.sites import Site
from pathlens.subspace.basis import Subspace, site_width
from pathlens.subspace.reads import answer_values, row_chunks
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import metric_name


def default_groups(task: Task) -> Tensor | None:
    """IOI name order (True = IO before S1, "ABB") when the task has IO and S1 roles; None otherwise."""
    if "IO" in task.roles and "S1" in task.roles:
        return task.roles["IO"] < task.roles["S1"]
    return None


def _contrast(
    model: Model, task: Task, site: Site | str, groups: Tensor | None, max_batch_tokens: int
) -> tuple[Tensor, Tensor, str]:
    """(positive (n1, d), negative (n0, d), what was contrasted) at the scored positions, as float64."""
    groups = default_groups(task) if groups is None else torch.as_tensor(groups, dtype=torch.bool)
    clean = answer_values(model, task, site, "clean", max_batch_tokens).double()  # (N, d)
    if groups is None:
        corrupt = answer_values(model, task, site, "corrupt", max_batch_tokens).double()
        return clean, corrupt, "clean vs corrupted prompts"
    if groups.shape != (task.n,):
        raise PathlensError(f"groups must give one bool per prompt ({task.n},), got shape {tuple(groups.shape)}.")
    if bool(groups.all()) or not bool(groups.any()):
        raise PathlensError(
            "groups: every prompt is in one group, so there is nothing to contrast; give prompts of both groups "
            "(for IOI: both name orders, e.g. templates='all')."
        )
    return clean[groups], clean[~groups], "group True vs False"


def _meta(model: Model, task: Task, finder: str, what: str, **extra: Any) -> dict[str, Any]:
    return {"finder": finder, "model": model.name, "task": task.name, "n_prompts": task.n, "contrast": what, **extra}


def mean_difference(
    model: Model, task: Task, site: Site | str, groups: Tensor | None = None, max_batch_tokens: int = 2048
) -> Subspace:
    """mean(site | positive group) − mean(site | negative group) at the scored position."""
    pos, neg, what = _contrast(model, task, site, groups, max_batch_tokens)
    v = (pos.mean(0) - neg.mean(0)).float()  # (d,)
    return Subspace.from_direction(v, site, "last", _meta(model, task, "mean-diff", what))


def probe_direction(
    model: Model,
    task: Task,
    site: Site | str,
    groups: Tensor | None = None,
    l2: float = 1e-3,
    steps: int = 100,
    max_batch_tokens: int = 2048,
) -> Subspace:
    """The weight vector of an L2-regularised logistic probe separating the two groups (fit by L-BFGS on
    features scaled by their mean norm, so the penalty means the same at every site), signed to point from the
    negative to the positive group; its training accuracy is recorded in meta."""
    pos, neg, what = _contrast(model, task, site, groups, max_batch_tokens)
    x = torch.cat([pos, neg])  # (n, d)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    center, scale = x.mean(0), float(x.norm(dim=1).mean()) or 1.0
    xs = (x - center) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weights = w.detach()
    if float(weights.norm()) == 0.0:
        raise PathlensError("probe_direction: the probe learned nothing (zero weights); add prompts of both groups.")
    accuracy = float((((xs @ weights + b.detach()) > 0).double() == y).double().mean())
    return Subspace.from_direction(
        weights.float(), site, "last", _meta(model, task, "probe", what, l2=l2, train_accuracy=accuracy)
    )


def gradient_direction(
    model: Model, task: Task, site: Site | str, groups: Tensor | None = None, max_batch_tokens: int = 2048
) -> Subspace:
    """The mean over prompts of sign_i · ∂metric_i/∂site at the scored position (sign +1 for the positive group,
    −1 for the negative one; +1 for every prompt without groups). Gradients are taken with torch.autograd.grad
    with respect to the site only: no parameter receives a .grad."""
    resolved = model.resolve(site)
    groups = default_groups(task) if groups is None else torch.as_tensor(groups, dtype=torch.bool)
    sign = torch.ones(task.n) if groups is None else groups.double() * 2 - 1  # (N,)
    total = torch.zeros(site_width(model, resolved), dtype=torch.float64)
    for rows in row_chunks(task.n, task.seq_len, max_batch_tokens):
        run = model.run(task.clean_ids[rows], attention_mask=task.attention_mask[rows], cache=[resolved], grad=True)
        values = task.rows(rows).score(run.logits)  # (R,)
        weighted = (values * sign[rows].to(values.dtype).to(values.device)).sum()
        (grad,) = torch.autograd.grad(weighted, run.cache[resolved])  # (R, P, *cell)
        at = grad[torch.arange(rows.numel()), task.answer_pos[rows].to(grad.device)]  # (R, d)
        total += at.double().sum(0).cpu()
    what = "clean prompts" if groups is None else "group True (+1) vs False (−1)"
    return Subspace.from_direction(
        (total / task.n).float(), site, "last", _meta(model, task, "gradient", what, metric=metric_name(task.metric))
    )


def random_direction(d: int, site: Site | str, seed: int = 0, norm: float = 1.0) -> Subspace:
    """A placebo: a uniformly random direction of `d` dims (seeded), with `norm` recorded as its length (a patch
    along a direction does not depend on its length, so matching the norm of the direction it stands in for is
    bookkeeping)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    return Subspace.from_direction((v / v.norm() * norm).float(), site, "last", {"finder": "random", "seed": seed})


FINDERS: dict[str, Callable[..., Subspace]] = {
    "mean-diff": mean_difference,
    "probe": probe_direction,
    "gradient": gradient_direction,
}
"""Finders that take (model, task, site) — DAS is added by `pathlens.subspace` (it lives in its own module)."""
