"""The illusion check: the row/null decomposition for every site kind, the constructed illusion and its control.

References: the decomposition identities (v_row ⟂ v_null, v_row + v_null = v, ‖v_null W‖ ≤ 1e-5·‖v‖·‖W‖ in fp32)
against the weights read straight from the modules; a null-space patch of an MLP hidden site leaves the logits
unchanged (a causal check of "disconnected"); the hand-built models of tests/subspace_models.py, whose table is
known by construction (METHODS-VERIFIED §2: full patch 0, 1-D patch large, each part 0).
"""

from __future__ import annotations

import json

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.subspace import Subspace, das, decompose, downstream_readers, illusion_check, mean_difference
from pathlens.tasks import Task
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch
from tests.subspace_models import illusion_model, illusion_task

SITES = ["L1.mlp_post", "L0.H2.z", "L1.mlp_in", "L1.attn_in", "L1.resid_pre", "L0.resid_mid", "L0.resid_post"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("site", SITES)
def test_decomposition_identities_for_every_site_kind(family: str, site: str) -> None:
    model = tiny_model(family)
    readers = downstream_readers(model, site)
    w = readers.matrix.float()
    v = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0))
    parts = decompose(v, readers)
    assert abs(float(parts.row.double() @ parts.null.double())) <= 1e-5 * float(v.norm()) ** 2
    torch.testing.assert_close(parts.row + parts.null, v, atol=1e-5, rtol=1e-5)
    bound = 1e-5 * float(v.norm()) * float(torch.linalg.matrix_norm(w, ord=2))
    assert float((parts.null @ w).norm()) <= bound
    assert parts.null_residual <= 1e-5


def test_readers_are_the_module_weights() -> None:
    """The MLP hidden site is read by the down projection (transposed); a residual site by the next layer's q/k/v
    with the attention norm's gain folded in."""
    model = tiny_model("llama")
    block = model.hf.model.layers[1]
    mlp = downstream_readers(model, "L1.mlp_post").matrix
    torch.testing.assert_close(mlp, block.mlp.down_proj.weight.detach().double().T)
    q = downstream_readers(model, "L0.resid_post", heads=["L1.H3"], parts=["q"]).matrix  # (d_model, d_head)
    d_head = model.arch.d_head
    expected = torch.diag(block.input_layernorm.weight.detach().double()) @ (
        block.self_attn.q_proj.weight.detach().double()[3 * d_head : 4 * d_head].T
    )
    torch.testing.assert_close(q, expected)


def test_null_part_of_an_mlp_hidden_direction_is_disconnected() -> None:
    """Patching along v_null at an MLP hidden site (d_mlp > d_model, so the kernel is not empty) leaves the logits
    unchanged, while patching along v_row does not (atol 1e-5)."""
    model = tiny_model("llama", weight_scale=3.0)
    site = "L0.mlp_post"
    ids = token_batch(3, 7)
    source = model.run(token_batch(3, 7, seed=9), cache=[site]).cache[site]
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    parts = decompose(v, downstream_readers(model, site))
    assert parts.rank == 32
    clean = model.run(ids).logits
    null = model.run(ids, interventions=[Subspace.from_direction(parts.null, site, "all").intervention(source)])
    row = model.run(ids, interventions=[Subspace.from_direction(parts.row, site, "all").intervention(source)])
    torch.testing.assert_close(null.logits, clean, atol=1e-5, rtol=1e-5)
    assert float((row.logits - clean).abs().max()) > 1e-2


@pytest.fixture(scope="module")
def toy_tasks() -> tuple[Task, Task]:
    return illusion_task(n=200, seed=0), illusion_task(n=100, seed=1)


