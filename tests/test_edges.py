"""Edge attribution (EAP, EAP-IG, RelP) and the Graph type.

References: (1) identities — a sender's outgoing edge scores sum to its node-level AtP/RelP estimate, and the
logits' incoming scores to AtP of the final residual stream; (2) a slow per-receiver reference that feeds one
head's q/k/v projection (or one MLP) a residual stream moved by ε·Δz_u while everything else reads the
unmoved stream, and differentiates the metric in ε; (3) IG completeness for the input node.
"""

from __future__ import annotations

import pytest
import torch

import pathlens
from pathlens.attribution import atp, relp
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.graph import Graph
from tests.helpers import RECEIVERS, assert_untouched, padded_task, reference_column, snapshot, tiny_model

EDGE_FAMILIES = ("gpt2", "gpt_neo", "neox_parallel", "neox_sequential", "llama", "qwen3", "attn_only", "olmo_generic")


def _sender_column(graph: Graph, model: pathlens.Model, kind: str) -> torch.Tensor:
    node = graph.node_scores()
    if kind == "heads":
        names = [f"L{layer}.H{h}" for layer in range(model.n_layers) for h in range(model.arch.n_heads)]
        return torch.tensor([node[n] for n in names], dtype=torch.float32).view(model.n_layers, model.arch.n_heads)
    return torch.tensor([node[f"L{layer}.mlp"] for layer in range(model.n_layers)], dtype=torch.float32)


@pytest.mark.parametrize("family", EDGE_FAMILIES)
def test_edge_sums_equal_node_estimates(family: str) -> None:
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    graph = edge_attribution(model, task, method="eap", direction="noise")
    heads = atp(model, task, sites="heads", direction="noise")
    base = heads.meta["base_metric"]
    assert graph.meta["base_metric"] == pytest.approx(base, abs=1e-6)
    torch.testing.assert_close(_sender_column(graph, model, "heads"), heads.values - base, atol=1e-6, rtol=0)
    if model.arch.mlp is not None:
        mlp = atp(model, task, sites="mlp_out", direction="noise")
        torch.testing.assert_close(_sender_column(graph, model, "mlp"), mlp.values - base, atol=1e-6, rtol=0)
    final = atp(model, task, sites="resid_post", layers=[model.n_layers - 1], direction="noise")
    logits_in = torch.nan_to_num(graph.scores[:, -1]).sum()
    torch.testing.assert_close(logits_in, final.values[0] - base, atol=1e-6, rtol=0)
    assert_untouched(model, before)


@pytest.mark.parametrize("family", list(RECEIVERS))
def test_each_receiver_matches_a_slow_reference(family: str) -> None:
    """The per-head split of the attention input's gradient (fused, separate with GQA, interleaved layouts)."""
    model = tiny_model(family, weight_scale=4.0)
    model.hf.double()  # float64, so that small edges are compared to ~1e-12, not to float32 noise
    task = padded_task()
    graph = edge_attribution(model, task, method="eap", direction="noise")
    for receiver, proj, norm, columns in RECEIVERS[family]:
        expected = reference_column(model, task, graph, receiver, proj, norm, columns)
        got = graph.scores[:, graph.receivers.index(receiver)].double()
        scale = expected.nan_to_num().abs().max()
        assert scale > 1e-5, receiver
        torch.testing.assert_close(got, expected, atol=1e-6 * scale, rtol=1e-5, equal_nan=True, msg=receiver)


def test_eap_ig_steps_one_is_eap_and_input_completeness() -> None:
    model = tiny_model("gpt2", weight_scale=2.0)
    task = padded_task()
    eap = edge_attribution(model, task, method="eap")
    one = edge_attribution(model, task, method="eap-ig", steps=1)
    torch.testing.assert_close(one.scores, eap.scores, equal_nan=True)
    # the input node's outgoing edges under IG integrate the gradient along the whole input path, so they sum
    # to m(corrupt) − m(clean) up to the Riemann error (O(1/steps)); chunking must not change anything
    fine = edge_attribution(model, task, method="eap-ig", steps=64, max_batch_tokens=40)
    clean = float(task.score(model.run(task.clean_ids, attention_mask=task.attention_mask).logits).mean())
    corrupt = float(task.score(model.run(task.corrupt_ids, attention_mask=task.attention_mask).logits).mean())
    total = float(fine.node_scores()["input"])
    assert total == pytest.approx(corrupt - clean, rel=0.05, abs=1e-3)
    coarse_chunks = edge_attribution(model, task, method="eap-ig", steps=64)
    torch.testing.assert_close(fine.scores, coarse_chunks.scores, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_relp_edges_sum_to_relp_nodes() -> None:
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    graph = edge_attribution(model, task, method="relp")
    heads = relp(model, task, sites="heads", direction="noise")
    torch.testing.assert_close(
        _sender_column(graph, model, "heads"), heads.values - heads.meta["base_metric"], atol=1e-6, rtol=0
    )


def test_graph_prune_tables_files_paths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama", weight_scale=2.0)
    graph = edge_attribution(model, padded_task())
    circuit = graph.prune(top_k=10)
    assert circuit.n_edges == 10 and circuit.edges_total == graph.edges_total
    frame = circuit.to_frame()
    assert frame["in_circuit"].sum() == 10
    kept_abs = frame[frame["in_circuit"]]["score"].abs().min()
    assert kept_abs >= frame[~frame["in_circuit"]]["score"].abs().max()
    by_threshold = graph.prune(threshold=float(kept_abs), by="abs")
    assert by_threshold.n_edges == 10
    circuit.save(tmp_path / "c")
    loaded = Graph.load(tmp_path / "c")
    torch.testing.assert_close(loaded.scores, circuit.scores, equal_nan=True)
    assert torch.equal(loaded.in_circuit, circuit.in_circuit) and loaded.senders == circuit.senders
    assert loaded.receiver_nodes("L1.G1.k") == ["L1.H2", "L1.H3"]
    nxg = circuit.to_networkx()
    assert nxg.number_of_edges() == sum(len(circuit.receiver_nodes(r)) for r in frame[frame["in_circuit"]]["receiver"])
    for path in graph.paths(k=3):
        assert path.nodes[0] == "input" and path.nodes[-1] == "logits"
    with pytest.raises(pathlens.PathlensError, match="exactly one"):
        graph.prune()


def test_edge_errors() -> None:
    task = padded_task()
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(pathlens.PathlensError, match="method"):
        edge_attribution(model, task, method="acdc")
    with pytest.raises(pathlens.PathlensError, match="steps"):
        edge_attribution(model, task, method="eap-ig", steps=0)
    assert_untouched(model, before)
