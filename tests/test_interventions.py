"""Interventions: each op equals its hand computation, positions and rows limit its effect, K interventions on
K slices of one batch equal K separate runs, and a selection or source that does not fit says why.

Tolerance: 1e-5 absolute where batching reorders sums; 1e-6 for an op against its hand computation (fp32).
"""

from __future__ import annotations

import pytest
import torch

from pathlens import Ablate, Add, Intervention, Model, PathlensError, Project, Replace, Scale
from tests.helpers import tiny_model, token_batch


def test_ops_match_hand_computation() -> None:
    model = tiny_model("llama")
    ids, other = token_batch(n=4), token_batch(n=4, seed=9)
    site = "L0.attn_out"
    value = model.run(ids, cache=[site]).cache[site]
    other_value = model.run(other, cache=[site]).cache[site]
    vec = torch.randn(model.arch.d_model)
    basis = torch.linalg.qr(torch.randn(model.arch.d_model, 3)).Q
    expected = {
        "add": value + 2.0 * vec,
        "scale": value * 3.0,
        "zero": torch.zeros_like(value),
        "mean": value.mean(0, keepdim=True).expand_as(value),
        "mean_ref": other_value.mean(0, keepdim=True).expand_as(value),
        "project": value + ((other_value - value) @ basis) @ basis.T,
    }
    ops = {
        "add": Add(vec, 2.0),
        "scale": Scale(3.0),
        "zero": Ablate("zero"),
        "mean": Ablate("mean"),
        "mean_ref": Ablate("mean", reference=other_value),
        "project": Project(basis, other_value),
    }
    for name, op in ops.items():
        got = model.run(ids, cache=[site], interventions=[Intervention(site, op)]).cache[site]
        torch.testing.assert_close(got, expected[name], atol=1e-6, rtol=1e-6, msg=name)
    resampled = model.run(
        ids, cache=[site], interventions=[Intervention(site, Ablate("resample", reference=other_value, seed=3))]
    )
    rows = resampled.cache[site]
    assert all(any(torch.equal(r, o) for o in other_value) for r in rows)


def test_positions_and_rows_limit_the_effect(model: Model) -> None:
    ids = token_batch(n=4)
    base = model.run(ids).logits
    patched = model.run(ids, interventions=[Intervention("L0.H1", Scale(0.0), positions=[5], rows=[2])]).logits
    changed = (patched - base).abs().amax(dim=-1) > 0
    assert not changed[[0, 1, 3]].any()
    assert not changed[2, :5].any()
    assert changed[2, 5]


def test_batched_interventions_equal_separate_forwards(model: Model) -> None:
    """K interventions on K slices of a K*N batch give the same logits as K separate runs (<= 1e-5)."""
    clean, corrupt = token_batch(n=2, seed=3), token_batch(n=2, seed=4)
    sites = ["L0.H0", "L1.H3", "L0.resid_pre", "L1.attn_out"]
    source = model.run(corrupt, cache=sites).cache
    separate = [
        model.run(clean, interventions=[Intervention(s, Replace(source[s]), positions=[3, 4])]).logits for s in sites
    ]
    k, n = len(sites), clean.shape[0]
    batched_ivs = [
        Intervention(s, Replace(source[s]), positions=[3, 4], rows=slice(i * n, (i + 1) * n))
        for i, s in enumerate(sites)
    ]
    batched = model.run(clean.repeat(k, 1), interventions=batched_ivs).logits
    torch.testing.assert_close(batched, torch.cat(separate), atol=1e-5, rtol=0)


def test_positions_and_rows_out_of_range() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match=r"positions .* \[9\] out of range for size 9"):
        model.run(token_batch(), interventions=[Intervention("L0.H0", Scale(0.0), positions=[9])])
    with pytest.raises(PathlensError, match=r"rows .* \[5\] out of range for size 3"):
        model.run(token_batch(), interventions=[Intervention("L0.H0", Scale(0.0), rows=[5])])


def test_source_shape_mismatch_is_explained() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match="batch axis has size 2"):
        model.run(token_batch(), interventions=[Intervention("L0.resid_pre", Replace(torch.zeros(2, 9, 32)))])


def test_project_out_removes_the_direction_and_nothing_else() -> None:
    """ProjectOut equals x - (x.r)r by hand; the result has no component along r; a restricted op is itself (its
    direction applies everywhere); a direction of the wrong width or zero is named."""
    from pathlens.interventions import ProjectOut

    model = tiny_model("llama")
    ids = token_batch(n=3)
    site = "L0.resid_post"
    value = model.run(ids, cache=[site]).cache[site]
    direction = torch.randn(model.arch.d_model, generator=torch.Generator().manual_seed(4))
    unit = direction / direction.norm()
    op = ProjectOut(3.0 * direction)
    got = model.run(ids, cache=[site], interventions=[Intervention(site, op)]).cache[site]
    torch.testing.assert_close(got, value - (value @ unit)[..., None] * unit, atol=1e-6, rtol=1e-6)
    assert float((got @ unit).abs().max()) < 1e-5
    assert op.restrict(torch.tensor([0]), slice(1, 3)) is op
    with pytest.raises(PathlensError, match=r"ProjectOut on L0.resid_post: its direction has 5 entries"):
        model.run(ids, interventions=[Intervention(site, ProjectOut(torch.ones(5)))])
    with pytest.raises(PathlensError, match="non-zero"):
        ProjectOut(torch.zeros(model.arch.d_model))
