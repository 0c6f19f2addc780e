"""Circuits: exact edge patching, faithfulness, discovery and pathways.

Edge patching is checked against an explicit recomputation of the receiver's input (the projection or MLP of
one receiver fed norm(x + z_u^corrupt − z_u^clean), everything else unchanged), and by the identities
"every edge kept = the clean run", "no edge kept = the corrupted run". Discovery is checked on the embedded
induction model, whose circuit is known: previous-token head L0.H1 → induction head L1.H0 through its key.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pathlens
from pathlens.circuits import edge_patching
from pathlens.circuits.discover import _between, _choose, discover, layer_signature, pathways
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import Curve, completeness, default_sizes, faithfulness, faithfulness_curve
from tests.helpers import RECEIVERS, assert_untouched, padded_task, reference_column, snapshot, tiny_model

FAMILIES = ("gpt2", "gpt_neo", "neox_parallel", "neox_sequential", "llama", "qwen3", "attn_only", "olmo_generic")
KEY_ROUTE = ("input", "L0.H1.v", "L0.H1", "L1.H0.k", "L1.H0", "logits")
INDUCTION_CIRCUIT = {("input", "L0.H1.v"), ("L0.H1", "L1.H0.k"), ("input", "L1.H0.v"), ("L1.H0", "logits")}


def _metric(model: pathlens.Model, ids: torch.Tensor, task: pathlens.tasks.Task) -> float:
    return float(task.score(model.run(ids, attention_mask=task.attention_mask).logits).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_all_edges_kept_is_clean_and_none_is_corrupt(family: str) -> None:
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    patcher = EdgePatcher(model, task)
    valid = pathlens.edge_attribution(model, task).valid
    full, empty = patcher.metric_of(torch.stack([valid, torch.zeros_like(valid)])).tolist()
    assert full == pytest.approx(_metric(model, task.clean_ids, task), abs=1e-6)
    assert empty == pytest.approx(_metric(model, task.corrupt_ids, task), abs=1e-6)
    assert_untouched(model, before)


@pytest.mark.parametrize("family", list(RECEIVERS))
def test_single_edge_patch_equals_explicit_recomputation(family: str) -> None:
    """Patching one edge u → v (sender u upstream of v, so u's own value is the clean one) equals feeding v's
    projection norm(x + Δz_u) — `reference_column` with ε = 1 is its first-order version, so compare
    against a direct evaluation of the same hook at ε = 1."""
    model = tiny_model(family, weight_scale=4.0)
    model.hf.double()
    task = padded_task()
    graph = pathlens.edge_attribution(model, task)
    patcher = EdgePatcher(model, task)
    valid = graph.valid
    for receiver, proj, norm, columns in RECEIVERS[family]:
        col = graph.receivers.index(receiver)
        senders = torch.nonzero(valid[:, col])[:, 0].tolist()
        masks = valid[None].repeat(len(senders), 1, 1)
        masks[torch.arange(len(senders)), senders, col] = False
        got = patcher.metric_of(masks) - _metric(model, task.clean_ids, task)
        expected = reference_column(model, task, graph, receiver, proj, norm, columns, eps_value=1.0)[senders]
        scale = expected.abs().max()
        assert scale > 1e-5, receiver
        # Llama-style RMSNorms compute in float32 even in a float64 model, hence ~1e-6 relative agreement
        torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5, msg=receiver)


def _forced(from_source: bool):  # type: ignore[no-untyped-def]
    def choose(removed: torch.Tensor) -> torch.Tensor:
        return torch.full((removed.shape[0],), from_source)

    return choose


@pytest.mark.parametrize(("family", "final_norm"), [("gpt2", "transformer.ln_f"), ("llama", "model.norm")])
def test_single_edge_into_the_logits_equals_explicit_recomputation(family: str, final_norm: str) -> None:
    """The logits read the final residual: patching u → logits (the last layer's heads and MLP included, which
    the patcher adds after the last attention read) equals unembedding norm(x + Δz_u) (float64; 1e-5 relative,
    as above)."""
    model = tiny_model(family, weight_scale=4.0)
    model.hf.double()
    task = padded_task()
    graph = pathlens.edge_attribution(model, task)
    patcher = EdgePatcher(model, task)
    col = graph.receivers.index("logits")
    senders = torch.nonzero(graph.valid[:, col])[:, 0].tolist()
    assert graph.senders[senders[-1]].endswith(".mlp") and len(senders) == len(graph.senders)
    masks = graph.valid[None].repeat(len(senders), 1, 1)
    masks[torch.arange(len(senders)), senders, col] = False
    got = patcher.metric_of(masks) - _metric(model, task.clean_ids, task)
    vocab = list(range(model.hf.config.vocab_size))
    expected = reference_column(model, task, graph, "logits", "lm_head", final_norm, vocab, eps_value=1.0)[senders]
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max(), rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "ablation"),
    [(f, "patch") for f in FAMILIES] + [("gpt2", "mean"), ("llama", "zero"), ("neox_parallel", "zero")],
)
def test_both_correction_forms_agree_on_random_circuits(
    family: str, ablation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver's input is the running residual minus the removed edges, or the source residual plus the kept
    ones; the patcher picks the cheaper per hook. Forcing either form everywhere gives the same metrics
    (float32, differences of sums of ~40 senders: 1e-5 relative to the metric's scale)."""
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    patcher = EdgePatcher(model, task, ablation=ablation, max_batch_tokens=64)
    valid = pathlens.edge_attribution(model, task).valid
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([valid & (torch.rand(valid.shape, generator=gen) < p) for p in (0.03, 0.3, 0.7, 0.97)])
    chosen = patcher.metric_of(masks)
    results = []
    for from_source in (False, True):
        monkeypatch.setattr(edge_patching, "cheaper_form", _forced(from_source))
        results.append(patcher.metric_of(masks))
    scale = float(chosen.abs().max())
    for forced in results:
        torch.testing.assert_close(forced, chosen, atol=1e-5 * scale, rtol=0)
    assert float((chosen[0] - chosen[-1]).abs()) > 1e-3 * scale  # the circuits differ in effect


@pytest.mark.parametrize(("family", "ablation"), [("gpt2", "patch"), ("llama", "mean"), ("neox_parallel", "zero")])
def test_rows_left_out_of_a_module_get_its_output_on_the_source(
    family: str, ablation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose circuit keeps no edge into a q/k/v projection or MLP is left out of that module's call and
    given the module's output on the source input. Sparse circuits alone in their forward (every row left out of
    most modules, some calls on no row at all) must match the same circuits batched with the full graph and
    the run where the running form is forced (no row ever left out): float32, 1e-5 of the metric's scale."""
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    patcher = EdgePatcher(model, task, ablation=ablation, max_batch_tokens=64)
    valid = pathlens.edge_attribution(model, task).valid
    sparse = torch.zeros((3, *valid.shape), dtype=torch.bool)
    sparse[0, 0, -1] = True  # input -> logits
    sparse[1, 0] = valid[0]  # every edge out of the input
    sparse[2, :, -1] = valid[:, -1]  # every edge into the logits
    alone = torch.stack([patcher.metric_of(mask[None])[0] for mask in sparse])
    batched = patcher.metric_of(torch.cat([valid[None], sparse]))[1:]
    monkeypatch.setattr(edge_patching, "cheaper_form", _forced(False))
    never_left_out = patcher.metric_of(sparse)
    scale = float(never_left_out.abs().max())
    torch.testing.assert_close(alone, never_left_out, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(batched, never_left_out, atol=1e-5 * scale, rtol=0)


def test_faithfulness_curve_and_completeness_on_a_tiny_model() -> None:
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    patcher = EdgePatcher(model, task, max_batch_tokens=64)
    graph = pathlens.edge_attribution(model, task)
    curve = faithfulness_curve(patcher, graph)
    assert curve.sizes == default_sizes(graph.edges_total) and curve.sizes[-1] == graph.edges_total
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    one_by_one = [faithfulness(patcher, graph.prune(top_k=s)) for s in curve.sizes[:3]]
    assert one_by_one == pytest.approx(curve.faithfulness[:3], abs=1e-6)
    assert 0.0 <= curve.area <= 1.5
    assert completeness(patcher, graph.prune(top_k=graph.edges_total)) == pytest.approx(0.0, abs=1e-5)
    mean = EdgePatcher(model, task, ablation="mean")
    assert mean.metric_of(graph.valid[None]).item() == pytest.approx(curve.full, abs=1e-6)
    with torch.no_grad():
        clean, corrupt = (
            model.hf(ids, attention_mask=task.attention_mask).logits for ids in (task.clean_ids, task.corrupt_ids)
        )
    assert curve.full == pytest.approx(float(task.metric(clean, task).mean()), abs=1e-5)
    assert curve.empty == pytest.approx(float(task.metric(corrupt, task).mean()), abs=1e-5)
    assert faithfulness_curve(patcher, graph, [graph.edges_total]).faithfulness == [1.0]
    mean_curve = faithfulness_curve(mean, graph, curve.sizes[:2])
    assert mean_curve.empty == pytest.approx(mean.metric_of(torch.zeros_like(graph.valid)[None]).item(), abs=1e-6)


def test_support_ranking_and_dangling_edges() -> None:
    """ "support" keeps the edges with the most helpful orientation (noise: negative scores); dropping edges that
    cannot carry a signal leaves the edge-patched metric unchanged (float32: 1e-6 of its scale)."""
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    graph = pathlens.edge_attribution(model, task)
    frame = graph.to_frame()
    for direction, helpful in (("noise", frame.score.nsmallest(5)), ("denoise", frame.score.nlargest(5))):
        oriented = dataclasses.replace(graph, meta={**graph.meta, "direction": direction})
        pruned = oriented.prune(top_k=5, by="support").to_frame()
        assert sorted(pruned[pruned.in_circuit].score) == sorted(helpful)
    with pytest.raises(pathlens.PathlensError, match="direction"):
        dataclasses.replace(graph, meta={}).prune(top_k=5, by="support")

    patcher = EdgePatcher(model, task)
    gen = torch.Generator().manual_seed(1)
    circuits = [
        dataclasses.replace(graph, kept=graph.valid & (torch.rand(graph.valid.shape, generator=gen) < p))
        for p in (0.05, 0.2)
    ]
    trimmed = [c.without_dangling() for c in circuits]
    assert all(t.n_edges < c.n_edges for t, c in zip(trimmed, circuits, strict=True))
    values = patcher.metric_of(torch.stack([c.in_circuit for c in circuits + trimmed]))
    torch.testing.assert_close(values[2:], values[:2], atol=1e-6 * float(values.abs().max()), rtol=0)
    for t in trimmed:  # a fixed point: every kept sender is the input or fed, every kept receiver sends
        kept_frame = t.to_frame()[t.to_frame().in_circuit]
        fed = {node for r in kept_frame.receiver for node in t.receiver_nodes(r)}
        assert set(kept_frame.sender) <= fed | {"input"}
        assert all(r == "logits" or set(t.receiver_nodes(r)) & set(kept_frame.sender) for r in kept_frame.receiver)


def test_the_chosen_size_is_narrowed_between_two_curve_sizes() -> None:
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    patcher = EdgePatcher(model, task)
    graph = pathlens.edge_attribution(model, task)
    curve = faithfulness_curve(patcher, graph)
    index = next(i for i, s in enumerate(curve.sizes) if s - curve.sizes[i - 1] >= 8 and i > 0)
    size, below = curve.sizes[index], curve.sizes[index - 1]
    target = curve.faithfulness[index] - 1e-9
    chosen = _between(patcher, graph, curve, "abs", size, target)
    assert below < chosen <= size
    assert faithfulness(patcher, graph.prune(top_k=chosen)) >= target
    step = (size - below) / 8
    smaller = sorted({round(below + step * i) for i in range(1, 8)} - {size})
    assert all(faithfulness(patcher, graph.prune(top_k=s)) < target for s in smaller if s < chosen)


def test_auto_ranking_picks_the_smaller_circuit_reaching_the_target() -> None:
    def curve(faith: list[float]) -> Curve:
        return Curve([1, 10, 100], faith, faith, 1.0, 0.0, 100)

    assert _choose({"abs": curve([0.1, 0.9, 1.0]), "support": curve([0.85, 1.2, 1.3])}, 0.8)[::2] == ("support", 1)
    assert _choose({"abs": curve([0.1, 0.9, 1.0]), "support": curve([0.1, 0.95, 1.3])}, 0.8)[::2] == ("abs", 10)
    assert _choose({"abs": curve([0.1, 0.5, 0.6]), "support": curve([0.1, 0.7, 0.2])}, 0.8)[::2] == ("support", 10)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "relp", "patching", "acdc"])