def test_constructed_illusion_raises_the_flag(toy_tasks, tmp_path) -> None:
    """DAS on the distilled example finds (e0 + e1)/√2 (cos ≥ 0.99), the full-component, row and null patches do
    nothing, the 1-D patch flips every pair: the flag is raised; the model is untouched."""
    train, test = toy_tasks
    model = illusion_model(illusion=True)
    before = snapshot(model)
    sub = das(model, train, "L0.mlp_post", epochs=30, lr=0.05)
    assert abs(float(sub.direction @ torch.tensor([1.0, 1.0, 0.0]) / 2**0.5)) >= 0.99
    report = illusion_check(model, sub, test)
    assert_untouched(model, before)
    print(report.table())
    assert report.illusion and all(report.conditions.values())
    assert abs(report.row("full-component")["fldd"]) < 1.0
    assert report.row("direction")["accuracy"] == 1.0 and report.row("direction")["fldd"] > 100
    assert abs(report.row("row-part")["fldd"]) < 1.0 and abs(report.row("null-part")["fldd"]) < 1.0
    assert report.decomposition["rank"] == 2
    assert report.decomposition["row_norm"] == pytest.approx(2**-0.5, abs=0.01)
    files = report.save(tmp_path)
    saved = json.loads(files["json"].read_text())
    assert saved["illusion"] is True and "flag_rule" in saved["meta"]
    assert [r["intervention"] for r in saved["rows"]] == [
        "clean",
        "full-component",
        "direction",
        "row-part",
        "null-part",
        "placebo",
    ]
    assert all({"accuracy", "logit_diff", "fldd"} <= set(r) for r in saved["rows"])
    assert files["png"].read_bytes()[:4] == b"\x89PNG"


def test_control_keeps_the_flag_down(toy_tasks) -> None:
    """The same finder on the control model (the feature's neuron is read) finds e0 and the flag stays down: the
    full-component patch flips the output, and the direction lies in the row space."""
    train, test = toy_tasks
    model = illusion_model(illusion=False)
    sub = das(model, train, "L0.mlp_post", epochs=30, lr=0.05)
    assert abs(float(sub.direction[0])) >= 0.99
    report = illusion_check(model, sub, test)
    print(report.table())
    assert not report.illusion
    assert (
        not report.conditions["full_component_not_toward_counterfactual"] and report.row("full-component")["fldd"] > 100
    )
    assert report.row("row-part")["fldd"] == pytest.approx(report.row("direction")["fldd"], abs=1.0)
    assert report.decomposition["row_norm"] > 0.99


def test_mean_difference_on_the_illusion_model_is_disconnected(toy_tasks) -> None:
    """The feature's own direction (what varies) lies in the kernel: its patch does nothing, so no flag either."""
    train, test = toy_tasks
    model = illusion_model(illusion=True)
    report = illusion_check(model, mean_difference(model, train, "L0.mlp_post"), test)
    assert report.decomposition["null_norm"] > 0.99
    assert abs(report.row("direction")["fldd"]) < 1.0 and not report.illusion


def test_bad_inputs(toy_tasks) -> None:
    train, test = toy_tasks
    model = illusion_model(illusion=True)
    sub = Subspace.from_direction(torch.tensor([1.0, 1.0, 0.0]), "L0.mlp_post")
    unlabelled = Task.from_ids(test.clean_ids, test.corrupt_ids, test.answer_ids, test.wrong_ids)
    with pytest.raises(PathlensError, match="no counterfactual labels"):
        illusion_check(model, sub, unlabelled)
    with pytest.raises(PathlensError, match="read by no later attention layer.*needs downstream weights"):
        illusion_check(model, Subspace.from_direction(torch.ones(8), "L0.resid_post"), test)
    with pytest.raises(PathlensError, match="no downstream weight reads logits.*needs a site whose reader"):
        downstream_readers(model, "logits")
    with pytest.raises(PathlensError, match="width d=4"):
        illusion_check(model, Subspace.from_direction(torch.ones(4), "L0.mlp_post"), test)
    with pytest.raises(PathlensError, match="direction has"):
        decompose(torch.ones(4), downstream_readers(model, "L0.mlp_post"))
    with pytest.raises(PathlensError, match="k=2"):
        illusion_check(model, Subspace(torch.eye(3)[:, :2], "L0.mlp_post"), test)
    with pytest.raises(PathlensError, match="do not read"):
        downstream_readers(tiny_model("llama"), "L1.resid_post", heads=["L0.H1"])


def test_important_heads_are_the_top_patching_effects_after_the_site() -> None:
    from pathlens import patch
    from pathlens.subspace.study import important_heads
    from tests.helpers import padded_task

    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task(3, 9)
    chosen = important_heads(model, task, after_layer=0, k=2)
    scores = patch(model, task, sites="heads", layers=[1], progress=False)
    effect = (scores.values[0] - scores.meta["base_metric"]).abs()
    assert chosen == [f"L1.H{int(h)}" for h in torch.topk(effect, 2).indices]
    readers = downstream_readers(model, "L0.resid_post", heads=chosen, parts=["q"])
    assert readers.matrix.shape == (32, 2 * model.arch.d_head)
