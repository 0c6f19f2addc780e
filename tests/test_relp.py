"""RelP: LRP rules change the backward pass only, conserve relevance, and RelP shares patching's layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pathlens
from pathlens.attribution import atp, relp
from pathlens.attribution.lrp import HalfRule, identity_hook, rule_objects
from pathlens.sites import Site
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model

RULE_FAMILIES = ("gpt2", "llama", "neox_parallel", "gemma3", "qwen3", "olmo_generic", "attn_only")


@pytest.mark.parametrize("family", RULE_FAMILIES)
def test_rules_leave_forward_values_bit_identical_and_the_model_untouched(family: str) -> None:
    model = tiny_model(family, weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    plain = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=["L1.resid_pre"])
    ruled = model.run(
        task.clean_ids,
        attention_mask=task.attention_mask,
        cache=["L1.resid_pre"],
        grad=True,
        rules=rule_objects(("LN", "identity", "half")),
    )
    assert torch.equal(plain.logits, ruled.logits.detach())
    assert torch.equal(plain.cache["L1.resid_pre"], ruled.cache["L1.resid_pre"].detach())
    if model.arch.qkv == "interface":  # AH computes eager attention for the gradient, keeps the model's values
        ah = model.run(task.clean_ids, attention_mask=task.attention_mask, grad=True, rules=rule_objects(("AH",)))
        assert torch.equal(ah.logits.detach(), plain.logits)
    assert_untouched(model, before)


def test_identity_rule_conserves_relevance_on_a_small_mlp() -> None:
    """y = W2 act(W1 x) without biases: with the identity rule, Σ_i x_i ∂̃y/∂x_i = y exactly (act(h)/h · h = act(h))."""
    torch.manual_seed(0)
    for act in (nn.GELU(), nn.SiLU(), nn.Tanh()):
        net = nn.Sequential(nn.Linear(6, 16, bias=False), act, nn.Linear(16, 3, bias=False)).double()
        handle = act.register_forward_hook(identity_hook)
        try:
            x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
            y = net(x)
            (grad,) = torch.autograd.grad(y[:, 1].sum(), x)
        finally:
            handle.remove()
        torch.testing.assert_close((x * grad).sum(dim=1), y[:, 1].detach(), atol=1e-8, rtol=1e-5)
        plain = net(x)
        assert torch.equal(plain, y)


def test_all_rules_conserve_relevance_through_a_tiny_llama() -> None:
    """Llama has no biases: under LN, identity, half and AH the network is locally homogeneous of degree one in
    its input embeddings, so their relevance (embedding × rule gradient) sums to the scored logit."""
    model = tiny_model("llama", weight_scale=1.5)
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))

    def relevance(rules: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        run = model.run(ids, cache=["embed"], grad=True, rules=rule_objects(rules))
        logit = run.logits[:, -1, 5]
        (grad,) = torch.autograd.grad(logit.sum(), run.cache["embed"])
        return (run.cache["embed"].detach() * grad).sum(dim=(1, 2)), logit.detach()

    total, logit = relevance(("LN", "identity", "half", "AH"))
    torch.testing.assert_close(total, logit, atol=1e-4, rtol=1e-4)
    for missing in ("LN", "identity", "half", "AH"):  # each rule is needed: without it relevance is not conserved
        partial, _ = relevance(tuple(r for r in ("LN", "identity", "half", "AH") if r != missing))
        assert (partial - logit).abs().max() > 1e-3, missing


def test_half_rule_applies_to_gated_mlps_only() -> None:
    model = tiny_model("llama")
    hooks = HalfRule().hooks(model)
    down = model.hf.model.layers[0].mlp.down_proj
    assert any(module is down and kind == "pre" for module, kind, _ in hooks)
    assert not HalfRule().hooks(tiny_model("gpt2"))


def test_relp_has_patch_layout_tracks_exact_patching_and_equals_atp_without_rules() -> None:
    model = tiny_model("gpt2", weight_scale=2.0)
    task = padded_task()
    before = snapshot(model)
    for sites, positions in (("heads", "all"), ("mlp_out", "each"), ("resid_pre", "each")):
        exact = pathlens.patch(model, task, sites=sites, positions=positions, progress=False, direction="denoise")
        estimate = relp(model, task, sites=sites, positions=positions, direction="denoise")
        assert estimate.dims == exact.dims and estimate.coords == exact.coords
        assert estimate.corr(exact) > 0.5, (sites, estimate.corr(exact))
        plain = relp(model, task, sites=sites, positions=positions, rules=(), direction="denoise")
        torch.testing.assert_close(
            plain.values, atp(model, task, sites=sites, positions=positions, direction="denoise").values
        )
    assert_untouched(model, before)


def test_rule_errors_say_what_to_do() -> None:
    model = tiny_model("gpt2")
    task = padded_task()
    with pytest.raises(pathlens.PathlensError, match="unknown LRP rule"):
        relp(model, task, rules=("LN", "epsilon"), direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="AH rule"):
        relp(tiny_model("gpt_neo"), task, rules=("AH",), direction="denoise")
    before = snapshot(model)
    with pytest.raises(pathlens.PathlensError):
        model.run(task.clean_ids, grad=True, rules=rule_objects(("LN",)), cache=[Site("resid_pre", 7)])
    assert_untouched(model, before)