def test_discovery_recovers_the_induction_circuit(method: str) -> None:
    model = pathlens.load("induction-2l")
    from pathlens.report.studies import task_for

    task = task_for(model, "induction", 16, 0)
    circuit = discover(model, task, method=method)
    frame = circuit.to_frame()
    kept = set(zip(frame[frame.in_circuit].sender, frame[frame.in_circuit].receiver, strict=True))
    assert kept == INDUCTION_CIRCUIT
    assert circuit.meta["faithfulness"] >= 0.95
    routes = pathways(EdgePatcher(model, task), circuit, k=3)
    assert [tuple(r["nodes"]) for r in routes[:2]] == [KEY_ROUTE, ("input", "L1.H0.v", "L1.H0", "logits")]


def test_eap_and_a_low_threshold_acdc_keep_the_induction_route() -> None:
    """EAP (first order) and ACDC at threshold 0.01 keep one or two extra (real, small) edges besides the known
    circuit."""
    model = pathlens.load("induction-2l")
    from pathlens.report.studies import task_for

    task = task_for(model, "induction", 16, 0)
    for method, threshold in (("acdc", 0.01), ("eap", 0.05)):
        circuit = discover(model, task, method=method, threshold=threshold)
        frame = circuit.to_frame()
        kept = set(zip(frame[frame.in_circuit].sender, frame[frame.in_circuit].receiver, strict=True))
        assert kept >= INDUCTION_CIRCUIT and len(kept) <= 6, (method, kept)
        assert circuit.meta["faithfulness"] >= 0.95
        routes = pathways(EdgePatcher(model, task), circuit, k=3)
        assert tuple(routes[0]["nodes"]) == KEY_ROUTE
    # EAP's estimates rank the key route third; pathways re-rank candidates on exact edge scores
    assert routes[0]["estimate"] < max(r["estimate"] for r in routes)


