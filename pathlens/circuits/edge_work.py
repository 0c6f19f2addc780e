"""Edge-patching evaluations as executor work: the circuits a faithfulness curve, `edge_effects` or discovery
evaluate, run here or with their chunks spread over an executor (`patching.executor`, e.g. Ray's).

`metric_of(patcher, kept, executor)` is `patcher.metric_of(kept)` wherever it runs. With an executor the chunks
are the patcher's own forwards (`EdgePatcher.row_chunks`: consecutive (circuit, prompt) rows, as many per forward
as its `max_batch_tokens` allows), each run by index on a worker that rebuilt the patcher from an `EdgeRecipe`
(task, ablation, direction, metric and the resolved tokens per forward: a few tensors and names, never the model
or its activations). Every chunk is recorded once, the rows are averaged here exactly as `metric_of` averages
them, so the values equal the local run's bit for bit given the same torch threads per process; a worker whose
source run differs (other weights, dtype, threads) is refused by the fingerprint of the patcher's source state.

A worker keeps the last patcher it built and reuses it for the next job of an equal recipe (same task tensors and
options, the same metric object: a function imported by name; a metric pickled by value, such as a lambda, is
rebuilt each time), so the evaluations of one discovery or repeated curves pay the source run once per worker.

Edge evaluations keep no checkpoint (a curve is a few batched forwards); a `max_memory=` budget reaches every
worker as the token count it resolved to on the driver, so workers chunk alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching.executor import Executor, tensor_fingerprint
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric


@dataclass(frozen=True)
class EdgeRecipe:
    """What rebuilds an `EdgePatcher` on another process: its task (with its metric), ablation, direction and the
    tokens per forward it resolved (so a `max_memory` budget chunks the same everywhere)."""

    task: Task
    ablation: str
    direction: str
    metric: Metric
    max_batch_tokens: int

    @classmethod
    def of(cls, patcher: EdgePatcher) -> EdgeRecipe:
        return cls(patcher.task, patcher.ablation, patcher.direction, patcher.metric, patcher.max_batch_tokens)

    def build(self, model: Model) -> EdgePatcher:
        """The patcher on `model` (its source run included)."""
        return EdgePatcher(model, self.task, self.ablation, self.direction, self.metric, self.max_batch_tokens)

    def equals(self, other: EdgeRecipe) -> bool:
        """Whether `other` builds the same patcher: equal options and task tensors, the same metric object."""
        return (
            (self.ablation, self.direction, self.max_batch_tokens)
            == (other.ablation, other.direction, other.max_batch_tokens)
            and self.metric is other.metric
            and all(_same(getattr(self.task, f.name), getattr(other.task, f.name)) for f in fields(self.task))
        )


def _same(a: Any, b: Any) -> bool:
    """Deep equality of task fields: tensors bit for bit (dtype and shape too), containers item by item,
    callables by identity, anything else by ==."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if callable(a) or callable(b):
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # values without a plain truth value: build anew
        return False


_last_built: list[tuple[EdgeRecipe, EdgePatcher]] = []
"""The patcher a worker built for its last job, with its recipe (at most one: see the module docstring)."""


def built_on(model: Model, recipe: EdgeRecipe) -> EdgePatcher:
    """`recipe.build(model)`, or the patcher this process built last if it was for `model` and an equal recipe."""
    if _last_built:
        last, patcher = _last_built[0]
        if patcher.model is model and last.equals(recipe):
            return patcher
        _last_built.clear()  # free the old patcher's source state before building the next
    patcher = recipe.build(model)
    _last_built.append((recipe, patcher))
    return patcher


class EdgeChunks:
    """A `ChunkRunner`: the forwards of `patcher.metric_of(kept)` run by index."""

    def __init__(self, patcher: EdgePatcher, kept: Tensor):
        self.patcher, self.kept = patcher, kept
        self.chunks = patcher.row_chunks(int(kept.shape[0]))

    def fingerprint(self) -> str:
        """SHA-256 of the patcher's source state (sender outputs and residuals), the circuits and the chunk plan:
        equal on two processes exactly when their chunks compute the same numbers."""
        p = self.patcher
        sources = [p.source[site] for site in sorted(p.source, key=str)]
        residuals = [p.source_resid[stop] for stop in sorted(p.source_resid)]
        plan = f"{p.source_metric!r};{[(r.start, r.stop) for r in self.chunks]}"
        return tensor_fingerprint(*sources, *residuals, self.kept, extra=plan)

    def chunk_count(self) -> int:
        return len(self.chunks)

    def run(self, index: int) -> Tensor:
        """Metric (B,) float64 of the rows of chunk `index`."""
        return self.patcher.rows_metric(self.kept, self.chunks[index])


@dataclass(frozen=True)
class EdgeWork:
    """A `ChunkWork`: the circuits `kept` (K, S, R) bool of an `EdgeRecipe`."""

    recipe: EdgeRecipe
    kept: Tensor

    @property
    def description(self) -> str:
        return f"edge patching {int(self.kept.shape[0])} circuits"

    def build(self, model: Model) -> EdgeChunks:
        return EdgeChunks(built_on(model, self.recipe), self.kept)


def metric_of(patcher: EdgePatcher, kept: Tensor, executor: Executor | None = None) -> Tensor:
    """Batch-mean metric (K,) of each circuit in `kept` (K, S, R) bool: `patcher.metric_of(kept)`, run in this
    process (executor None) or chunk by chunk on `executor` (module docstring), with the same values."""
    if executor is None:
        return patcher.metric_of(kept)
    if kept.ndim != 3 or tuple(kept.shape[1:]) != (patcher.n_senders, patcher.n_receivers):
        raise PathlensError(
            f"kept must have shape (circuits, {patcher.n_senders}, {patcher.n_receivers}), got {tuple(kept.shape)}."
        )
    kept = kept.bool().cpu().contiguous()
    runner = EdgeChunks(patcher, kept)
    values = torch.empty(int(kept.shape[0]) * patcher.task.n, dtype=torch.float64)
    finished = [False] * runner.chunk_count()

    def done(index: int, chunk: Tensor) -> None:
        if not finished[index]:  # a chunk an executor returns twice counts once
            rows = runner.chunks[index]
            values[rows.start : rows.stop] = chunk
            finished[index] = True

    todo: Sequence[int] = range(runner.chunk_count())
    executor.run(patcher.model, EdgeWork(EdgeRecipe.of(patcher), kept), runner.fingerprint(), todo, done)
    missing = [i for i, ok in enumerate(finished) if not ok]
    if missing:
        raise PathlensError(f"the executor returned without running chunks {missing[:10]} of this edge evaluation.")
    return values.view(-1, patcher.task.n).mean(dim=1)
