"""Edge attribution over a large prompt set: the prompts in chunks, each chunk scored by `edge_attribution` on its
own prompts (here or on a Ray worker), the chunks' sums added in chunk order (`pathlens.attribution.chunked`).

`edge_attribution` returns batch means: the mean over a chunk's (prompt, step) rows of every edge's score and the
mean base metric over its prompts. Times the chunk's rows (prompts), they are the chunk's sums, which add up over
the chunks to the sums over every prompt; divided by the number of rows (prompts), the graph of the whole set. A
chunk holds only its own prompts' sender differences Δz (senders × prompts × P × d_model in the engine), so the
memory such a run needs stops growing with the number of prompts. The plan follows from `max_batch_tokens` (as
many whole prompts as one forward holds with all their steps) or `max_memory` (`patching.budget`'s
`edge_attribution_cost` of a chunk), never from where the chunks run, so a run on an executor is bit-identical to
the same chunks run here, `edge_attribution(..., executor="local")` (which calls `edge_attribution_over_chunks`),
with the same torch threads per process. Each
chunk's means are float32, so the chunked graph equals one unchunked run to float32 rounding (about 1e-7
relative).

Not for models with spliced dictionaries: their latent nodes are those that move on the prompts at hand, so every
chunk would score another graph.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pathlens.attribution.chunked import (
    PromptChunkJob,
    PromptChunks,
    check_knobs,
    chunk_interventions,
    prompts_per_chunk,
    summed,
)
from pathlens.circuits.edge_attribution import DEFAULT_ATTRIBUTION_BATCH_TOKENS, EdgeMethod, edge_attribution
from pathlens.circuits.layout import post_norms
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.interventions import Intervention
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.budget import edge_attribution_cost, prompt_chunk_for
from pathlens.patching.executor import Executor
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric


@dataclass(frozen=True)
class EdgeAttributionSums:
    """The `ChunkSums` of edge attribution: `edge_attribution` on one chunk's prompts, its mean scores times the
    chunk's (prompt, step) rows and its mean base metric times its prompts, (senders·receivers + 1,) float64.
    `senders` / `receivers` are the graph's, checked on every chunk."""

    method: EdgeMethod
    direction: Direction
    metric: Metric | None
    steps: int
    rules: Collection[str] | None
    max_batch_tokens: int
    clean_interventions: tuple[Intervention, ...]
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    description: str = "edge attribution"

    def sums(self, model: Model, task: Task, rows: Tensor) -> Tensor:
        clean_side = chunk_interventions(self.clean_interventions, rows, task.n, "edge_attribution")
        graph = self.graph(model, task.rows(rows), clean_side)
        if tuple(graph.senders) != self.senders or tuple(graph.receivers) != self.receivers:
            raise PathlensError(
                f"edge attribution over prompt chunks: chunk of prompts {int(rows[0])}..{int(rows[-1])} has another "
                "graph than the first prompt's (its senders or receivers differ); run edge_attribution without "
                "executor= on this model."
            )
        count = int(rows.numel())
        n_rows = count * int(graph.meta["steps"])
        base = torch.tensor([float(graph.meta["base_metric"]) * count], dtype=torch.float64)
        return torch.cat([graph.scores.double().flatten() * n_rows, base])

    def graph(self, model: Model, task: Task, clean_side: Sequence[Intervention]) -> Graph:
        """`edge_attribution` of `task` in this process, chunked by the engine to `max_batch_tokens`."""
        return edge_attribution(
            model,
            task,
            self.method,
            direction=self.direction,
            metric=self.metric,
            steps=self.steps,
            rules=self.rules,
            max_batch_tokens=self.max_batch_tokens,
            clean_interventions=clean_side,
        )


def edge_attribution_over_chunks(
    model: Model,
    task: Task,
    method: EdgeMethod = "eap",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    steps: int = 5,
    rules: Collection[str] | None = None,
    max_batch_tokens: int | None = None,
    clean_interventions: Sequence[Intervention] = (),
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Graph:
    """`edge_attribution(model, task, ...)` with the prompts in chunks (module docstring), run here (executor None
    or "local") or on `executor` ("ray" or an executor object such as `pathlens.distributed.RayExecutor`).

    max_batch_tokens: tokens per forward (default `DEFAULT_ATTRIBUTION_BATCH_TOKENS`): chunks of as many whole
    prompts as one forward holds with all their steps (at least one prompt); max_memory: instead, the bytes a chunk
    may hold (an int or a string such as "2GB"): prompts per chunk and rows per forward from
    `patching.budget.edge_attribution_cost`. The graph's meta records `prompts_per_chunk` (and `max_memory`)."""
    check_knobs(max_batch_tokens, max_memory)
    if model.splices:
        raise PathlensError(
            "edge attribution over prompt chunks does not take a model with spliced dictionaries (their latent nodes "
            "depend on the prompts, so each chunk would score another graph); call edge_attribution without "
            "executor= on it."
        )
    first = torch.arange(1)
    probe = edge_attribution(
        model,
        task.rows(first),
        method,
        direction=direction,
        metric=metric,
        steps=steps,
        rules=rules,
        clean_interventions=chunk_interventions(clean_interventions, first, task.n, "edge_attribution"),
    )
    n_steps = int(probe.meta["steps"])
    if max_memory is None:
        tokens = DEFAULT_ATTRIBUTION_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
        chunks = PromptChunks(task.n, prompts_per_chunk(task, tokens, rows_per_prompt=n_steps))
    else:
        post = post_norms(model) is not None
        size, rows = prompt_chunk_for(
            lambda k: edge_attribution_cost(model, k, task.seq_len, len(probe.senders), post),
            parse_bytes(max_memory),
            n_steps,
            task.n,
        )
        chunks, tokens = PromptChunks(task.n, size), rows * task.seq_len
    recipe = EdgeAttributionSums(
        method,
        direction,
        metric,
        steps,
        rules,
        tokens,
        tuple(clean_interventions),
        tuple(probe.senders),
        tuple(probe.receivers),
    )
    total = summed(model, PromptChunkJob(task, chunks, recipe), executor)
    scores = total[:-1] / (task.n * n_steps)  # (S·R,)
    budget = {"max_memory": parse_bytes(max_memory)} if max_memory is not None else {}
    return Graph(
        senders=probe.senders,
        receivers=probe.receivers,
        scores=scores.reshape(probe.scores.shape).float(),
        metric=probe.metric,
        method=probe.method,
        meta={
            **probe.meta,
            "n_prompts": task.n,
            "base_metric": float(total[-1] / task.n),
            "prompts_per_chunk": chunks.size,
            **budget,
        },
    )
