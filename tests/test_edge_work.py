"""The edge work an executor runs (`pathlens.circuits.edge_work`), without Ray: an executor in this process that
delivers the chunks out of order and twice gives `EdgePatcher.metric_of`'s values bit for bit (the reference);
one that skips a chunk raises; a worker reuses its patcher only for an equal recipe."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

import pathlens
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.edge_work import EdgeRecipe, built_on, metric_of
from pathlens.circuits.layout import valid_mask
from pathlens.model import Model
from pathlens.patching.executor import ChunkWork
from pathlens.tasks.base import logit_diff
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model


class Shuffled:
    """Runs the chunks here, last first, each delivered twice; with `skip`, never runs chunk `skip`."""

    def __init__(self, skip: int | None = None):
        self.skip = skip

    def run(
        self, model: Model, work: ChunkWork, fingerprint: str, todo: Sequence[int], done: Callable[[int, Tensor], None]
    ) -> None:
        runner = work.build(model)
        assert runner.fingerprint() == fingerprint
        for index in reversed(todo):
            if index != self.skip:
                values = runner.run(index)
                done(index, values)
                done(index, values + 1.0)  # a repeated delivery counts once


def circuits(patcher: EdgePatcher, k: int) -> Tensor:
    """(k, S, R) random circuits of the patcher's graph, the full graph first."""
    full = valid_mask(patcher.layout, patcher.model.arch.n_layers)
    random = torch.rand(k - 1, *full.shape, generator=torch.Generator().manual_seed(0)) < 0.6
    return torch.cat([full[None], random & full])


def test_chunks_run_elsewhere_give_metric_of_bit_for_bit() -> None:
    model, task = tiny_model("gpt2"), padded_task()
    before = snapshot(model)
    for options in ({"max_batch_tokens": 36}, {"max_batch_tokens": 9, "ablation": "zero"}):
        patcher = EdgePatcher(model, task, **options)  # type: ignore[arg-type]
        kept = circuits(patcher, 7)
        assert len(patcher.row_chunks(7)) > 5
        assert torch.equal(metric_of(patcher, kept, Shuffled()), patcher.metric_of(kept))
        with pytest.raises(pathlens.PathlensError, match=r"without running chunks \[2\]"):
            metric_of(patcher, kept, Shuffled(skip=2))
    with pytest.raises(pathlens.PathlensError, match="kept must have shape"):
        metric_of(patcher, kept[0], Shuffled())
    assert_untouched(model, before)


def test_a_worker_reuses_its_patcher_only_for_an_equal_recipe() -> None:
    model, task = tiny_model("gpt2"), padded_task()
    recipe = EdgeRecipe.of(EdgePatcher(model, task, max_batch_tokens=36))
    first = built_on(model, recipe)
    assert built_on(model, EdgeRecipe.of(EdgePatcher(model, padded_task(), max_batch_tokens=36))) is first
    other_task = padded_task()
    other_task.answer_ids, other_task.wrong_ids = other_task.wrong_ids, other_task.answer_ids
    for changed in (
        EdgeRecipe(recipe.task, recipe.ablation, recipe.direction, lambda logits, t: logit_diff(logits, t), 36),
        EdgeRecipe(recipe.task, "mean", recipe.direction, recipe.metric, 36),
        EdgeRecipe(recipe.task, recipe.ablation, recipe.direction, recipe.metric, 18),
        EdgeRecipe(other_task.with_metric(recipe.metric), recipe.ablation, recipe.direction, recipe.metric, 36),
    ):
        assert built_on(model, changed) is not first
        assert built_on(model, recipe) is not first  # the last one was replaced
        first = built_on(model, recipe)
    assert built_on(tiny_model("gpt2"), recipe) is not first  # another model