def test_layer_signature_and_errors() -> None:
    assert layer_signature(("input", "L0.H1.v", "L0.H1", "L1.G0.k", "L1.mlp", "logits")) == (
        "input",
        "L0.v",
        "L0.head",
        "L1.k",
        "L1.mlp",
        "logits",
    )
    model = tiny_model("gpt2")
    with pytest.raises(pathlens.PathlensError, match="method"):
        discover(model, padded_task(), method="magic")
    with pytest.raises(pathlens.PathlensError, match="ablation"):
        EdgePatcher(model, padded_task(), ablation="noise")
    with pytest.raises(pathlens.PathlensError, match="kept must have shape"):
        EdgePatcher(model, padded_task()).metric_of(torch.ones(2, 3, dtype=torch.bool))


def test_path_patching_equals_the_two_step_reference_on_an_attention_only_model() -> None:
    """Two-step path patching by hand: (1) run the clean prompts with sender h set to its corrupted value and
    every other head frozen at its clean value, record the receiver layer's residual input; (2) run the clean
    prompts with only the receiver's q/k/v projection reading that recorded stream."""
    from pathlens.circuits.path_patching import path_patch
    from pathlens.interventions import Intervention, Replace
    from pathlens.sites import Site

    model = tiny_model("attn_only", weight_scale=3.0)
    model.hf.double()
    task = padded_task()
    patcher = EdgePatcher(model, task)
    senders = ["L0.H0", "L0.H1", "L0.H3", "input"]
    got = path_patch(patcher, senders, ["L1.H2"])
    mask = task.attention_mask
    heads = Site("head", 0)
    clean = model.run(task.clean_ids, attention_mask=mask, cache=[heads, "L0.resid_pre"]).cache
    corrupt = model.run(task.corrupt_ids, attention_mask=mask, cache=[heads, "L0.resid_pre"]).cache
    norm = model.hf.model.layers[1].input_layernorm
    projections = [getattr(model.hf.model.layers[1].self_attn, p) for p in ("q_proj", "k_proj", "v_proj")]
    columns = torch.arange(16, 24)
    expected = []
    for sender in senders:
        if sender == "input":
            step1 = [Intervention(Site("resid_pre", 0), Replace(corrupt["L0.resid_pre"]))]
            step1 += [Intervention(heads, Replace(clean[heads]))]
        else:
            h = int(sender.split(".H")[1])
            frozen = clean[heads].clone()
            frozen[:, :, h] = corrupt[heads][:, :, h]
            step1 = [Intervention(heads, Replace(frozen))]
        recorded = model.run(task.clean_ids, attention_mask=mask, cache=["L1.resid_pre"], interventions=step1).cache[
            "L1.resid_pre"
        ]

        def rewrite(
            module: torch.nn.Module,
            args: tuple[torch.Tensor, ...],
            output: torch.Tensor,
            stream: torch.Tensor = recorded,
        ) -> torch.Tensor:
            new = output.clone()
            new[..., columns] = torch.nn.functional.linear(norm(stream), module.weight, module.bias)[..., columns]
            return new

        handles = [p.register_forward_hook(rewrite) for p in projections]
        try:
            with torch.no_grad():
                logits = model.hf(input_ids=task.clean_ids, attention_mask=mask).logits
        finally:
            for handle in handles:
                handle.remove()
        expected.append(float(task.score(logits).mean()))
    expected_values = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.values.double(), expected_values, atol=1e-7, rtol=0)  # Scores store float32
    assert max(abs(e - got.meta["base_metric"]) for e in expected) > 1e-3
