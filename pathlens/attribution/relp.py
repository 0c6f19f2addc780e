"""RelP (relevance patching, Rezaei Jafari et al. 2025, arXiv 2508.21258): AtP's product with an LRP backward.

    RelP(n) = (n_s − n_b) · ∂̃m/∂n |_b

where ∂̃ is the backward pass under LRP rules (`pathlens.attribution.lrp`), so gradient × input is LRP
relevance. The forward pass — and so the base metric — is unchanged; the cost is AtP's. Same Scores layout
as `pathlens.patch` and `atp`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pathlens.attribution.atp import cells, estimate_scores, first_order
from pathlens.attribution.lrp import rules_for
from pathlens.model import Model
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, Positions, Sites
from pathlens.results import Scores
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric


def relp(
    model: Model,
    task: Task,
    sites: Sites = "heads",
    positions: Positions = "all",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    rules: Collection[str] | None = None,
) -> Scores:
    """RelP estimates of `pathlens.patch(model, task, sites, positions, direction)` under LRP `rules` (default:
    `lrp.DEFAULT_RULES`; add "AH" to treat attention patterns as constants). direction: "noise" by default
    (`DEFAULT_DIRECTION`, every method's: what circuit discovery patches)."""
    setup = PatchSpec(sites, positions, direction, metric, layers, neurons).resolve(model, task)
    chosen = rules_for(rules)
    fo = first_order(setup, setup.plan, rules=chosen)
    return estimate_scores(
        setup, cells(setup.plan, fo.effect), fo.base_metric, f"relp:{direction}", rules=sorted(chosen)
    )
