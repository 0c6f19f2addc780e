"""`Model`: a plain run equals the wrapped model's own forward, and loading, site resolution and inputs that do
not fit get an error that says what was wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch

import pathlens
from pathlens import Intervention, Model, PathlensError, Scale
from tests.helpers import tiny_model, token_batch


def test_plain_run_matches_model(model: Model) -> None:
    ids = token_batch()
    with torch.no_grad():
        expected = model.hf(ids, use_cache=False).logits
    assert torch.equal(model.run(ids).logits, expected)


def test_unknown_model_name() -> None:
    with pytest.raises(PathlensError, match="embedded model"):
        pathlens.load("no-such-model-anywhere")


def test_layer_and_head_out_of_range() -> None:
    model = tiny_model("llama")
    with pytest.raises(PathlensError, match="layer of site L7.resid_pre is 7, out of range.*0..1"):
        model.run(token_batch(), cache=["L7.resid_pre"])
    with pytest.raises(PathlensError, match="head of site L0.H4 is 4.*0..3"):
        model.run(token_batch(), cache=["L0.H4"])
    with pytest.raises(PathlensError, match="key-value group.*0..1"):
        model.run(token_batch(), cache=["L0.G2.k"])


def test_empty_batch() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match="empty batch"):
        model.run(torch.zeros((0, 5), dtype=torch.long))


def test_sites_missing_from_an_architecture() -> None:
    with pytest.raises(PathlensError, match="no resid_mid"):
        tiny_model("neox_parallel").run(token_batch(), cache=["L0.resid_mid"])
    with pytest.raises(PathlensError, match="has no MLP"):
        tiny_model("attn_only").run(token_batch(), cache=["L0.mlp_out"])
    with pytest.raises(PathlensError, match="read but not written"):
        tiny_model("gpt_neo").run(token_batch(), interventions=[Intervention("L0.pattern", Scale(1.0))])


def test_unknown_module_path() -> None:
    with pytest.raises(PathlensError, match="does not exist"):
        tiny_model("gpt2").run(token_batch(), cache=["module:transformer.h.9"])


def test_unknown_architecture_explains_how_to_pass_a_map() -> None:
    class NotATransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

    with pytest.raises(PathlensError, match="ArchMap"):
        Model(NotATransformer())


def test_a_bare_site_string_is_one_cached_site() -> None:
    """run(ids, cache="L0.resid_pre") caches that one site (a string used to be iterated character by character)."""
    model = tiny_model("gpt2")
    ids = token_batch()
    one = model.run(ids, cache="L0.resid_pre")
    listed = model.run(ids, cache=["L0.resid_pre"])
    assert list(one.cache) == list(listed.cache)
    torch.testing.assert_close(one.cache["L0.resid_pre"], listed.cache["L0.resid_pre"], atol=0, rtol=0)
