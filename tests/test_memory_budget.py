"""`max_memory=` on patching sweeps: the chunk size follows from the sweep's cost, the measured peak stays under the
budget, and the scores are those of the same chunking given as tokens; `pathlens plan` estimates the forwards
`patch` then runs (counted by the chunks it records).

The measured peak is `pathlens.memory.TensorPeak` (every tensor storage created inside the call and alive at the
same time, counted by a torch dispatch mode); its own hand case is checked first.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import pathlens
from pathlens.attribution.ig import integrated_gradients
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.cli import app
from pathlens.memory import TensorPeak, parse_bytes
from pathlens.patching.budget import (
    edge_attribution_cost,
    edge_patch_cost,
    integrated_gradients_cost,
    sweep_cost,
)
from pathlens.patching.checkpoint import Checkpoint
from pathlens.patching.estimate import estimate_patch
from pathlens.results import Scores
from pathlens.sites import Site
from pathlens.tasks.base import Task
from tests.helpers import VOCAB, assert_untouched, snapshot, tiny_model


def wide_task(n: int = 16, p: int = 12) -> Task:
    """Enough prompts that a budget binds: 16 pairs of 12 random tokens, differing at two positions."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, VOCAB, (n, p), generator=g)
    corrupt = clean.clone()
    corrupt[:, [3, 7]] = torch.randint(1, VOCAB, (n, 2), generator=g)
    answers, wrong = torch.randint(1, VOCAB, (n,), generator=g), torch.randint(1, VOCAB, (n,), generator=g)
    return Task("wide", clean, corrupt, answers, wrong, torch.full((n,), p - 1), torch.ones_like(clean))


def test_sizes_and_the_peak_counter() -> None:
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes(512) == 512
    for bad in ("2 parsecs", "", -1, 0, True, 1.5):
        with pytest.raises(pathlens.PathlensError, match="max_memory="):
            parse_bytes(bad)
    before = torch.ones(1000)
    with TensorPeak() as peak:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a  # 4000
        c = b + 1  # 8000
        c.view(-1).add_(1)  # in place: nothing new
        before[:10].mul_(2)  # a tensor made before the block: not counted
        del b, c
    assert peak.peak == 8000 and peak.current == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(("sites", "positions"), [("heads", "all"), ("resid_pre", "each")])
def test_the_measured_peak_stays_under_the_budget(family: str, sites: str, positions: str) -> None:
    model, task = tiny_model(family, weight_scale=4.0), wide_task()
    options = {"sites": sites, "positions": positions, "progress": False}
    families = {Site("head_z" if sites == "heads" else sites, layer) for layer in range(model.n_layers)}
    last = task.seq_len - 1 if positions == "each" else 0
    cost = sweep_cost(model, task.n, task.seq_len, families, model.n_layers * 4 * task.seq_len, last)
    default = pathlens.patch(model, task, **options)  # type: ignore[arg-type]
    tokens = []
    for factor in (1.0, 1.5, 3.0):
        budget = int(cost.least * factor)
        with TensorPeak() as peak:
            scores = pathlens.patch(model, task, max_memory=budget, **options)  # type: ignore[arg-type]
        assert 0 < peak.peak <= budget, (factor, peak.peak, budget)
        if factor == 1.0:  # the estimate is a bound, not a guess far above it (measured: 42-66 % of the budget)
            assert peak.peak >= budget / 4, (peak.peak, budget)
        tokens.append(scores.meta["max_batch_tokens"])
        assert scores.meta["max_memory"] == budget
        same_chunks = pathlens.patch(model, task, max_batch_tokens=tokens[-1], **options)  # type: ignore[arg-type]
        assert torch.equal(scores.values, same_chunks.values)
        torch.testing.assert_close(scores.values, default.values, atol=1e-5, rtol=0)
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]


def test_a_budget_too_small_for_one_row_and_conflicting_knobs() -> None:
    model, task = tiny_model("llama"), wide_task()
    with pytest.raises(pathlens.PathlensError, match=r"too small for one row of this sweep: it needs at least"):
        pathlens.patch(model, task, max_memory="10KB", progress=False)
    with pytest.raises(pathlens.PathlensError, match="not both"):
        pathlens.patch(model, task, max_memory="1GB", max_batch_tokens=100, progress=False)
    with pytest.raises(pathlens.PathlensError, match="max_memory='lots'"):
        pathlens.patch(model, task, max_memory="lots", progress=False)


