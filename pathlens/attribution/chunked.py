"""Attribution over a large prompt set: the prompts split into chunks, each chunk's sums computed anywhere (this
process or a Ray worker), the sums added in chunk order.

Every gradient estimator here (AtP, AtP*, RelP, integrated gradients; edge attribution in
`pathlens.circuits.edge_attribution_work`) scores a batch mean, so its result is a sum over prompts divided by
their number. A method describes what one chunk of prompts contributes as a `ChunkSums`: a small picklable
recipe (the patching spec and the method's options, no weights, no activations) whose `sums(model, task, rows)` runs the
method on the chunk's prompts alone and returns float64 sums over them, one vector per chunk (the per-variant
effects, then the base metric). `PromptChunks` plans the chunks (whole prompts, consecutive, `size` per chunk: the
plan follows from `max_batch_tokens` / `max_memory` only, never from where the chunks run), and `summed` adds
the chunks' vectors in chunk order, so a run on an executor is bit-identical to a local run with the same plan
and the same torch threads per process. `PromptChunkJob` is the `patching.executor.ChunkWork` an executor ships
to its workers: the task, the plan and the recipe; its runner's fingerprint is the recipe's sums on the first
prompt, so a worker whose model computes other numbers (other weights, dtype) is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention
from pathlens.model import Model
from pathlens.patching.executor import Executor, resolved_executor, tensor_fingerprint
from pathlens.tasks.base import Task


class ChunkSums(Protocol):
    """What one chunk of prompts contributes to a method's result: `sums(model, task, rows)` runs the method on
    the prompts `rows` of `task` alone and returns float64 sums over them, (values,)."""

    @property
    def description(self) -> str: ...

    def sums(self, model: Model, task: Task, rows: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class PromptChunks:
    """`n` prompts in consecutive chunks of `size` (the last one shorter)."""

    n: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise PathlensError(f"a chunk must hold at least one prompt, got {self.size}.")

    @property
    def count(self) -> int:
        return -(-self.n // self.size)

    def rows(self, index: int) -> Tensor:
        """The task rows of chunk `index`: (rows,)."""
        return torch.arange(index * self.size, min(self.n, (index + 1) * self.size))


@dataclass(frozen=True)
class PromptChunkJob:
    """The `ChunkWork` of a chunked attribution: rebuilt on a worker as a `PromptChunkRunner`."""

    task: Task
    chunks: PromptChunks
    method: ChunkSums

    @property
    def description(self) -> str:
        return f"{self.method.description} over {self.task.n} prompts"

    def build(self, model: Model) -> PromptChunkRunner:
        return PromptChunkRunner(model, self)


class PromptChunkRunner:
    """A chunked attribution on one process: chunk `i` is the recipe's sums over the prompts of chunk `i`."""

    def __init__(self, model: Model, job: PromptChunkJob):
        self.model, self.job = model, job

    def fingerprint(self) -> str:
        """SHA-256 of the recipe's sums on the first prompt, the task's ids and the plan: equal on two processes
        exactly when their models compute the same numbers for this job."""
        task, chunks = self.job.task, self.job.chunks
        with torch.enable_grad():
            probe = self.job.method.sums(self.model, task, torch.arange(1))
        ids = (task.clean_ids, task.corrupt_ids, task.answer_ids, task.wrong_ids, task.answer_pos, task.attention_mask)
        return tensor_fingerprint(probe, *ids, extra=f"{self.job.description}:{chunks.n}:{chunks.size}")

    def chunk_count(self) -> int:
        return self.job.chunks.count

    def run(self, index: int) -> Tensor:
        """The float64 sums of chunk `index` (gradients on, whatever the caller's mode: workers run in no_grad)."""
        with torch.enable_grad():
            return self.job.method.sums(self.model, self.job.task, self.job.chunks.rows(index))


def summed(model: Model, job: PromptChunkJob, executor: "str | Executor | None" = None) -> Tensor:
    """Σ over the chunks of `job` of their sums, added in chunk order: here (executor None or "local") or on
    `executor` ("ray" or an executor object, `patching.executor`)."""
    runner = job.build(model)
    results: dict[int, Tensor] = {}

    def done(index: int, values: Tensor) -> None:
        results.setdefault(index, values)

    todo = list(range(runner.chunk_count()))
    with resolved_executor(executor) as chosen:
        if chosen is None:
            for index in todo:
                done(index, runner.run(index))
        else:
            chosen.run(model, job, runner.fingerprint(), todo, done)
    missing = [i for i in todo if i not in results]
    if missing:
        raise PathlensError(f"the executor returned without running chunks {missing[:10]} of {job.description}.")
    total = torch.zeros_like(results[0], dtype=torch.float64)
    for index in todo:
        total += results[index]
    return total


def prompts_per_chunk(task: Task, max_batch_tokens: int | None, rows_per_prompt: int = 1) -> int:
    """Prompts per chunk for a token budget: as many whole prompts as `max_batch_tokens` holds with
    `rows_per_prompt` rows each (at least one); None: every prompt in one chunk."""
    if max_batch_tokens is None:
        return task.n
    if max_batch_tokens < 1:
        raise PathlensError(f"max_batch_tokens={max_batch_tokens} must be at least 1.")
    return max(1, max_batch_tokens // (task.seq_len * rows_per_prompt))


def check_knobs(max_batch_tokens: int | None, max_memory: int | str | None) -> None:
    """A chunk size is given one way at most."""
    if max_memory is not None and max_batch_tokens is not None:
        raise PathlensError("pass max_memory= (bytes) or max_batch_tokens= (tokens per forward), not both.")


def chunk_interventions(
    interventions: Sequence[Intervention], rows: Tensor, n: int, what: str
) -> tuple[Intervention, ...]:
    """`interventions` given for all `n` prompts, cut to the prompts `rows` of one chunk (their tensors laid out
    per prompt are indexed, `Op.restrict`). Interventions that select rows themselves cannot be chunked."""
    cut = []
    for iv in interventions:
        if iv.rows is not None:
            raise PathlensError(
                f"{what}: the intervention on {iv.site} selects rows {iv.rows}; interventions apply to every prompt "
                "(rows=None) here, since the prompts run in chunks."
            )
        cut.append(iv if int(rows.numel()) == n else dataclasses.replace(iv, op=iv.op.restrict(rows, slice(None))))
    return tuple(cut)
