"""Exact edge effects: the metric change when one edge alone (or one set of edges) is patched in the full model.

    effect(u → v) = m(every edge but u → v) − m(every edge)

m(every edge) is the unpatched run; in the row of edge u → v only the receiver v reads the residual stream with
u's write replaced by its source value (`EdgePatcher`). Every row is one circuit of the same batched patcher
call, so scoring E edges costs E + 1 circuits, chunked by the patcher: reference-grade scores for small graphs
or a chosen subset of edges. `edge_effects(model, task)` builds its own patcher; `edge_effects(patcher, edges=)`
reuses one. `executor=` ("ray" or an executor object) runs the rows' forwards on workers, bit-identical to a local
run (`circuits.edge_work`); `max_memory=` sizes the forwards to a memory budget. Discovery's "patching" method
scores every edge this way, `pathways` re-scores the edges of its candidate paths, and path patching removes each
sender's edges into chosen receivers (`metrics_without`, which takes any set of edges per row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.edge_work import metric_of
from pathlens.circuits.layout import valid_mask
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.model import Model
from pathlens.patching.executor import Executor, resolved_executor
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric, metric_name


def metrics_without(
    patcher: EdgePatcher, n: int, rows: Tensor, senders: Tensor, receivers: Tensor, executor: Executor | None = None
) -> tuple[float, Tensor]:
    """m(every edge), and for each k < n the batch-mean metric (n,) with every edge kept but the edges
    (senders[i], receivers[i]) whose rows[i] == k; the three index tensors have one entry per removed edge.
    executor: where the rows run (`circuits.edge_work.metric_of`; None: here)."""
    full = valid_mask(patcher.layout, patcher.model.arch.n_layers)
    kept = full[None].repeat(n + 1, 1, 1)  # (n + 1, S, R); circuit 0 keeps every edge
    kept[rows + 1, senders, receivers] = False
    values = metric_of(patcher, kept, executor)
    return float(values[0]), values[1:]


def edge_effects(
    model: Model | EdgePatcher,
    task: Task | None = None,
    edges: Tensor | None = None,
    direction: Direction | None = None,
    ablation: str = "patch",
    metric: Metric | None = None,
    max_batch_tokens: int | None = None,
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Graph:
    """Exact effect of each edge alone (module docstring), for every edge of the model's graph or those `edges`
    (S, R) bool marks; other pairs score NaN. A Graph of method "patching:edges" whose meta holds the unpatched
    metric (`base_metric`), the direction and the ablation.

    `edge_effects(model, task, edges=None, direction=...)` builds the `EdgePatcher` (direction default
    `DEFAULT_DIRECTION`, "noise": the clean run with the edge's sender corrupted, what discovery and
    faithfulness patch; `ablation`, `metric`, `max_batch_tokens` (default: the patcher's) and `max_memory` (a
    budget such as "2GB" instead of `max_batch_tokens`; passing both raises) as `EdgePatcher` takes them).
    `edge_effects(patcher, edges=...)` reuses a patcher already built (its source run cached), as discovery and
    `pathways` do; its task, direction, ablation, metric and budget are the patcher's, so passing them is an error.
    executor: where the rows' forwards run: None / "local", "ray" (a local Ray cluster for this call) or an
    executor object such as `pathlens.distributed.RayExecutor(address=...)`; scores are bit-identical to the local
    run's (same torch threads per process)."""
    if isinstance(model, EdgePatcher):
        patcher = model
        given = {
            "task": task,
            "direction": direction,
            "metric": metric,
            "max_batch_tokens": max_batch_tokens,
            "max_memory": max_memory,
        }
        clashes = [name for name, value in given.items() if value is not None] + ["ablation"] * (ablation != "patch")
        if clashes:
            raise PathlensError(
                f"edge_effects(patcher, ...) takes {', '.join(clashes)} from the patcher; pass only edges= (by "
                "keyword), or call edge_effects(model, task, ...) to build a new patcher."
            )
    elif task is None:
        raise PathlensError("edge_effects(model, task, ...) needs the task: pass it second, or pass an EdgePatcher.")
    else:
        patcher = EdgePatcher(
            model, task, ablation, direction or DEFAULT_DIRECTION, metric, max_batch_tokens, max_memory
        )
    layout = patcher.layout
    full = valid_mask(layout, patcher.model.arch.n_layers)
    if edges is not None and tuple(edges.shape) != tuple(full.shape):
        raise PathlensError(
            f"edges must be a (senders, receivers) = {tuple(full.shape)} bool mask, got shape {tuple(edges.shape)}."
        )
    cells = torch.nonzero(full if edges is None else edges.bool() & full)  # (E, 2) in row-major order
    with resolved_executor(executor) as runner:
        base, values = metrics_without(patcher, len(cells), torch.arange(len(cells)), cells[:, 0], cells[:, 1], runner)
    scores = torch.full(full.shape, float("nan"))
    scores[cells[:, 0], cells[:, 1]] = (values - base).float()
    a, run_task = patcher.model.arch, patcher.task
    meta = {
        "model": patcher.model.name,
        "task": run_task.name,
        "n_prompts": run_task.n,
        "direction": patcher.direction,
        "ablation": patcher.ablation,
        "base_metric": base,
        "heads_per_group": a.n_heads // a.n_kv_heads,
    }
    return Graph(layout.senders, layout.receivers, scores, metric_name(patcher.metric), "patching:edges", meta)
