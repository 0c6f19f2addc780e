"""Attribution patching against exact patching.

Where the metric is linear in the patched site, AtP is exact (checked to 1e-5); elsewhere it must correlate
with exact patching on the same cells.
"""

from __future__ import annotations

import torch

import pathlens
from pathlens.attribution import atp
from tests.conftest import tiny_model
from tests.test_patching import padded_task


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
            exact = pathlens.patch(model, task, sites=sites, positions=positions, layers=last, progress=False)
            estimate = atp(model, task, sites=sites, positions=positions, layers=last)
            assert estimate.dims == exact.dims and estimate.coords == exact.coords
            torch.testing.assert_close(estimate.values, exact.values, atol=1e-5, rtol=0, msg=f"{family} {sites}")


def test_atp_tracks_exact_patching_and_leaves_the_model_untouched() -> None:
    from tests.test_safety_and_errors import assert_untouched, snapshot

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
