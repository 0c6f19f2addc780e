"""Attribution patching (AtP): a first-order estimate of every patching cell from two forwards and one backward.

For a variant patching site n at positions S, with base run b and source run s (denoise: b = corrupted,
s = clean; noise: the reverse):

    m(patched) ≈ m(b) + Σ_{p ∈ S} (n_s − n_b)[p] · ∂m/∂n[p] |_b

The result is a `Scores` with exactly the dims, coords and meaning (the patched metric, batch mean) of
`pathlens.patch` on the same arguments, so the two compare cell by cell (`Scores.corr`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching.plan import make_plan
from pathlens.results import Scores
from pathlens.sites import INDEX_LETTER
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import metric_name


def atp(
    model: Model,
    task: Task,
    sites: Any = "heads",
    positions: "str | Sequence[int]" = "all",
    direction: str = "denoise",
    metric: Callable[[Tensor, Task], Tensor] | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
) -> Scores:
    """AtP estimates of `pathlens.patch(model, task, sites, positions, direction)`: same Scores layout."""
    if direction not in ("denoise", "noise"):
        raise PathlensError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    metric = metric or task.metric
    assert metric is not None
    plan = make_plan(model, sites, positions, task.seq_len, layers=layers, neurons=neurons)
    families = sorted({v.site.family for v in plan.variants}, key=str)
    base_ids, source_ids = (
        (task.corrupt_ids, task.clean_ids) if direction == "denoise" else (task.clean_ids, task.corrupt_ids)
    )
    source = model.run(source_ids, attention_mask=task.attention_mask, cache=families)
    base = model.run(base_ids, attention_mask=task.attention_mask, cache=families, grad=True)
    per_prompt = metric(base.logits, task)
    grads = torch.autograd.grad(per_prompt.mean(), [base.cache[f] for f in families], allow_unused=True)
    # per-prompt first-order effect of each family, summed over features but not over its index axis
    # (head / group / neuron): (N, P) or (N, P, index)
    effect: dict[Any, Tensor] = {}
    for family, grad in zip(families, grads, strict=True):
        delta = source.cache[family] - base.cache[family].detach()
        product = delta * (torch.zeros_like(delta) if grad is None else grad) * task.n
        keep = 3 if family.kind in INDEX_LETTER else 2
        effect[family] = product.sum(dim=tuple(range(keep, product.ndim))) if product.ndim > keep else product
    values = torch.empty(len(plan.variants), dtype=torch.float64)
    for v in plan.variants:
        e = effect[v.site.family]
        if e.ndim == 3:
            e = e.sum(dim=2) if v.site.index is None else e[:, :, v.site.index]
        e = e if v.positions is None else e[:, list(v.positions)]
        values[v.cell] = e.sum(dim=1).mean().double()
    base_metric = float(per_prompt.detach().mean())
    return Scores(
        values=(base_metric + values).reshape(plan.shape).float(),
        dims=plan.dims,
        coords=plan.coords,
        metric=metric_name(metric),
        method=f"atp:{direction}",
        meta={"model": model.name, "task": task.name, "n_prompts": task.n, "base_metric": base_metric},
    )
