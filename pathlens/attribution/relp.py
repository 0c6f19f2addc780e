"""RelP (relevance patching, Rezaei Jafari et al. 2025, arXiv 2508.21258): AtP's product with an LRP backward.

    RelP(n) = (n_s − n_b) · ∂̃m/∂n |_b

where ∂̃ is the backward pass under LRP rules (`pathlens.attribution.lrp`), so gradient × input is LRP
relevance. The forward pass — and so the base metric — is unchanged; the cost is AtP's. Same Scores layout
as `pathlens.patch` and `atp`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from pathlens.attribution.atp import Metric, cells, estimate_scores, first_order
from pathlens.attribution.lrp import rules_for
from pathlens.model import Model
from pathlens.patching.plan import make_plan
from pathlens.results import Scores
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import metric_name


def relp(
    model: Model,
    task: Task,
    sites: Any = "heads",
    positions: "str | Sequence[int]" = "all",
    direction: str = "denoise",
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    rules: Collection[str] | None = None,
) -> Scores:
    """RelP estimates of `pathlens.patch(model, task, sites, positions, direction)` under LRP `rules` (default:
    `lrp.DEFAULT_RULES`; add "AH" to treat attention patterns as constants)."""
    metric = metric or task.metric
    assert metric is not None
    chosen = rules_for(rules)
    plan = make_plan(model, sites, positions, task.seq_len, layers=layers, neurons=neurons)
    fo = first_order(model, task, plan, direction, metric, rules=chosen)
    meta = {
        "model": model.name,
        "task": task.name,
        "n_prompts": task.n,
        "metric": metric_name(metric),
        "rules": sorted(chosen),
    }
    return estimate_scores(plan, cells(plan, fo.effect), fo.base_metric, f"relp:{direction}", meta)
