"""Exact edge effects: the metric change when one edge alone (or one set of edges) is patched in the full model.

    effect(u → v) = m(every edge but u → v) − m(every edge)

m(every edge) is the unpatched run; in the row of edge u → v only the receiver v reads the residual stream with
u's write replaced by its source value (`EdgePatcher`). Every row is one circuit of the same batched patcher
call, so scoring E edges costs E + 1 circuits, chunked by the patcher: reference-grade scores for small graphs
or a chosen subset of edges. Discovery's "patching" method scores every edge this way, `pathways` re-scores the
edges of its candidate paths, and path patching removes each sender's edges into chosen receivers
(`metrics_without`, which takes any set of edges per row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.layout import valid_mask
from pathlens.graph import Graph
from pathlens.tasks.metrics import metric_name


def metrics_without(
    patcher: EdgePatcher, n: int, rows: Tensor, senders: Tensor, receivers: Tensor
) -> tuple[float, Tensor]:
    """m(every edge), and for each k < n the batch-mean metric (n,) with every edge kept but the edges
    (senders[i], receivers[i]) whose rows[i] == k; the three index tensors have one entry per removed edge."""
    full = valid_mask(patcher.layout, patcher.model.arch.n_layers)
    kept = full[None].repeat(n + 1, 1, 1)  # (n + 1, S, R); circuit 0 keeps every edge
    kept[rows + 1, senders, receivers] = False
    values = patcher.metric_of(kept)
    return float(values[0]), values[1:]


def edge_effects(patcher: EdgePatcher, edges: Tensor | None = None) -> Graph:
    """Exact effect of each edge alone (module docstring), for every edge of the model's graph or those `edges`
    (S, R) bool marks; other pairs score NaN. A Graph of method "patching:edges" whose meta holds the unpatched
    metric (`base_metric`), the direction and the ablation of `patcher`."""
    layout = patcher.layout
    full = valid_mask(layout, patcher.model.arch.n_layers)
    cells = torch.nonzero(full if edges is None else edges & full)  # (E, 2) in row-major order
    base, values = metrics_without(patcher, len(cells), torch.arange(len(cells)), cells[:, 0], cells[:, 1])
    scores = torch.full(full.shape, float("nan"))
    scores[cells[:, 0], cells[:, 1]] = (values - base).float()
    a, task = patcher.model.arch, patcher.task
    meta = {
        "model": patcher.model.name,
        "task": task.name,
        "n_prompts": task.n,
        "direction": patcher.direction,
        "ablation": patcher.ablation,
        "base_metric": base,
        "heads_per_group": a.n_heads // a.n_kv_heads,
    }
    return Graph(layout.senders, layout.receivers, scores, metric_name(patcher.metric), "patching:edges", meta)
