"""The hook session that reads and writes sites, on tiny models of every family: decomposition identities,
exact writes, gradients through cached sites, and the model left exactly as it was after every call (also one
that raised or was interrupted).

Tolerances: fp32 identities that reorder a sum (heads vs the fused projection) are checked to 1e-5;
a Replace with the value the site already has must change nothing bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from pathlens import Intervention, Model, PathlensError, Replace, Scale, Site
from pathlens.arch.base import get_module, output_weight_per_head
from pathlens.interventions import Op, Selection
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch


def all_sites(model: Model, layer: int) -> list[str]:
    kinds = ["resid_pre", "attn_out", "resid_post", "head", "z", "q", "k", "v", "pattern"]
    if model.arch.mlp is not None:
        kinds += ["mlp_in", "mlp_post", "mlp_out"]
    if not model.arch.parallel:
        kinds.append("resid_mid")
    return [f"L{layer}.{k}" for k in kinds]


def test_reading_sites_does_not_change_logits(model: Model) -> None:
    ids = token_batch()
    plain = model.run(ids).logits
    sites = [s for s in all_sites(model, 1) if not s.endswith("pattern")] + ["embed", "logits"]
    run = model.run(ids, cache=sites)
    assert torch.equal(run.logits, plain)
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    unembedded = run.cache["logits"]
    assert torch.equal(torch.tanh(unembedded / cap) * cap if cap else unembedded, plain)


def test_heads_sum_to_attention_output(model: Model) -> None:
    ids = token_batch()
    a = model.arch
    o_proj_path = f"{a.blocks}.1.{a.o_proj}"
    run = model.run(ids, cache=["L1.head", "L1.attn_out", f"module:{o_proj_path}"])
    o_proj = get_module(model.hf, o_proj_path)
    heads_total = run.cache["L1.head"].sum(dim=2)
    if o_proj.bias is not None:
        heads_total = heads_total + o_proj.bias  # type: ignore[operator]
    assert torch.allclose(heads_total, run.cache[f"module:{o_proj_path}"], atol=1e-5)
    if a.attn_out == a.attn:
        assert torch.allclose(heads_total, run.cache["L1.attn_out"], atol=1e-5)


def test_residual_stream_decomposes(model: Model) -> None:
    ids = token_batch()
    a = model.arch
    sites = ["L1.resid_pre", "L1.attn_out", "L1.resid_post"] + (["L1.mlp_out"] if a.mlp else [])
    if not a.parallel:
        sites.append("L1.resid_mid")
    c = model.run(ids, cache=sites).cache
    mlp = c["L1.mlp_out"] if a.mlp else 0.0
    assert torch.allclose(c["L1.resid_pre"] + c["L1.attn_out"] + mlp, c["L1.resid_post"], atol=1e-5)
    if not a.parallel:
        assert torch.allclose(c["L1.resid_pre"] + c["L1.attn_out"], c["L1.resid_mid"], atol=1e-6)
    c0 = model.run(ids, cache=["L0.resid_post", "L1.resid_pre"]).cache
    assert torch.equal(c0["L0.resid_post"], c0["L1.resid_pre"])


@pytest.mark.parametrize("layer", [0, 1])
def test_replace_with_own_value_changes_nothing(model: Model, layer: int) -> None:
    ids = token_batch()
    for site in all_sites(model, layer):
        if site.endswith("pattern") and model.arch.qkv != "interface":
            continue
        clean = model.run(ids, cache=[site])
        patched = model.run(ids, cache=[site], interventions=[Intervention(site, Replace(clean.cache[site]))])
        if site.endswith("resid_mid"):
            torch.testing.assert_close(patched.logits, clean.logits, atol=1e-6, rtol=0)
        else:
            assert torch.equal(patched.logits, clean.logits), site


def test_indexed_sites_select_from_family(model: Model) -> None:
    ids = token_batch()
    c = model.run(ids, cache=["L0.head", "L0.H2", "L0.z", "L0.H1.z", "L0.q", "L0.H3.q", "L0.k", "L0.G0.k"]).cache
    assert torch.equal(c["L0.H2"], c["L0.head"][:, :, 2])
    assert torch.equal(c["L0.H1.z"], c["L0.z"][:, :, 1])
    assert torch.equal(c["L0.H3.q"], c["L0.q"][:, :, 3])
    assert torch.equal(c["L0.G0.k"], c["L0.k"][:, :, 0])
    assert c["L0.k"].shape[2] == model.arch.n_kv_heads


def test_pattern_rows_sum_to_one_and_are_causal(model: Model) -> None:
    ids = token_batch()
    pattern = model.run(ids, cache=["L0.pattern"]).cache["L0.pattern"]
    b, p, h, k = pattern.shape
    assert (b, p, h, k) == (3, 9, model.arch.n_heads, 9)
    assert torch.allclose(pattern.sum(-1), torch.ones(b, p, h), atol=1e-5)
    upper = torch.ones(p, k, dtype=torch.bool).triu(1)
    assert float(pattern.permute(0, 2, 1, 3)[..., upper].abs().max()) == 0.0


def test_patching_a_whole_layer_reproduces_the_corrupted_run(model: Model) -> None:
    clean, corrupt = token_batch(seed=1), token_batch(seed=2)
    a = model.arch
    sites = ["L1.resid_pre", "L1.head"] + (["L1.mlp_out"] if a.mlp else [])
    corrupt_run = model.run(corrupt, cache=sites)
    if a.attn_out == a.attn:
        ivs = [Intervention(s, Replace(corrupt_run.cache[s])) for s in sites]
        patched = model.run(clean, interventions=ivs)
        torch.testing.assert_close(patched.logits, corrupt_run.logits, atol=1e-5, rtol=0)
    resid = model.run(clean, interventions=[Intervention("L1.resid_pre", Replace(corrupt_run.cache["L1.resid_pre"]))])
    assert torch.equal(resid.logits, corrupt_run.logits)


def test_pattern_write_recomputes_head_output() -> None:
    model = tiny_model("llama")
    ids = token_batch()
    base = model.run(ids, cache=["L0.pattern", "L0.z"])
    uniform = torch.tril(torch.ones(9, 9))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    source = uniform[None, :, None, :].expand_as(base.cache["L0.pattern"]).contiguous()
    run = model.run(
        ids, cache=["L0.pattern", "L0.z", "L0.v"], interventions=[Intervention("L0.pattern", Replace(source))]
    )
    assert torch.equal(run.cache["L0.pattern"], source)
    v = run.cache["L0.v"].repeat_interleave(2, dim=2)
    expected_z = torch.einsum("bqhk,bkhd->bqhd", source, v)
    torch.testing.assert_close(run.cache["L0.z"], expected_z, atol=1e-6, rtol=0)


def test_gradients_flow_to_cached_sites(family: str) -> None:
    model = tiny_model(family)
    ids = token_batch()
    plain = model.run(ids)
    run = model.run(
        ids,
        cache=["L0.head", "L0.attn_out", "L0.resid_pre"] + ([] if model.arch.parallel else ["L0.resid_mid"]),
        grad=True,
    )
    assert torch.equal(run.logits.detach(), plain.logits)
    metric = run.logits[:, -1, 3].sum()
    names = ["L0.head", "L0.attn_out"] + ([] if model.arch.parallel else ["L0.resid_mid"])
    grads = torch.autograd.grad(metric, [run.cache[s] for s in names])
    if model.arch.attn_out == model.arch.attn:
        torch.testing.assert_close(grads[0], grads[1][:, :, None].expand_as(grads[0]), atol=1e-6, rtol=1e-5)
    if not model.arch.parallel:
        torch.testing.assert_close(grads[2], grads[1], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().sum() > 0
    z_run = model.run(ids, cache=["L0.z", "L0.head"], grad=True)
    g_z, g_head = torch.autograd.grad(z_run.logits[:, -1, 3].sum(), [z_run.cache["L0.z"], z_run.cache["L0.head"]])
    w_o = output_weight_per_head(
        get_module(model.hf, f"{model.arch.blocks}.0.{model.arch.o_proj}"), 4, model.arch.d_head
    )
    torch.testing.assert_close(g_z, torch.einsum("bphe,hde->bphd", g_head, w_o), atol=1e-6, rtol=1e-5)


def test_cache_device_and_dtype() -> None:
    model = tiny_model("gpt2")
    run = model.run(token_batch(), cache=["L0.resid_pre"], cache_dtype=torch.float64)
    assert run.cache["L0.resid_pre"].dtype == torch.float64
    assert run.cache[Site("resid_pre", 0)].shape == (3, 9, 32)


class Boom(Op):
    """An op that raises mid-forward (after some hooks already ran)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def apply(self, x: torch.Tensor, full: torch.Tensor, sel: Selection) -> torch.Tensor:
        raise self.exc


