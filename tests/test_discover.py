"""Discovery keeps its promise: the circuit `discover` returns reaches the target faithfulness (measured exactly,
again, here) or is flagged with a warning; ACDC returns the circuit of sequential ACDC (checked against a slow
one-edge-at-a-time reference); `edge_effects` builds its own patcher or reuses one; every method has the same
default direction."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import pathlens
from pathlens.circuits import DISCOVERY_METHODS, EdgePatcher, discover, edge_effects, faithfulness
from pathlens.circuits.discover import TARGET_TOLERANCE
from pathlens.circuits.faithfulness import with_endpoints
from pathlens.graph import Graph
from pathlens.patching.spec import DEFAULT_DIRECTION
from tests.helpers import FAMILIES, assert_untouched, padded_task, snapshot, tiny_model


def sequential_acdc(patcher: EdgePatcher, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """ACDC one edge at a time, one forward per decision: receivers from the logits backwards, the edges into
    each from the nearest sender back; an edge goes when removing it (every earlier removal kept) moves the
    metric by less than `threshold` · |m(M) − m(∅)|. Returns the kept (S, R) mask."""
    full, empty, _ = with_endpoints(patcher, valid, [])
    tolerance = threshold * abs(full - empty)
    current = valid.clone()
    metric = float(patcher.metric_of(current[None])[0])
    for col in reversed(range(current.shape[1])):
        for sender in reversed(range(current.shape[0])):
            if not current[sender, col]:
                continue
            trial = current.clone()
            trial[sender, col] = False
            value = float(patcher.metric_of(trial[None])[0])
            if abs(value - metric) < tolerance:
                current, metric = trial, value
    return current


def _quiet_discover(model: pathlens.Model, task: pathlens.Task, **kwargs: object) -> tuple[Graph, list[str]]:
    """discover(...) and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        circuit = discover(model, task, **kwargs)  # type: ignore[arg-type]
    return circuit, [str(w.message) for w in caught if "target faithfulness" in str(w.message)]


@pytest.mark.parametrize(
    ("family", "threshold"),
    [("gpt2", 0.05), ("llama", 0.1), ("neox_parallel", 0.02), ("gpt_neo", 0.02), ("qwen3", 0.05)],
)
def test_acdc_gives_the_circuit_of_sequential_acdc(family: str, threshold: float) -> None:
    """Batched ACDC commits removals in order and re-evaluates what a removal invalidates, so it keeps the edges
    one-edge-at-a-time ACDC keeps. Removing every below-threshold edge of a receiver at once did not (on all but
    gpt2 here: llama 12 edges at faithfulness 0.61 where sequential ACDC keeps 13 at 0.78)."""
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    circuit, _ = _quiet_discover(model, task, method="acdc", threshold=threshold)
    patcher = EdgePatcher(model, task)
    reference = sequential_acdc(patcher, circuit.valid, threshold)
    assert 0 < int(reference.sum()) < int(circuit.valid.sum())  # a threshold that keeps some edges, not all
    if not torch.equal(circuit.in_circuit, reference):  # ties at the threshold may differ in float rounding
        same = Graph(circuit.senders, circuit.receivers, circuit.scores, circuit.metric, "ref", circuit.meta, reference)
        assert faithfulness(patcher, circuit) == pytest.approx(faithfulness(patcher, same), abs=0.01)
    assert_untouched(model, before)


