"""Steering vectors and steered generation: applying a vector leaves the model exactly as it was (also after an
exception or KeyboardInterrupt), a saved and loaded vector steers token for token like the original, scale 0 is no
steering, per-row steering equals a hand-written hook that adds each row's own vector, and the "prompt" /
"generated" policies touch only their own positions under left padding.

Token equality is exact (greedy decoding of the same float computation); vector arithmetic is checked to 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pathlens import Model
from pathlens.steering.generate import generate
from pathlens.steering.vector import SteeringVector
from tests.helpers import assert_untouched, snapshot, tiny_model

NEW = 6


def _prompts(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 7, 4 and 6 (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 1)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def _vector(model: Model, site: str = "L1.resid_pre", seed: int = 5, size: float = 4.0) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    vec = size * torch.randn(model.arch.d_model, generator=gen)
    return SteeringVector({site: vec}, meta={"model": model.name, "site": site, "method": "random", "data": "none"})


def _hf_generate(model: Model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


class _Stop(BaseException):
    pass


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt, _Stop])
def test_applied_leaves_the_model_untouched_even_when_the_block_raised(raised: type[BaseException]) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    ids, mask = _prompts()
    vec = _vector(model)
    with pytest.raises(raised):
        with torch.no_grad(), vec.applied(model, scale=2.0):
            model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
            raise raised()
    assert_untouched(model, before)
    generate(model, ids, vec, attention_mask=mask, max_new_tokens=3)
    generate(model, ids, [vec, None, (vec, -1.0)], attention_mask=mask, max_new_tokens=3, do_sample=True)
    assert_untouched(model, before)


def test_applied_steers_generate_like_the_generate_function() -> None:
    model = tiny_model("gpt2")
    ids, mask = _prompts()
    vec = _vector(model)
    with torch.no_grad(), vec.applied(model, scale=1.5):
        inside = _hf_generate(model, ids, mask)
    plain = _hf_generate(model, ids, mask)
    assert not torch.equal(inside, plain)
    assert torch.equal(generate(model, ids, vec.with_scale(1.5), attention_mask=mask, max_new_tokens=NEW).ids, inside)


def test_saved_and_loaded_vector_steers_token_for_token(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    ids, mask = _prompts()
    vec = SteeringVector(
        {"L0.resid_post": torch.randn(32), "L1.mlp_out": torch.randn(32)},
        positions=[1, -1],
        scale=3.0,
        normalize=True,
        norms={"L0.resid_post": 5.0, "L1.mlp_out": 2.5},
        meta={"model": model.name, "method": "random", "date": "2026-01-01"},
    )
    vec.save(tmp_path / "vec")
    loaded = SteeringVector.load(tmp_path / "vec.json")
    assert loaded.sites == vec.sites and loaded.positions == [1, -1] and loaded.meta == vec.meta
    assert loaded.norms == vec.norms and loaded.normalize and loaded.scale == 3.0
    for site in vec.sites:
        assert torch.equal(loaded.vectors[site], vec.vectors[site])
    original = generate(model, ids, vec, attention_mask=mask, max_new_tokens=NEW)
    again = generate(model, ids, loaded, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(original.ids, again.ids)
    assert not torch.equal(original.ids, generate(model, ids, None, attention_mask=mask, max_new_tokens=NEW).ids)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox_parallel"])
def test_scale_zero_is_no_steering_token_for_token(family: str) -> None:
    model = tiny_model(family)
    ids, mask = _prompts()
    vec = _vector(model, size=50.0)
    plain = generate(model, ids, None, attention_mask=mask, max_new_tokens=NEW, logits=True)
    zero = generate(model, ids, vec.with_scale(0.0), attention_mask=mask, max_new_tokens=NEW, logits=True)
    per_row = generate(model, ids, [(vec, 0.0)] * 3, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(plain.ids, zero.ids) and torch.equal(plain.ids, per_row.ids)
    assert plain.logits is not None and zero.logits is not None
    assert torch.equal(plain.logits, zero.logits)


def _row_hook(vectors: torch.Tensor) -> object:
    """The slow reference: a forward hook on a block that adds row i's own vector (B, d) at every position."""

    def hook(module: nn.Module, args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + vectors[:, None, :].to(hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_row_steering_equals_a_hand_written_per_row_hook(family: str) -> None:
    model = tiny_model(family)
    ids, mask = _prompts()
    a, b = _vector(model, "L0.resid_post", seed=1), _vector(model, "L0.resid_post", seed=2)
    steer = [(a, 1.0), None, (b, -2.0)]
    got = generate(model, ids, steer, attention_mask=mask, max_new_tokens=NEW)
    rows = torch.stack([a.vectors["L0.resid_post"], torch.zeros(model.arch.d_model), -2.0 * b.vectors["L0.resid_post"]])
    block = model.hf.get_submodule(model.arch.blocks)[0]
    handle = block.register_forward_hook(_row_hook(rows))
    try:
        with torch.no_grad():
            reference = _hf_generate(model, ids, mask)
    finally:
        handle.remove()
    assert torch.equal(got.ids, reference)
    alone = generate(model, ids, a, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(got.ids[0], alone.ids[0])


@pytest.mark.parametrize("policy", ["prompt", "generated"])
def test_prompt_and_generated_policies_touch_only_their_positions(policy: str) -> None:
    """At L0.resid_pre (the token embedding on llama) the cached value minus the embedding of the token is the
    vector exactly where the policy applies and zero elsewhere, row by row under left padding."""
    model = tiny_model("llama")
    ids, mask = _prompts()
    vec = _vector(model, "L0.resid_pre")
    with torch.no_grad(), model.session(vec.interventions(positions=policy), cache=["L0.resid_pre"]) as session:
        seq = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = session.cache["L0.resid_pre"]  # (3, 7 + 4 - 1, d)
    embed = model.hf.get_input_embeddings()(seq[:, : cached.shape[1]]).detach()
    added = (cached - embed).norm(dim=-1) > 1e-4  # (3, 10)
    width = ids.shape[1]
    for row in range(3):
        real = torch.cat([mask[row].bool(), torch.ones(cached.shape[1] - width, dtype=torch.bool)])
        is_prompt = torch.arange(cached.shape[1]) < width
        expected = (is_prompt if policy == "prompt" else ~is_prompt) & real
        assert torch.equal(added[row], expected), row


def test_arithmetic_add_scale_negate_project_out() -> None:
    a = SteeringVector({"L0.resid_post": torch.tensor([1.0, 2.0, 0.0])}, meta={"method": "a"})
    b = SteeringVector({"L0.resid_post": torch.tensor([0.0, 1.0, 0.0]), "L1.resid_post": torch.tensor([1.0, 1, 1])})
    total = a + b
    torch.testing.assert_close(total.vectors["L0.resid_post"], torch.tensor([1.0, 3.0, 0.0]))
    assert total.sites == ["L0.resid_post", "L1.resid_post"]
    torch.testing.assert_close((2 * a).vectors["L0.resid_post"], torch.tensor([2.0, 4.0, 0.0]))
    torch.testing.assert_close((-a).vectors["L0.resid_post"], torch.tensor([-1.0, -2.0, 0.0]))
    torch.testing.assert_close((a - b).vectors["L1.resid_post"], torch.tensor([-1.0, -1.0, -1.0]))
    torch.testing.assert_close(a.project_out(b).vectors["L0.resid_post"], torch.tensor([1.0, 0.0, 0.0]))
    assert (2 * a).meta["method"] == "a" and (2 * a).meta["derived"] == "times 2"
