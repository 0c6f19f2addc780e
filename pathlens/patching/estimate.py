"""What a run will cost before it runs: forwards (and backwards), tokens per forward, peak memory and time.

`pathlens plan` prints an `Estimate` per method; each method's estimator lives next to its engine (this module:
the patching sweep; `attribution.estimate`: AtP, AtP*, RelP, integrated gradients; `circuits.estimate`: edge
attribution, edge patching, faithfulness curves, discovery; `features.estimate`: the activation store). Every
estimator plans its chunks with the engine's own rule and sizes them from the engine's own cost model
(`patching.budget`), so the plan and the run agree on forwards and tokens.

Time comes from one timed probe forward of the task's prompts (`probe_seconds`, N·P tokens through every block): a
forward of T tokens through blocks L..n−1 costs about T·(n − L) / (N·P·n) of it, a backward about
`BACKWARD_COST` forwards. It is an estimate: attention against cached keys, hooks and the metric are not in it,
and a busy machine runs slower. For the sweep: the chunks are planned exactly as `patch` plans them
(`sweep.planned_chunks`), plus its two base runs; chunks whose variants patch nothing (their positions all lie in
the prompts' shared prefix) are read from the base run and run no forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.model import Model
from pathlens.patching.budget import sweep_cost
from pathlens.patching.spec import PatchSpec
from pathlens.patching.sweep import Ablation, executed_variant, planned_chunks, token_budget
from pathlens.tasks.base import Task

BASE_RUNS = 2
"""Forwards a sweep runs before its chunks: the base prompts (into the cone runner) and the source prompts."""
BACKWARD_COST = 2.0
"""A backward pass in forwards of the same tokens (it multiplies by each weight twice: for inputs and weights)."""


@dataclass(frozen=True)
class Estimate:
    """A run's plan in numbers.

    forwards / backwards: passes the run makes (a forward through part of the model counts as one);
    `forwards_max`: for a run whose later steps depend on what it measures (discovery), the most it can make
    (None: `forwards` is exact). max_batch_tokens: the most tokens one forward holds. peak_bytes: the estimated
    peak of the memory the run allocates besides the weights; least_bytes: the smallest `max_memory` that runs it
    (equal to the peak for an engine that does not chunk). seconds: estimated from `forward_seconds`, the measured
    time of one probe forward. units: what the run iterates over ({"variants": 144}); notes: what the estimate
    leaves out or assumes."""

    method: str
    forwards: int
    backwards: int
    max_batch_tokens: int
    peak_bytes: int
    least_bytes: int
    seconds: float
    forward_seconds: float
    units: dict[str, int] = field(default_factory=dict)
    forwards_max: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def variants(self) -> int:
        """The cells of a sweep (0 for other methods)."""
        return self.units.get("variants", 0)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "notes": list(self.notes)}


def probe_seconds(model: Model, ids: Tensor, attention_mask: Tensor | None = None) -> float:
    """Seconds of one plain forward of `ids` (the second of two: the first pays one-off set-up costs)."""
    seconds = []
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            model.run(ids, attention_mask=attention_mask)
            seconds.append(time.perf_counter() - start)
    return seconds[-1]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def estimate_patch(
    model: Model,
    task: Task,
    sites: Any = "heads",
    positions: Any = "all",
    direction: Any = "noise",
    ablation: Ablation | None = None,
    layers: Any = None,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
) -> Estimate:
    """The estimate of `patch(model, task, ...)` with these arguments (see the module docstring); runs two probe
    forwards."""
    setup = PatchSpec(sites, positions, direction, None, layers, None).resolve(model, task)
    tokens = token_budget(setup, max_batch_tokens, max_memory)
    chunks = planned_chunks(setup, ablation, tokens)
    through_z = setup.spec.subspace is None
    families = {executed_variant(v, 0, task.seq_len, through_z).site.family for v in setup.plan.variants}
    last_start = max(v.start_position for v in setup.plan.variants)
    cost = sweep_cost(model, task.n, task.seq_len, families, len(setup.plan.variants), last_start)
    forward = probe_seconds(model, task.clean_ids, task.attention_mask)
    layers_total, whole = model.n_layers, task.n * task.seq_len * model.n_layers
    work, runs = 0, [c for c in chunks if c.start < task.seq_len]
    for chunk in runs:
        rows = len(chunk.variants) * (chunk.row_stop - chunk.row_start)
        blocks = layers_total if chunk.layer is None else max(0, layers_total - chunk.layer)
        work += rows * (task.seq_len - chunk.start) * blocks
    return Estimate(
        method="patch",
        forwards=len(runs) + BASE_RUNS,
        backwards=0,
        max_batch_tokens=tokens,
        peak_bytes=cost.peak(tokens),
        least_bytes=cost.least,
        seconds=forward * (BASE_RUNS + work / whole),
        forward_seconds=forward,
        units={"variants": len(setup.plan.variants), "chunks": len(chunks)},
    )