def test_refinement_never_drops_the_circuit_below_the_target() -> None:
    """An ACDC refinement (threshold 0.1) of the EAP circuit of this model (15 edges, faithfulness 0.865) removes
    edges whose effects add up below the target (8 edges at 0.728); the refinement is then not kept."""
    model = tiny_model("gpt_neo", weight_scale=2.0)
    task = padded_task()
    patcher = EdgePatcher(model, task)
    plain, _ = _quiet_discover(model, task, method="eap", refine=0)
    refined, flagged = _quiet_discover(model, task, method="eap", threshold=0.1, refine=10**6)
    assert not flagged and refined.meta["reached_target"] is True
    assert faithfulness(patcher, refined) >= 0.8 - TARGET_TOLERANCE
    assert faithfulness(patcher, plain) >= 0.8 - TARGET_TOLERANCE
    assert refined.n_edges <= plain.n_edges


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_reaches_the_target_or_says_it_did_not(family: str) -> None:
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    patcher = EdgePatcher(model, task)
    for method in DISCOVERY_METHODS:
        circuit, flagged = _quiet_discover(model, task, method=method, steps=2)
        exact = faithfulness(patcher, circuit)
        assert exact == pytest.approx(circuit.meta["faithfulness"], abs=1e-5)
        if circuit.meta["reached_target"]:
            assert exact >= 0.8 - TARGET_TOLERANCE and not flagged, (method, exact)
        else:
            assert exact < 0.8 and len(flagged) == 1, (method, exact, flagged)
            assert "0.8" in flagged[0] and f"{exact:.3f}" in flagged[0]
    assert_untouched(model, before)


def test_a_circuit_short_of_the_target_is_flagged_with_a_warning() -> None:
    """An explicit top_k too small, or an ACDC threshold too coarse, gives a circuit below the target: flagged."""
    model = tiny_model("gpt2", weight_scale=2.0)
    task = padded_task()
    small, flagged = _quiet_discover(model, task, method="eap", top_k=1, target=0.99, refine=0)
    assert small.meta["reached_target"] is False and small.meta["target"] == 0.99
    assert len(flagged) == 1 and "0.99" in flagged[0] and f"{small.meta['faithfulness']:.3f}" in flagged[0]
    coarse, flagged = _quiet_discover(model, task, method="acdc", threshold=0.5, target=0.99)
    assert coarse.meta["reached_target"] is False and len(flagged) == 1 and "0.99" in flagged[0]


def test_discovery_reaches_the_target_on_the_induction_model() -> None:
    model = pathlens.load("induction-2l")
    from pathlens.report.studies import task_for

    task = task_for(model, "induction", 16, 0)
    for method in DISCOVERY_METHODS:
        circuit, flagged = _quiet_discover(model, task, method=method)
        assert circuit.meta["reached_target"] is True and not flagged, method


def test_edge_effects_builds_its_patcher_or_reuses_one() -> None:
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    patcher = EdgePatcher(model, task)
    chosen = torch.zeros(patcher.n_senders, patcher.n_receivers, dtype=torch.bool)
    chosen[0, -1] = chosen[1, -1] = True
    own = edge_effects(model, task, edges=chosen)
    reused = edge_effects(patcher, edges=chosen)
    torch.testing.assert_close(own.scores, reused.scores, equal_nan=True)
    assert own.meta["direction"] == DEFAULT_DIRECTION and int((~own.scores.isnan()).sum()) == 2
    denoise = edge_effects(model, task, edges=chosen, direction="denoise")
    assert denoise.meta["direction"] == "denoise"
    assert not torch.allclose(denoise.scores[chosen], own.scores[chosen])
    with pytest.raises(pathlens.PathlensError, match="direction"):
        edge_effects(patcher, edges=chosen, direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="task"):
        edge_effects(patcher, task)
    with pytest.raises(pathlens.PathlensError, match="needs the task"):
        edge_effects(model)
    with pytest.raises(pathlens.PathlensError, match=r"edges must be a \(senders, receivers\)"):
        edge_effects(patcher, edges=chosen[:, :3])
    assert_untouched(model, before)


def test_every_method_has_the_same_default_direction() -> None:
    """One default (patching and node attribution used to default to "denoise", edges and discovery to "noise")."""
    from pathlens.cli import commands as cli

    methods = [
        pathlens.patch,
        pathlens.atp,
        pathlens.atp_star,
        pathlens.relp,
        pathlens.integrated_gradients,
        pathlens.edge_attribution,
        edge_effects,
        discover,
        EdgePatcher,
    ]
    for method in methods:
        default = inspect.signature(method).parameters["direction"].default
        assert default in (DEFAULT_DIRECTION, None), method  # None: edge_effects takes a patcher's own
    assert inspect.signature(cli.patch).parameters["direction"].default.default == DEFAULT_DIRECTION
    assert DEFAULT_DIRECTION == "noise"
