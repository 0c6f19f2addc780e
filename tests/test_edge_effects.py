"""Exact edge effects: each edge's score is the metric change when that edge alone is patched, measured with
the patcher's own circuits, for every edge or a chosen subset; path patching drops a set of edges per row."""

from __future__ import annotations

import torch

from pathlens.circuits.edge_effects import edge_effects, metrics_without
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.layout import valid_mask
from tests.helpers import padded_task, tiny_model


def test_each_edge_scores_the_metric_change_of_patching_it_alone() -> None:
    patcher = EdgePatcher(tiny_model("llama"), padded_task())
    full = valid_mask(patcher.layout, patcher.model.arch.n_layers)
    graph = edge_effects(patcher)
    assert torch.equal(graph.valid, full) and graph.method == "patching:edges"
    cells = torch.nonzero(full)[::37]
    kept = full[None].repeat(len(cells), 1, 1)
    kept[torch.arange(len(cells)), cells[:, 0], cells[:, 1]] = False
    alone = patcher.metric_of(kept) - patcher.metric_of(full[None])[0]
    torch.testing.assert_close(graph.scores[cells[:, 0], cells[:, 1]], alone.float(), atol=1e-5, rtol=0)
    assert graph.meta["direction"] == "noise" and graph.meta["heads_per_group"] == 2
    assert abs(graph.meta["base_metric"] - float(patcher.metric_of(full[None])[0])) < 1e-6

    chosen = torch.zeros_like(full)
    chosen[cells[:, 0], cells[:, 1]] = True
    subset = edge_effects(patcher, edges=chosen)
    assert torch.equal(subset.valid, chosen)
    torch.testing.assert_close(subset.scores[chosen], graph.scores[chosen], atol=1e-5, rtol=0)


def test_metrics_without_drops_every_edge_of_a_row() -> None:
    patcher = EdgePatcher(tiny_model("gpt2"), padded_task())
    full = valid_mask(patcher.layout, patcher.model.arch.n_layers)
    row, cols = 1, [patcher.layout.receivers.index("logits"), patcher.layout.receivers.index("L1.mlp")]
    base, values = metrics_without(
        patcher, 2, torch.tensor([1, 1]), torch.tensor([row, row]), torch.tensor(cols, dtype=torch.long)
    )
    kept = full.clone()
    kept[row, cols] = False
    assert abs(base - float(patcher.metric_of(full[None])[0])) < 1e-6
    assert abs(float(values[0]) - base) < 1e-6  # circuit 0 drops nothing
    assert abs(float(values[1]) - float(patcher.metric_of(kept[None])[0])) < 1e-6
