"""Attribution patching against exact patching.

Where the metric is linear in the patched site, AtP is exact (checked to 1e-5); elsewhere it must correlate
with exact patching on the same cells.
"""

from __future__ import annotations

import pytest
import torch

import pathlens
from pathlens.attribution import atp
from tests.helpers import assert_untouched, llama_like, padded_task, snapshot, tiny_model


def linear_tail_model(family: str) -> pathlens.Model:
    """A tiny model whose final norm is removed, so logits are linear in the last layer's writes."""
    model = tiny_model(family, weight_scale=4.0)
    parent, _, name = model.arch.final_norm.rpartition(".")
    setattr(model.hf.get_submodule(parent), name, torch.nn.Identity())
    return model


LINEAR_SITES = {
    "gpt2": ("mlp_out",),
    "llama": ("mlp_out",),
    "neox_parallel": ("mlp_out", "heads", "attn_out"),
    "attn_only": ("heads", "attn_out", "z"),
}


def test_atp_is_exact_where_the_metric_is_linear_in_the_site() -> None:
    """Without the final norm, the last layer's MLP output — and head outputs where no MLP follows them
    (attention-only; NeoX's parallel block) — reach the logits linearly."""
    for family, families in LINEAR_SITES.items():
        model = linear_tail_model(family)
        task = padded_task()
        last = [model.n_layers - 1]
        for sites, positions in ((f, p) for f in families for p in ("all", "each")):
            exact = pathlens.patch(
                model, task, sites=sites, positions=positions, layers=last, progress=False, direction="denoise"
            )
            estimate = atp(model, task, sites=sites, positions=positions, layers=last, direction="denoise")
            assert estimate.dims == exact.dims and estimate.coords == exact.coords
            torch.testing.assert_close(estimate.values, exact.values, atol=1e-5, rtol=0, msg=f"{family} {sites}")


def test_atp_tracks_exact_patching_and_leaves_the_model_untouched() -> None:
    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    for sites, positions, direction in (
        ("heads", "all", "denoise"),
        ("resid_pre", "each", "noise"),
        ("k", "all", "denoise"),
    ):
        exact = pathlens.patch(model, task, sites=sites, positions=positions, direction=direction, progress=False)
        estimate = atp(model, task, sites=sites, positions=positions, direction=direction)
        assert estimate.corr(exact) > 0.6, (sites, estimate.corr(exact))
    assert_untouched(model, before)


def test_verified_top_k_equals_the_full_sweeps_top_k() -> None:
    """patch(top_k=K): exact values on every verified cell, NaN elsewhere, and the same top K as the full sweep."""
    import transformers

    torch.manual_seed(0)
    hf = llama_like(
        transformers.LlamaConfig, transformers.LlamaForCausalLM, num_hidden_layers=4, num_attention_heads=8
    )()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(1.5)
    model = pathlens.Model(hf, name="tiny-llama-4x8")
    task = padded_task()
    full = pathlens.patch(model, task, sites="heads", progress=False, direction="denoise")
    base = full.meta["corrupt_metric"]
    k = 4
    truth = set(torch.topk((full.values - base).abs().flatten(), k).indices.tolist())
    for prefilter in ("atp*", "relp", "atp"):
        fast = pathlens.patch(
            model, task, sites="heads", top_k=k, prefilter=prefilter, progress=False, direction="denoise"
        )
        assert fast.dims == full.dims and fast.method.endswith("verified-topk")
        done = ~torch.isnan(fast.values)
        assert int(done.sum()) == fast.meta["verified"] < full.values.numel()
        torch.testing.assert_close(fast.values[done], full.values[done], atol=1e-6, rtol=0)
        found = (fast.values - base).abs().flatten().nan_to_num(nan=-1.0)
        assert set(torch.topk(found, k).indices.tolist()) == truth, prefilter
    with pytest.raises(pathlens.PathlensError, match="prefilter"):
        pathlens.patch(model, task, top_k=3, prefilter="magic", progress=False, direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="top_k"):
        pathlens.patch(model, task, top_k=3, ablation="zero", progress=False, direction="denoise")


def test_compare_reports_correlations_overlap_and_a_scatter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    model = tiny_model("gpt2", weight_scale=2.0)
    task = padded_task()
    exact = pathlens.patch(model, task, sites="heads", progress=False, direction="denoise")
    estimate = atp(model, task, sites="heads", direction="denoise")
    same = pathlens.compare(exact, exact, k=3)
    assert same.table.loc["heads", "pearson"] == pytest.approx(1.0)
    assert same.table.loc["heads", "top3_overlap"] == 1.0
    result = pathlens.compare({"heads": exact}, {"heads": estimate}, k=3, labels=("exact", "atp"))
    x = (exact.values - exact.meta["base_metric"]).flatten().double()
    y = (estimate.values - estimate.meta["base_metric"]).flatten().double()
    frame = pd.DataFrame({"x": x.numpy(), "y": y.numpy()})
    assert result.table.loc["heads", "pearson"] == pytest.approx(frame.corr().loc["x", "y"], abs=1e-9)
    assert result.table.loc["heads", "spearman"] == pytest.approx(frame.corr("spearman").loc["x", "y"], abs=1e-9)
    result.plot(tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(pathlens.PathlensError, match="families differ"):
        pathlens.compare({"heads": exact}, {"mlp": estimate})


def test_integrated_gradients_completeness_and_linear_exactness() -> None:
    """IG over a whole family at all positions converges to exactly patching that family (completeness);
    with steps=1 it is AtP; where the metric is linear in the site it is exact for any number of steps."""
    from pathlens.attribution import integrated_gradients

    model = tiny_model("llama", weight_scale=2.0)
    task = padded_task()
    for sites in ("resid_pre", "heads", "mlp_out"):
        exact = pathlens.patch(model, task, sites=sites, progress=False, direction="denoise")
        one = integrated_gradients(model, task, sites=sites, steps=1, direction="denoise")
        torch.testing.assert_close(
            one.values, atp(model, task, sites=sites, direction="denoise").values, atol=1e-6, rtol=0
        )
        fine = integrated_gradients(model, task, sites=sites, steps=64, max_batch_tokens=200, direction="denoise")
        base = exact.meta["base_metric"]
        if sites != "heads":  # a (layer,) grid: each cell is the whole family of that layer
            error = ((fine.values - exact.values).abs() / (exact.values - base).abs().clamp(min=1e-3)).max()
            assert error < 0.05, (sites, float(error))
        else:
            assert fine.corr(exact) >= one.corr(exact) - 1e-3
    linear = linear_tail_model("neox_parallel")
    for steps in (1, 7):
        estimate = integrated_gradients(
            linear, task, sites="heads", layers=[linear.n_layers - 1], steps=steps, direction="denoise"
        )
        exact = pathlens.patch(
            linear, task, sites="heads", layers=[linear.n_layers - 1], progress=False, direction="denoise"
        )
        torch.testing.assert_close(estimate.values, exact.values, atol=1e-5, rtol=0)
