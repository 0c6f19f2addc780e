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


def test_a_concept_carried_by_one_direction_is_unreadable_after_ablating_it() -> None:
    """A tiny model whose negative words embed as their positive twins minus 2c·r̂ carries the contrast along r̂
    alone. A fresh probe reads it before ablation (held-out accuracy ≥ 0.9) and at chance ± 5% after ablating the
    direction found by difference in means at every layer; no component along it is left (1e-4)."""
    from pathlens.steering.ablation import probe_after_ablation
    from pathlens.steering.finders import mean_difference
    from tests.test_steering_finders import tiny_with_words

    model = tiny_with_words("llama")
    tok = model.tokenizer
    pairs = [("good", "bad"), ("great", "awful"), ("lovely", "sad"), ("fine", "dull")]
    unit = torch.randn(model.arch.d_model, generator=torch.Generator().manual_seed(5))
    unit = unit / unit.norm()
    embed = model.hf.get_input_embeddings().weight
    with torch.no_grad():
        for good, bad in pairs:
            embed[tok.convert_tokens_to_ids(bad)] = embed[tok.convert_tokens_to_ids(good)] - 6.0 * unit
    prefixes = ["the film was", "a day is", "the meal was very", "a book was", "it is so"]
    positive = [f"{p} {g}" for p in prefixes for g, _ in pairs]
    negative = [f"{p} {b}" for p in prefixes for _, b in pairs]
    found = mean_difference(model, positive, negative, "L0.resid_pre").vectors["L0.resid_pre"]
    torch.testing.assert_close(found, 6.0 * unit, atol=1e-5, rtol=0)  # the contrast is that one direction
    sites = ["L0.resid_post", "L1.resid_post"]
    table = probe_after_ablation(model, positive, negative, found, sites, folds=4)
    assert (table["before"] >= 0.9).all(), table
    assert ((table["after"] - 0.5).abs() <= 0.05).all(), table
    assert (table["residual"] < 1e-4).all(), table


def test_probe_accuracy_reads_separable_sets_and_not_shuffled_ones() -> None:
    """Reference cases: two well-separated Gaussian clouds → ≥ 0.95; one cloud split at random → chance ± 0.15."""
    from pathlens.steering.finders import probe_accuracy

    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(8)
    shift[0] = 6.0
    a, b = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    assert probe_accuracy(a + shift, b, folds=4) >= 0.95
    assert abs(probe_accuracy(a, b, folds=4) - 0.5) <= 0.15
    with pytest.raises(PathlensError, match="folds must be"):
        probe_accuracy(a, b, folds=1)
