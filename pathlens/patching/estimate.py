"""What a patching sweep will cost before it runs: forwards, tokens, peak memory and time (`pathlens plan`).

The chunks are planned exactly as `patch` plans them (`sweep.planned_chunks`), the memory from the sweep's cost
model (`patching.budget`), and the time from one timed forward of the task's prompts: a chunk of T tokens that
runs blocks L..n−1 costs about T·(n − L) / (N·P·n) of that forward (plus the two base runs). It is an estimate: the
cone's attention against cached keys and the logits are not in it, and a busy machine runs slower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from pathlens.model import Model
from pathlens.patching.budget import sweep_cost
from pathlens.patching.spec import PatchSpec
from pathlens.patching.sweep import Ablation, executed_variant, planned_chunks, token_budget
from pathlens.tasks.base import Task

BASE_RUNS = 2
"""Forwards a sweep runs before its chunks: the base prompts (into the cone runner) and the source prompts."""


@dataclass(frozen=True)
class SweepEstimate:
    """A sweep's plan in numbers: variants, chunks (= patched forwards), their largest token count, the estimated
    peak memory (bytes), the estimated seconds and the measured seconds of one forward of the prompts."""

    variants: int
    forwards: int
    max_batch_tokens: int
    peak_bytes: int
    least_bytes: int
    seconds: float
    forward_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
) -> SweepEstimate:
    """The estimate of `patch(model, task, ...)` with these arguments (see the module docstring); runs one forward."""
    setup = PatchSpec(sites, positions, direction, None, layers, None).resolve(model, task)
    tokens = token_budget(setup, max_batch_tokens, max_memory)
    chunks = planned_chunks(setup, ablation, tokens)
    through_z = setup.spec.subspace is None
    families = {executed_variant(v, 0, task.seq_len, through_z).site.family for v in setup.plan.variants}
    last_start = max(v.start_position for v in setup.plan.variants)
    cost = sweep_cost(model, task.n, task.seq_len, families, len(setup.plan.variants), last_start)
    with torch.no_grad():
        start = time.perf_counter()
        model.run(task.clean_ids, attention_mask=task.attention_mask)
        forward = time.perf_counter() - start
    layers_total, whole = model.n_layers, task.n * task.seq_len * model.n_layers
    work = 0
    for chunk in chunks:
        rows = len(chunk.variants) * (chunk.row_stop - chunk.row_start)
        blocks = layers_total if chunk.layer is None else max(0, layers_total - chunk.layer)
        work += rows * (task.seq_len - chunk.start) * blocks
    return SweepEstimate(
        variants=len(setup.plan.variants),
        forwards=len(chunks) + BASE_RUNS,
        max_batch_tokens=tokens,
        peak_bytes=cost.peak(tokens),
        least_bytes=cost.least,
        seconds=forward * (BASE_RUNS + work / whole),
        forward_seconds=forward,
    )
