"""`max_memory=` on discovery and exact edge effects, against the reference it must equal: the same call with
`max_batch_tokens` set to the token count the budget resolves to (`EdgePatcher(max_memory=).max_batch_tokens`),
compared bit for bit; a budget too small for one row, and both knobs at once, raise before any forward.

The peak test measures live tensor storage (`pathlens.memory.TensorPeak`) against the budget on a tiny Llama.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import pathlens
from pathlens.circuits.discover import discover
from pathlens.circuits.edge_effects import edge_effects
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.layout import graph_layout
from pathlens.cli import app
from pathlens.graph import Graph
from pathlens.memory import TensorPeak
from pathlens.model import Model
from pathlens.patching.budget import edge_attribution_cost, edge_patch_cost
from pathlens.report.studies import task_for
from pathlens.tasks.base import Task
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model


def budget(model: Model, task: Task, factor: float) -> int:
    """`factor` times the least budget that runs both discovery engines (edge attribution, edge patching)."""
    senders = len(graph_layout(model).senders)
    costs = [f(model, task.n, task.seq_len, senders, False) for f in (edge_patch_cost, edge_attribution_cost)]
    return int(factor * max(cost.least for cost in costs))


def assert_same_graph(a: Graph, b: Graph) -> None:
    """Bit-equal scores (NaN where the other has NaN), kept edges and meta."""
    assert torch.equal(a.scores.isnan(), b.scores.isnan())
    assert torch.equal(a.scores.nan_to_num(), b.scores.nan_to_num())
    assert torch.equal(a.in_circuit, b.in_circuit)
    assert a.meta == b.meta


def test_max_memory_gives_the_results_of_the_token_count_it_resolves_to() -> None:
    model, task = tiny_model("llama", weight_scale=4.0), padded_task()
    before = snapshot(model)
    limit = budget(model, task, 4.0)
    tokens = EdgePatcher(model, task, max_memory=limit).max_batch_tokens
    assert task.seq_len <= tokens < 20 * task.n * task.seq_len  # several forwards, not one
    assert_same_graph(edge_effects(model, task, max_memory=limit), edge_effects(model, task, max_batch_tokens=tokens))
    for method in ("patching", "eap"):
        by_budget = discover(model, task, method=method, max_memory=limit)  # type: ignore[arg-type]
        by_tokens = discover(model, task, method=method, max_batch_tokens=tokens)  # type: ignore[arg-type]
        assert_same_graph(by_budget, by_tokens)
    assert_untouched(model, before)


def test_the_peak_of_discover_and_edge_effects_stays_under_the_budget() -> None:
    model, task = tiny_model("llama", weight_scale=4.0), padded_task()
    limit = budget(model, task, 2.0)
    for call in (
        lambda: edge_effects(model, task, max_memory=limit),
        lambda: discover(model, task, method="patching", max_memory=limit),
        lambda: discover(model, task, method="eap-ig", steps=2, max_memory=limit),
    ):
        with TensorPeak() as peak:
            call()
        assert 0 < peak.peak <= limit


def test_a_budget_too_small_for_one_row_and_both_knobs_raise() -> None:
    model, task = tiny_model("gpt2"), padded_task()
    before = snapshot(model)
    with pytest.raises(pathlens.PathlensError, match="max_memory=0.0 MB is too small for one row of edge patching"):
        discover(model, task, max_memory="1KB")
    with pytest.raises(pathlens.PathlensError, match="too small for one row of edge patching"):
        edge_effects(model, task, max_memory=1000)
    for call in (
        lambda: discover(model, task, max_memory="1GB", max_batch_tokens=64),
        lambda: edge_effects(model, task, max_memory="1GB", max_batch_tokens=64),
    ):
        with pytest.raises(pathlens.PathlensError, match=r"pass max_memory= \(bytes\) or max_batch_tokens="):
            call()
    patcher = EdgePatcher(model, task)
    with pytest.raises(pathlens.PathlensError, match="takes max_memory from the patcher"):
        edge_effects(patcher, max_memory="1GB")
    with pytest.raises(pathlens.PathlensError, match="max_memory='lots'"):
        discover(model, task, max_memory="lots")
    assert_untouched(model, before)


def test_pathlens_circuit_takes_max_memory(tmp_path: Path) -> None:
    """`pathlens circuit --max-memory` finds the circuit `discover(..., max_memory=)` finds; a bad size is a usage
    error and a budget too small for one row says so."""
    args = ["circuit", "--model", "induction-2l", "--task", "induction", "--n", "4", "--method", "eap"]
    runner = CliRunner()
    bad = runner.invoke(app, [*args, "--max-memory", "lots", "--out", str(tmp_path / "bad")], terminal_width=200)
    assert bad.exit_code == 2 and "--max-memory" in bad.output and "'lots' is not a size" in bad.output
    small = runner.invoke(app, [*args, "--max-memory", "1KB", "--out", str(tmp_path / "small")], terminal_width=200)
    assert small.exit_code != 0 and "too small for one row" in small.output
    result = runner.invoke(app, [*args, "--max-memory", "20MB", "--out", str(tmp_path / "ok")], terminal_width=200)
    assert result.exit_code == 0, result.output
    model = pathlens.load("induction-2l")
    expected = discover(model, task_for(model, "induction", 4, 0), method="eap", max_memory="20MB")
    assert torch.equal(Graph.load(tmp_path / "ok" / "circuit").in_circuit, expected.in_circuit)
