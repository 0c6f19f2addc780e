"""Directional ablation: the weight-orthogonalized copy's logits equal the run-time ablation's within 1e-4 on
several families (the original model untouched), the ablated residual stream has no component along the
direction, and sandwich-norm models are refused by name."""

from __future__ import annotations

import pytest
import torch

from pathlens import PathlensError
from pathlens.steering.ablation import ablation_interventions, orthogonalized
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "neox_parallel", "llama", "qwen2", "attn_only"])
def test_orthogonalized_copy_equals_run_time_ablation(family: str) -> None:
    model = tiny_model(family, weight_scale=2.0)
    before = snapshot(model)
    direction = torch.randn(model.arch.d_model, generator=torch.Generator().manual_seed(2))
    ids = token_batch(n=3)
    last = f"L{model.n_layers - 1}.resid_post"
    with torch.no_grad():
        plain = model.run(ids).logits
        ablated = model.run(ids, interventions=ablation_interventions(model, direction), cache=[last])
        copy = orthogonalized(model, direction)
        baked = copy.run(ids, cache=[last])
    torch.testing.assert_close(baked.logits, ablated.logits, atol=1e-4, rtol=0)
    assert float((ablated.logits - plain).abs().max()) > 1e-3  # the ablation does something
    unit = direction / direction.norm()
    assert float((baked.cache[last] @ unit).abs().max()) < 1e-4
    assert_untouched(model, before)
    assert copy.hf is not model.hf


def test_sandwich_norm_models_are_refused_by_name() -> None:
    model = tiny_model("gemma3")
    with pytest.raises(PathlensError, match=r"normalizes the attention output \(post_attention_layernorm\)"):
        orthogonalized(model, torch.ones(model.arch.d_model))
    with pytest.raises(PathlensError, match=r"direction must be a \(32,\) vector"):
        ablation_interventions(model, torch.ones(5))