def test_the_estimate_plans_the_chunks_patch_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    model, task = tiny_model("llama", weight_scale=4.0), wide_task()
    options: dict[str, Any] = {"sites": "resid_pre", "positions": "each", "max_memory": "1MB"}
    found = estimate_patch(model, task, **options)
    recorded: list[int] = []
    original = Checkpoint.record

    def record(self: Checkpoint, index: int, values: torch.Tensor) -> None:
        recorded.append(index)
        original(self, index, values)

    monkeypatch.setattr(Checkpoint, "record", record)
    scores = pathlens.patch(model, task, progress=False, **options)
    assert found.units["chunks"] == len(recorded) and found.max_batch_tokens == scores.meta["max_batch_tokens"]
    assert found.variants == scores.values.numel() and found.peak_bytes <= parse_bytes("1MB")
    assert found.seconds > 0


def test_plan_command_prints_the_estimate() -> None:
    result = CliRunner().invoke(
        app, ["plan", "--model", "induction-2l", "--task", "induction", "--sites", "heads", "--max-memory", "5MB"]
    )
    assert result.exit_code == 0, result.output
    assert "forwards" in result.output and "peak memory" in result.output and "time" in result.output
    refused = CliRunner().invoke(app, ["plan", "--model", "induction-2l", "--method", "sweep"])
    assert refused.exit_code == 2 and "plan estimates patch" in refused.output


def random_circuits(patcher: EdgePatcher, k: int = 6) -> torch.Tensor:
    """`k` random circuits (K, S, R) bool, about half the edges kept."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(k, patcher.n_senders, patcher.n_receivers, generator=g) < 0.5


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_edge_patching_peak_stays_under_the_budget(family: str) -> None:
    """The patcher built and run inside the budget (its source state counted), at 1, 1.5 and 3 times the least
    budget: measured peak ≤ budget, and the metrics equal those of the same rows per forward given as tokens."""
    model, task = tiny_model(family, weight_scale=4.0), wide_task(n=8)
    reference = EdgePatcher(model, task, max_batch_tokens=10**6)
    cost = edge_patch_cost(model, task.n, task.seq_len, reference.n_senders, post_norm=reference.post is not None)
    before = snapshot(model)
    tokens = []
    for factor in (1.0, 1.5, 3.0):
        budget = int(cost.least * factor)
        with TensorPeak() as peak:
            patcher = EdgePatcher(model, task, max_memory=budget)
            kept = random_circuits(patcher)
            values = patcher.per_prompt(kept)
        assert 0 < peak.peak <= budget, (factor, peak.peak, budget)
        if factor == 1.0:  # a bound, not far above the real peak
            assert peak.peak >= budget / 4, (peak.peak, budget)
        tokens.append(patcher.max_batch_tokens)
        by_hand = EdgePatcher(model, task, max_batch_tokens=patcher.max_batch_tokens).per_prompt(kept)
        assert torch.equal(values, by_hand)
        one_forward = reference.per_prompt(kept)
        torch.testing.assert_close(values, one_forward, atol=1e-5, rtol=0)
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]
    assert_untouched(model, before)


def test_edge_patching_budget_errors() -> None:
    model, task = tiny_model("llama"), wide_task(n=8)
    with pytest.raises(pathlens.PathlensError, match=r"too small for one row of edge patching: it needs at least"):
        EdgePatcher(model, task, max_memory="10KB")
    with pytest.raises(pathlens.PathlensError, match="not both"):
        EdgePatcher(model, task, max_memory="1GB", max_batch_tokens=100)
    with pytest.raises(pathlens.PathlensError, match="max_memory='lots'"):
        EdgePatcher(model, task, max_memory="lots")


@pytest.mark.parametrize(("family", "method"), [("llama", "eap-ig"), ("gpt2", "eap"), ("gemma3", "eap-ig")])
def test_edge_attribution_peak_stays_under_the_budget(family: str, method: str) -> None:
    """edge_attribution under 1, 1.5 and 3 times its least budget: measured peak ≤ budget, scores bit-equal to the
    rows per chunk the cost gives passed as tokens by hand, and within 1e-5 of one chunk of every row."""
    model, task = tiny_model(family, weight_scale=4.0), wide_task(n=8)
    reference = EdgePatcher(model, task, max_batch_tokens=10**6)
    cost = edge_attribution_cost(model, task.n, task.seq_len, reference.n_senders, reference.post is not None)
    steps = 3
    one_chunk = edge_attribution(model, task, method, steps=steps, max_batch_tokens=10**6)  # type: ignore[arg-type]
    before = snapshot(model)
    rows = []
    for factor in (1.0, 1.5, 3.0):
        budget = int(cost.least * factor)
        with TensorPeak() as peak:
            graph = edge_attribution(model, task, method, steps=steps, max_memory=budget)  # type: ignore[arg-type]
        assert 0 < peak.peak <= budget, (factor, peak.peak, budget)
        if factor == 1.0:
            assert peak.peak >= budget / 4, (peak.peak, budget)
        rows.append(cost.rows_for(budget))
        by_hand = edge_attribution(model, task, method, steps=steps, max_batch_tokens=rows[-1] * task.seq_len)  # type: ignore[arg-type]
        assert _same(graph.scores, by_hand.scores)
        torch.testing.assert_close(graph.scores, one_chunk.scores, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert rows == sorted(rows) and rows[0] < rows[-1] and rows[0] < task.n
    assert_untouched(model, before)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN where the other is NaN."""
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def test_edge_attribution_budget_errors() -> None:
    model, task = tiny_model("llama"), wide_task(n=8)
    with pytest.raises(pathlens.PathlensError, match=r"too small for one row of edge attribution: it needs at least"):
        edge_attribution(model, task, max_memory="10KB")
    with pytest.raises(pathlens.PathlensError, match="not both"):
        edge_attribution(model, task, max_memory="1GB", max_batch_tokens=100)
    with pytest.raises(pathlens.PathlensError, match="max_memory='lots'"):
        edge_attribution(model, task, max_memory="lots")


