"""Edge attribution (EAP, EAP-IG, RelP) and the Graph type.

References: (1) identities — a sender's outgoing edge scores sum to its node-level AtP/RelP estimate, and the
logits' incoming scores to AtP of the final residual stream; (2) a slow per-receiver reference that feeds one
head's q/k/v projection (or one MLP) a residual stream moved by ε·Δz_u while everything else reads the
unmoved stream, and differentiates the metric in ε; (3) IG completeness for the input node.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import pathlens
from pathlens.attribution import atp, relp
from pathlens.attribution.edges import edge_attribution
from pathlens.graph import Graph
from pathlens.sites import Site
from tests.conftest import tiny_model
from tests.test_patching import padded_task
from tests.test_safety_and_errors import assert_untouched, snapshot

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


def _moved_input_hook(
    make_delta: Callable[[torch.Tensor], torch.Tensor], columns: torch.Tensor, eps: torch.Tensor, norm: nn.Module
) -> Callable[..., torch.Tensor]:
    """Forward hook on a projection: its output at `columns` is recomputed from norm(x + ε·Δ) (x = the
    norm's input, recorded by `_record_input`); the other columns keep reading norm(x)."""

    inside = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if inside:  # the recomputation below calls the module again
            return None
        x = norm.recorded  # type: ignore[attr-defined]
        inside.append(True)
        try:
            moved = module(norm(x + eps * make_delta(x)))
        finally:
            inside.clear()
        mask = torch.zeros(output.shape[-1], dtype=torch.bool)
        mask[columns] = True
        return torch.where(mask, moved, output)

    return hook


def _record_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    module.recorded = args[0]  # type: ignore[assignment]


def _reference_column(
    model: pathlens.Model,
    task: pathlens.tasks.Task,
    graph: Graph,
    receiver: str,
    proj: str,
    norm: str,
    columns: list[int],
    eps_value: float | None = None,
) -> torch.Tensor:
    """Slow reference: for each sender u, d m / d ε with receiver's projection columns reading x + ε Δz_u —
    or, with `eps_value`, the finite change m(ε) − m(0) (exact patching of the edge when ε = 1)."""
    deltas = _deltas(model, task, graph)
    with torch.no_grad():
        clean_logits = model.hf(input_ids=task.clean_ids, attention_mask=task.attention_mask).logits
        clean_value = task.metric(clean_logits, task).mean()  # type: ignore[misc]
    out = []
    norm_module = model.hf.get_submodule(norm)
    proj_module = model.hf.get_submodule(proj)
    for s in range(len(graph.senders)):
        if torch.isnan(graph.scores[s, graph.receivers.index(receiver)]):
            out.append(float("nan"))
            continue
        eps = torch.zeros((), requires_grad=True) if eps_value is None else torch.tensor(eps_value)
        record = norm_module.register_forward_pre_hook(_record_input)
        handle = proj_module.register_forward_hook(
            _moved_input_hook(lambda x, s=s: deltas[:, :, s], torch.tensor(columns), eps, norm_module)
        )
        try:
            with torch.enable_grad():
                logits = model.hf(input_ids=task.clean_ids, attention_mask=task.attention_mask).logits
                value = task.metric(logits, task).mean()  # type: ignore[misc]
                if eps_value is None:
                    (grad,) = torch.autograd.grad(value, eps)
                else:
                    grad = value - clean_value
        finally:
            handle.remove()
            record.remove()
            del norm_module.recorded
        out.append(float(grad))
    return torch.tensor(out, dtype=torch.float64)


def _deltas(model: pathlens.Model, task: pathlens.tasks.Task, graph: Graph) -> torch.Tensor:
    """Δz per sender (N, P, S, d) from cached runs, computed independently of the engine (head = z_h W_O[h])."""
    a = model.arch
    fams = [Site("resid_pre", 0)] + [Site("head", layer) for layer in range(a.n_layers)]
    fams += [Site("mlp_out", layer) for layer in range(a.n_layers)] if a.mlp else []
    corrupt = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=fams).cache
    clean = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=fams).cache
    parts = []
    for name in graph.senders:
        if name == "input":
            parts.append(corrupt["L0.resid_pre"] - clean["L0.resid_pre"])
        elif name.endswith(".mlp"):
            layer = int(name[1:].split(".")[0])
            parts.append(corrupt[Site("mlp_out", layer)] - clean[Site("mlp_out", layer)])
        else:
            layer, head = (int(x) for x in name[1:].split(".H"))
            parts.append((corrupt[Site("head", layer)] - clean[Site("head", layer)])[:, :, head])
    return torch.stack(parts, dim=2)


RECEIVERS = {
    # family: (receiver, projection module, its input norm, the projection's output columns for that input)
    "gpt2": [
        ("L1.H2.q", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_1", list(range(16, 24))),
        ("L1.H1.k", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_1", list(range(40, 48))),
        ("L1.H3.v", "transformer.h.1.attn.c_attn", "transformer.h.1.ln_1", list(range(88, 96))),
        ("L1.mlp", "transformer.h.1.mlp.c_fc", "transformer.h.1.ln_2", list(range(128))),
    ],
    "llama": [
        ("L1.H3.q", "model.layers.1.self_attn.q_proj", "model.layers.1.input_layernorm", list(range(24, 32))),
        ("L1.G1.k", "model.layers.1.self_attn.k_proj", "model.layers.1.input_layernorm", list(range(8, 16))),
        ("L1.G0.v", "model.layers.1.self_attn.v_proj", "model.layers.1.input_layernorm", list(range(0, 8))),
    ],
    "neox_sequential": [
        (
            "L1.H1.q",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.input_layernorm",
            list(range(24, 32)),
        ),
        (
            "L1.H2.k",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.input_layernorm",
            list(range(56, 64)),
        ),
        (
            "L1.H0.v",
            "gpt_neox.layers.1.attention.query_key_value",
            "gpt_neox.layers.1.input_layernorm",
            list(range(16, 24)),
        ),
    ],
}


@pytest.mark.parametrize("family", list(RECEIVERS))
def test_each_receiver_matches_a_slow_reference(family: str) -> None:
    """The per-head split of the attention input's gradient (fused, separate with GQA, interleaved layouts)."""
    model = tiny_model(family, weight_scale=4.0)
    model.hf.double()  # float64, so that small edges are compared to ~1e-12, not to float32 noise
    task = padded_task()
    graph = edge_attribution(model, task, method="eap", direction="noise")
    for receiver, proj, norm, columns in RECEIVERS[family]:
        expected = _reference_column(model, task, graph, receiver, proj, norm, columns)
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
    with pytest.raises(pathlens.PathlensError, match="sandwich"):
        edge_attribution(tiny_model("gemma3"), task)
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(pathlens.PathlensError, match="method"):
        edge_attribution(model, task, method="acdc")
    with pytest.raises(pathlens.PathlensError, match="steps"):
        edge_attribution(model, task, method="eap-ig", steps=0)
    assert_untouched(model, before)
