"""RelP (relevance patching, Rezaei Jafari et al. 2025, arXiv 2508.21258): AtP's product with an LRP backward.

    RelP(n) = (n_s − n_b) · ∂̃m/∂n |_b

where ∂̃ is the backward pass under LRP rules (`pathlens.attribution.lrp`), so gradient × input is LRP
relevance. The forward pass — and so the base metric — is unchanged; the cost is AtP's. Same Scores layout
as `pathlens.patch` and `atp`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from pathlens.attribution.atp import FirstOrderSums, chunk_meta, estimate_scores, first_order_chunks
from pathlens.attribution.chunked import PromptChunkJob, summed
from pathlens.attribution.lrp import rules_for
from pathlens.model import Model
from pathlens.patching.executor import Executor
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
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Scores:
    """RelP estimates of `pathlens.patch(model, task, sites, positions, direction)` under LRP `rules` (default:
    `lrp.DEFAULT_RULES`; add "AH" to treat attention patterns as constants). direction: "noise" by default
    (`DEFAULT_DIRECTION`, every method's: what circuit discovery patches). max_batch_tokens / max_memory /
    executor: the prompts in chunks and where they run, as for `atp`."""
    setup = PatchSpec(sites, positions, direction, metric, layers, neurons).resolve(model, task)
    chosen = rules_for(rules)
    chunks = first_order_chunks(setup, setup.plan, max_batch_tokens, max_memory)
    total = summed(model, PromptChunkJob(setup.task, chunks, FirstOrderSums(setup.spec, frozenset(chosen))), executor)
    return estimate_scores(setup, total, f"relp:{direction}", rules=sorted(chosen), **chunk_meta(chunks, max_memory))