def test_patch_command_takes_a_memory_budget(tmp_path: Any) -> None:
    """`pathlens patch --max-memory` sizes the sweep's chunks (recorded in the saved scores); a bad size or both
    knobs are usage errors."""
    args = ["patch", "--model", "induction-2l", "--task", "induction", "--sites", "heads", "--n", "4"]
    result = CliRunner().invoke(app, [*args, "--max-memory", "20MB", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    saved = Scores.load(tmp_path / "a" / "heads_all")
    assert saved.meta["max_memory"] == 20 * 10**6
    for bad in (["--max-memory", "lots"], ["--max-memory", "1GB", "--max-batch-tokens", "100"]):
        refused = CliRunner().invoke(app, [*args, *bad, "--out", str(tmp_path / "b")])
        assert refused.exit_code == 2 and "--max-memory" in refused.output, refused.output


@pytest.mark.parametrize(("family", "sites"), [("llama", "heads"), ("gpt2", "resid_pre")])
def test_integrated_gradients_peak_stays_under_the_budget(family: str, sites: str) -> None:
    """integrated_gradients under 1, 1.5 and 3 times its least budget: measured peak ≤ budget, scores bit-equal to
    the rows per chunk the cost gives passed as tokens by hand, and within 1e-5 of one chunk of every row."""
    model, task = tiny_model(family, weight_scale=4.0), wide_task(n=8)
    options: dict[str, Any] = {"sites": sites, "steps": 3}
    families = {Site("head" if sites == "heads" else sites, layer) for layer in range(model.n_layers)}
    cost = integrated_gradients_cost(model, task.n, task.seq_len, families)
    one_chunk = integrated_gradients(model, task, max_batch_tokens=10**6, **options)
    before = snapshot(model)
    rows = []
    for factor in (1.0, 1.5, 3.0):
        budget = int(cost.least * factor)
        with TensorPeak() as peak:
            scores = integrated_gradients(model, task, max_memory=budget, **options)
        assert 0 < peak.peak <= budget, (factor, peak.peak, budget)
        if factor == 1.0:
            assert peak.peak >= budget / 4, (peak.peak, budget)
        rows.append(cost.rows_for(budget))
        by_hand = integrated_gradients(model, task, max_batch_tokens=rows[-1] * task.seq_len, **options)
        assert torch.equal(scores.values, by_hand.values)
        torch.testing.assert_close(scores.values, one_chunk.values, atol=1e-5, rtol=1e-4)
    assert rows == sorted(rows) and rows[0] < rows[-1] and rows[0] < task.n
    assert_untouched(model, before)


def test_integrated_gradients_budget_errors() -> None:
    model, task = tiny_model("llama"), wide_task(n=8)
    with pytest.raises(pathlens.PathlensError, match=r"too small for one row of integrated gradients: it needs"):
        integrated_gradients(model, task, max_memory="10KB")
    with pytest.raises(pathlens.PathlensError, match="not both"):
        integrated_gradients(model, task, max_memory="1GB", max_batch_tokens=100)
