"""MIB interop: circuits exported in the Mechanistic Interpretability Benchmark's circuit-track JSON (EAP-IG's graph
format) with MIB's node and edge names, imported back losslessly; grouped-query attention spread over the heads
of a group and collected back; CPR and CMD on hand-computed curves and at MIB's edge fractions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pathlens
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import Curve, faithfulness, faithfulness_curve
from pathlens.circuits.mib import MIB_FRACTIONS, from_mib, mib_sizes, to_mib
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from tests.helpers import padded_task, tiny_model


def _graph(family: str) -> tuple[Graph, int]:
    model = tiny_model(family, weight_scale=2.0)
    return pathlens.edge_attribution(model, padded_task()), model.arch.d_model


def _edge_count(n_layers: int, n_heads: int, parallel: bool = False) -> int:
    """EAP-IG's edge count: every earlier sender into each head's q, k and v, each MLP and the logits."""
    total = 0
    for layer in range(n_layers):
        before = 1 + layer * (n_heads + 1)
        total += 3 * n_heads * before + before + (0 if parallel else n_heads)
    return total + 1 + n_layers * (n_heads + 1)


def _same(a: Graph, b: Graph) -> None:
    assert (a.senders, a.receivers, a.metric, a.method, a.meta) == (b.senders, b.receivers, b.metric, b.method, b.meta)
    assert a.scores.dtype == b.scores.dtype
    assert torch.equal(a.scores.nan_to_num(7.5), b.scores.nan_to_num(7.5)) and torch.equal(a.valid, b.valid)
    assert (a.kept is None) == (b.kept is None) and torch.equal(a.in_circuit, b.in_circuit)


def test_edge_count_formula_matches_mibs_gpt2_small() -> None:
    assert _edge_count(12, 12) == 32491  # MIB's published edge count for GPT-2 small


def test_names_follow_mibs_format_on_a_gpt2_shaped_model() -> None:
    graph, d_model = _graph("gpt2")
    circuit = graph.prune(top_k=6)
    record = to_mib(circuit, d_model=d_model)
    assert set(record) == {"cfg", "nodes", "edges"}
    cfg = record["cfg"]
    assert (cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"], cfg["d_model"]) == (2, 4, False, 32)
    heads = [f"a{layer}.h{h}" for layer in range(2) for h in range(4)]
    assert list(record["nodes"]) == ["input", *heads[:4], "m0", *heads[4:], "m1", "logits"]
    edges = record["edges"]
    assert len(edges) == _edge_count(2, 4) == 110
    for name in ("input->a0.h0<q>", "a0.h1->a1.h0<k>", "a0.h3->a1.h2<v>", "m0->logits", "input->m0", "a0.h0->m0"):
        assert name in edges and set(edges[name]) == {"score", "in_graph"}
    assert "a1.h0->a0.h0<q>" not in edges and "a0.h0->a0.h1<q>" not in edges and "m1->m0" not in edges
    assert edges["input->a0.h0<q>"]["score"] == float(graph.scores[0, graph.receivers.index("L0.H0.q")])
    assert sum(e["in_graph"] for e in edges.values()) == 6
    assert record["nodes"]["logits"]["in_graph"] is True


def test_parallel_blocks_have_no_same_layer_head_to_mlp_edges() -> None:
    graph, d_model = _graph("neox_parallel")
    record = to_mib(graph, d_model=d_model)
    assert record["cfg"]["parallel_attn_mlp"] is True
    assert len(record["edges"]) == _edge_count(2, 4, parallel=True)
    assert "a0.h0->m0" not in record["edges"] and "a0.h0->m1" in record["edges"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox_parallel", "attn_only"])
def test_round_trip_is_lossless(family: str, tmp_path: Path) -> None:
    graph, d_model = _graph(family)
    for g in (graph, graph.prune(top_k=9), graph.prune(top_k=4, by="value")):
        path = tmp_path / f"{family}.json"
        first = to_mib(g, path, d_model=d_model)
        back = from_mib(path)
        _same(back, g)
        assert to_mib(back, d_model=d_model) == first  # scores, edge and node in_graph all the same
        assert json.loads(path.read_text()) == json.loads(json.dumps(first))


def test_grouped_query_attention_spreads_a_group_edge_over_its_heads() -> None:
    graph, d_model = _graph("llama")  # 4 query heads, 2 key-value groups
    assert "L1.G0.k" in graph.receivers and graph.meta["heads_per_group"] == 2
    circuit = graph.prune(top_k=graph.edges_total)
    record = to_mib(circuit, d_model=d_model)
    assert record["cfg"]["n_key_value_heads"] == 2
    s = float(graph.scores[graph.senders.index("L0.H1"), graph.receivers.index("L1.G0.k")])
    for head in ("a1.h0", "a1.h1"):
        edge = record["edges"][f"a0.h1->{head}<k>"]
        assert edge == {"score": s / 2, "in_graph": True, "group_score": s}
    assert "group_score" not in record["edges"]["a0.h1->a1.h0<q>"]


def test_grouped_scores_round_trip_exactly_in_float64() -> None:
    graph, d_model = _graph("llama")
    thirds = Graph(graph.senders, graph.receivers, graph.scores.double() / 3, graph.metric, graph.method, graph.meta)
    _same(from_mib(to_mib(thirds, d_model=d_model)), thirds)


def test_a_foreign_gqa_file_collects_its_heads_into_the_group() -> None:
    graph, d_model = _graph("llama")
    record = to_mib(graph.prune(top_k=graph.edges_total), d_model=d_model)
    for name, edge in record["edges"].items():
        edge.pop("group_score", None)
        if name.endswith("a1.h1<k>"):
            edge["score"] += 1.0
            edge["in_graph"] = False
    del record["cfg"]["pathlens"]
    back = from_mib(record)
    j = back.receivers.index("L1.G0.k")
    i = back.senders.index("L0.H1")
    assert float(back.scores[i, j]) == pytest.approx(float(graph.scores[i, j]) + 1.0, abs=1e-6)
    assert bool(back.in_circuit[i, j])  # in the circuit when any head's edge is
    assert (back.metric, back.method, back.meta["heads_per_group"]) == ("unknown", "mib", 2)


def test_mibs_own_files_import_one_key_input_per_head() -> None:
    graph, d_model = _graph("gpt2")
    record = to_mib(graph, d_model=d_model)
    record["cfg"] = {k: record["cfg"][k] for k in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model")}
    back = from_mib(record)
    assert back.receivers == graph.receivers and "L1.H3.k" in back.receivers
    assert torch.equal(back.scores.nan_to_num(7.5), graph.scores.nan_to_num(7.5))


def test_node_flags_follow_mibs_pruning() -> None:
    graph, d_model = _graph("gpt2")
    kept = torch.zeros_like(graph.valid)
    kept[graph.senders.index("input"), graph.receivers.index("L0.H0.q")] = True  # a0.h0 then sends nothing
    kept[graph.senders.index("L0.H1"), graph.receivers.index("logits")] = True  # a0.h1 has no input
    kept[graph.senders.index("input"), graph.receivers.index("L0.mlp")] = True
    kept[graph.senders.index("L0.mlp"), graph.receivers.index("logits")] = True
    nodes = to_mib(Graph(**{**graph.__dict__, "kept": kept}), d_model=d_model)["nodes"]
    assert {name for name, node in nodes.items() if node["in_graph"]} == {"input", "m0", "logits"}


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    graph, d_model = _graph("gpt2")
    with pytest.raises(PathlensError, match="d_model"):
        to_mib(graph)
    odd = Graph(["input", "embed<script>"], ["logits"], torch.ones(2, 1), "m", "x")
    with pytest.raises(PathlensError, match="embed<script>"):
        to_mib(odd, d_model=4)
    record = to_mib(graph, d_model=d_model)
    record["edges"]["a1.h0->a0.h0<q>"] = {"score": 1.0, "in_graph": True}
    with pytest.raises(PathlensError, match=r"a1\.h0->a0\.h0<q>"):
        from_mib(record)
    del record["edges"]["a1.h0->a0.h0<q>"]
    record["edges"]["input->m0"]["score"] = "big"
    with pytest.raises(PathlensError, match="input->m0"):
        from_mib(record)
    llama, d = _graph("llama")
    grouped = to_mib(llama, d_model=d)
    del grouped["edges"]["input->a0.h1<k>"]
    with pytest.raises(PathlensError, match=r"input->a0\.h1<k>"):
        from_mib(grouped)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PathlensError, match="bad.json"):
        from_mib(bad)
    with pytest.raises(PathlensError, match="'nodes'"):
        from_mib({"cfg": {}, "edges": {}})


# ---- CPR and CMD ----------------------------------------------------------------------------------------


def test_cpr_and_cmd_on_a_hand_computed_curve() -> None:
    curve = Curve([1, 2, 5, 10], [0.0, 0.5, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0], 1.0, 0.0, 10)
    # x = 0.1, 0.2, 0.5, 1.0: CPR = 0.1·0.25 + 0.3·0.75 + 0.5·1 ; CMD = 0.1·0.75 + 0.3·0.25 + 0.5·0
    assert curve.cpr == pytest.approx(0.75) and curve.cmd == pytest.approx(0.15)
    faith = [0.0] * 6 + [0.5, 1.0, 1.0, 1.0]  # at 0.1 % … 5 %: 0; 10 %: 0.5; 20 %, 50 %, 100 %: 1
    mib = Curve(mib_sizes(1000), faith, faith, 1.0, 0.0, 1000, fractions=list(MIB_FRACTIONS))
    assert mib.cpr == pytest.approx(0.05 * 0.25 + 0.1 * 0.75 + 0.3 + 0.5)
    assert mib.cmd == pytest.approx(0.049 + 0.05 * 0.75 + 0.1 * 0.25)
    flat = Curve(mib_sizes(1000), [1.0] * 10, [1.0] * 10, 1.0, 0.0, 1000, fractions=list(MIB_FRACTIONS))
    assert (flat.cpr, flat.cmd) == (pytest.approx(0.999), 0.0)
    over = Curve([5, 10], [1.5, 1.5], [1.5, 1.5], 1.0, 0.0, 10)
    assert over.cmd == pytest.approx(0.25)  # |1 − F| counts overshoot too
    assert {"cpr", "cmd", "area", "fractions"} <= set(mib.as_dict())


def test_mib_sizes_round_down_like_mib() -> None:
    assert mib_sizes(110) == [0, 0, 0, 1, 2, 5, 11, 22, 55, 110]
    assert mib_sizes(32491) == [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]


def test_faithfulness_curve_at_mibs_fractions() -> None:
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    patcher = EdgePatcher(model, task, max_batch_tokens=64)
    graph = pathlens.edge_attribution(model, task)
    curve = faithfulness_curve(patcher, graph, sizes="mib")
    assert curve.sizes == mib_sizes(graph.edges_total) and curve.fractions == list(MIB_FRACTIONS)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve.faithfulness[6] == pytest.approx(faithfulness(patcher, graph.prune(top_k=curve.sizes[6])), abs=1e-6)
    xs, f = list(MIB_FRACTIONS), curve.faithfulness
    by_hand = sum((xs[i + 1] - xs[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    assert curve.cpr == pytest.approx(by_hand)
    with pytest.raises(PathlensError, match="'every'"):
        faithfulness_curve(patcher, graph, sizes="every")  # type: ignore[arg-type]


def test_the_circuit_summary_records_cpr_and_cmd(tmp_path: Path) -> None:
    from pathlens.report.studies import circuit_study, task_for

    model = pathlens.load("induction-2l")
    task = task_for(model, "induction", 8, 0)
    record = circuit_study(model, task, "induction", "eap", tmp_path, top_paths=2)
    circuit = Graph.load(tmp_path / "circuit")
    curve = faithfulness_curve(EdgePatcher(model, task), circuit, sizes="mib", by=record["ranked_by"])
    assert (record["cpr"], record["cmd"]) == (pytest.approx(curve.cpr), pytest.approx(curve.cmd))
    assert 0.0 <= record["cmd"] and record["cpr"] <= 1.5
    assert json.loads((tmp_path / "summary.json").read_text())["cpr"] == record["cpr"]