ALL_READS = [
    "embed",
    "L0.resid_pre",
    "L0.q",
    "L0.k",
    "L0.pattern",
    "L0.head",
    "L0.z",
    "L1.attn_out",
    "L1.resid_post",
    "logits",
]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_model_untouched_after_a_call_that_raises(family: str, exc: BaseException) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(type(exc)):
        model.run(token_batch(), cache=ALL_READS, interventions=[Intervention("L1.H0", Boom(exc))])
    assert_untouched(model, before)
    attn_write = "L0.pattern" if model.arch.qkv == "interface" else "L0.q"
    with pytest.raises(type(exc)):
        model.run(token_batch(), cache=ALL_READS, interventions=[Intervention(attn_write, Boom(exc))])
    assert_untouched(model, before)


def test_model_untouched_after_successful_calls(family: str) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    run = model.run(token_batch(), cache=ALL_READS, grad=True)
    run.logits[:, -1].sum().backward()
    model.run(token_batch(), interventions=[Intervention("L0.H1", Scale(2.0)), Intervention("L1.q", Scale(0.5))])
    model.hf.zero_grad(set_to_none=True)
    assert_untouched(model, before)


def test_model_untouched_after_bad_input() -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(PathlensError):
        model.run(
            token_batch(), cache=["L0.q"], interventions=[Intervention("L0.resid_pre", Scale(0.0), positions=[99])]
        )
    assert_untouched(model, before)
