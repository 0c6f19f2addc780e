"""Features as sites (Model.splice, pathlens.features.splice): outputs unchanged, latents patched and attributed
like any site and checked against hand computations on the host site, transcoders, bad input, and the model left
as it was."""

from __future__ import annotations

import pytest
import torch

import pathlens
from pathlens.errors import PathlensError
from pathlens.features.circuit import node_circuit
from pathlens.features.evaluate import evaluate
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.splice import feature_direction, latent_sites, splice
from pathlens.interventions import Ablate, Add, Intervention, Replace
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model, token_batch

D = 32  # d_model of the tiny models; d_mlp is 64


def _sae(kind: str = "relu", width: int = 24, d_in: int = D, d_out: int | None = None, seed: int = 0) -> Dictionary:
    d = Dictionary(DictionaryConfig(kind, d_in, width, d_out=d_out, k=4), seed=seed)  # type: ignore[arg-type]
    with torch.no_grad():  # a non-trivial dictionary: biases and scales away from their defaults
        d.b_enc.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed))
        d.b_dec.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        d.s_in.fill_(0.7)
        d.s_out.fill_(0.7 if d_out is None else 1.3)
    return d


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("site", ["L1.resid_pre", "L0.mlp_out", "L1.attn_out", "L0.resid_mid"])
def test_splice_leaves_logits_unchanged(family: str, site: str) -> None:
    """Reading latents: bit-identical logits; writing every latent and the error with their own values: ≤ 1e-5."""
    model = tiny_model(family, weight_scale=3.0)
    ids = token_batch()
    base = model.run(ids).logits
    with model.splice(_sae(), site) as sp:
        read = model.run(ids, cache=[sp.latents, sp.error])
        assert torch.equal(read.logits, base)
        written = model.run(
            ids,
            interventions=[
                Intervention(sp.latents, Replace(read.cache[sp.latents])),
                Intervention(sp.error, Replace(read.cache[sp.error])),
            ],
        )
        assert (written.logits - base).abs().max().item() <= 1e-5
        with torch.enable_grad():
            graded = model.run(ids, cache=[sp.latents, sp.error], grad=True)
        assert torch.equal(graded.logits.detach(), base)


def test_latents_and_error_decompose_the_site() -> None:
    """decode(latents) + error is the site's value, and the latents are the dictionary's encoding of it."""
    model = tiny_model("llama", weight_scale=3.0)
    ids = token_batch()
    sae = _sae()
    x = model.run(ids, cache=["L1.resid_post"]).cache["L1.resid_post"]
    with model.splice(sae, "L1.resid_post") as sp:
        cache = model.run(ids, cache=[sp.latents, sp.error, "L1.sae.F5"]).cache
    assert torch.allclose(cache[sp.latents], sae.encode(x), atol=0, rtol=0)
    assert torch.allclose(sae.decode(cache[sp.latents]) + cache[sp.error], x, atol=1e-6)
    assert torch.equal(cache["L1.sae.F5"], cache[sp.latents][..., 5])


def test_patching_a_latent_equals_patching_its_share_of_the_site_by_hand() -> None:
    """Latent i patched to its corrupted value = Add((f_i' − f_i) · W_dec[i] / s_out) at the site (the latents
    downstream of the site are not inputs of the site). Checked on logits and on pathlens.patch's scores."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    sae = _sae()
    site, i = "L1.resid_pre", 7
    with model.splice(sae, site) as sp:
        clean = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=[sp.latents])
        corrupt = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=[sp.latents])
        patched = model.run(
            task.clean_ids,
            attention_mask=task.attention_mask,
            interventions=[Intervention(f"L1.sae.F{i}", Replace(corrupt.cache[sp.latents][..., i]))],
        )
        scores = pathlens.patch(model, task, sites=[f"L1.sae.F{i}"], progress=False)
    delta = corrupt.cache[sp.latents][..., i] - clean.cache[sp.latents][..., i]  # (N, P)
    share = delta[..., None] * feature_direction(sae, i)  # (N, P, d)
    by_hand = model.run(
        task.clean_ids, attention_mask=task.attention_mask, interventions=[Intervention(site, Add(share))]
    )
    assert (patched.logits - by_hand.logits).abs().max().item() <= 1e-5
    expected = task.metric(by_hand.logits, task).mean()
    assert scores.values[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_atp_over_latents_plus_error_equals_atp_over_the_site() -> None:
    """g·Δx = Σ_i (W_dec g)_i Δf_i + g·Δerror exactly (the decoder is linear): AtP summed over every latent and
    the error term equals AtP of the site itself, for AtP and RelP alike."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with model.splice(_sae(width=16), "L1.resid_pre"):
        sites = [*latent_sites(model, "L1.sae"), "L1.sae.err", "L1.resid_pre"]
        for method in (pathlens.atp, pathlens.relp):
            scores = method(model, task, sites=sites)
            effects = scores.values.double() - scores.meta["base_metric"]
            assert effects[:17].sum().item() == pytest.approx(effects[17].item(), abs=1e-5)


def test_atp_on_latents_equals_patching_where_the_metric_is_linear_in_them() -> None:
    """Without the final norm, the last layer's MLP output reaches the logits linearly, and so do the latents of
    a dictionary spliced there: AtP equals patching, latent by latent and for the error term (1e-5)."""
    model = tiny_model("llama", weight_scale=4.0)
    parent, _, name = model.arch.final_norm.rpartition(".")
    setattr(model.hf.get_submodule(parent), name, torch.nn.Identity())
    task = padded_task()
    last = model.n_layers - 1
    with model.splice(_sae(width=12), f"L{last}.mlp_out", name="feat"):
        sites = [*latent_sites(model, f"L{last}.feat"), f"L{last}.feat.err"]
        for positions in ("all", "each"):
            estimate = pathlens.atp(model, task, sites=sites, positions=positions)
            exact = pathlens.patch(model, task, sites=sites, positions=positions, progress=False)
            torch.testing.assert_close(estimate.values, exact.values, atol=1e-5, rtol=0)


def test_transcoder_splice_rebuilds_the_mlp_output() -> None:
    """A transcoder reads L0.mlp_in and rebuilds L0.mlp_out: logits unchanged; patching every latent and the
    error with the corrupted run's values equals patching L0.mlp_out itself."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    tc = _sae(d_out=D)
    base = model.run(task.clean_ids, attention_mask=task.attention_mask).logits
    want = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=["L0.mlp_out"]).cache["L0.mlp_out"]
    with model.splice(tc, "L0.mlp_in", target="L0.mlp_out") as sp:
        assert sp.latents == pathlens.parse_site("L0.tc")
        read = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=[sp.latents, sp.error])
        assert torch.equal(read.logits, base)
        source = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=[sp.latents, sp.error])
        both = model.run(
            task.clean_ids,
            attention_mask=task.attention_mask,
            interventions=[
                Intervention(sp.latents, Replace(source.cache[sp.latents])),
                Intervention(sp.error, Replace(source.cache[sp.error])),
            ],
        )
    direct = model.run(
        task.clean_ids, attention_mask=task.attention_mask, interventions=[Intervention("L0.mlp_out", Replace(want))]
    )
    assert (both.logits - direct.logits).abs().max().item() <= 1e-5


def test_steering_a_latent_adds_its_decoder_row() -> None:
    model = tiny_model("llama", weight_scale=3.0)
    ids = token_batch()
    sae = _sae()
    with splice(model, sae, "L1.resid_post"):
        steered = model.run(ids, interventions=[Intervention("L1.sae.F3", Add(torch.tensor(2.5)))]).logits
    by_hand = model.run(ids, interventions=[Intervention("L1.resid_post", Add(feature_direction(sae, 3), 2.5))])
    assert (steered - by_hand.logits).abs().max().item() <= 1e-5


def test_mixed_node_patching_heads_mlps_and_features() -> None:
    """One patch sweep over heads, an MLP output and latents: each cell equals its own single-site patch."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with model.splice(_sae(), "L1.resid_pre"):
        sites = ["L0.H1", "L0.mlp_out", "L1.sae.F2", "L1.sae.F9", "L1.sae.err"]
        swept = pathlens.patch(model, task, sites=sites, progress=False)
        for j, site in enumerate(sites):
            alone = pathlens.patch(model, task, sites=[site], progress=False, cone=False)
            assert swept.values[j].item() == pytest.approx(alone.values[0].item(), abs=1e-5)


def test_evaluation_card_of_an_exact_dictionary() -> None:
    """ReLU with W_enc = [I, −I], W_dec = [I; −I] reconstructs exactly (relu(x) − relu(−x) = x): FVE 1, CE
    recovered 1, KL 0; L0 and the density are counted by hand."""
    model = tiny_model("llama", weight_scale=3.0)
    ids = token_batch(n=4, p=8)
    exact = Dictionary(DictionaryConfig("relu", D, 2 * D))
    eye = torch.eye(D)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        exact.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    card = evaluate(model, exact, ids, site="L1.resid_pre", chunk=3)
    assert card.fve == pytest.approx(1.0, abs=1e-6)
    assert card.ce_recovered == pytest.approx(1.0, abs=1e-5)
    assert card.kl == pytest.approx(0.0, abs=1e-6)
    x = model.run(ids, cache=["L1.resid_pre"]).cache["L1.resid_pre"][:, 1:]
    assert card.tokens == 4 * 7
    assert card.l0 == pytest.approx(float((x != 0).sum()) / card.tokens)
    assert card.dead_fraction == 0.0 and card.dense_fraction == 1.0
    zero = model.run(ids, interventions=[Intervention("L1.resid_pre", Ablate("zero"))]).logits
    logp = torch.log_softmax(zero[:, :-1], -1).gather(-1, ids[:, 1:, None])
    assert card.ce_zero == pytest.approx(-logp.mean().item(), rel=1e-5)


def test_bad_inputs_name_the_site_and_the_fix() -> None:
    model = tiny_model("llama")
    with pytest.raises(PathlensError, match="d_in is 64 but site L1.resid_pre has width 32"):
        with model.splice(_sae(d_in=64), "L1.resid_pre"):
            pass
    with pytest.raises(PathlensError, match="d_in is 32 but site L0.mlp_post has width 64"):
        with model.splice(_sae(d_in=D), "L0.mlp_post"):
            pass
    with pytest.raises(PathlensError, match="no dictionary is spliced as L1.sae"):
        model.run(token_batch(), cache=["L1.sae"])
    with pytest.raises(PathlensError, match="cannot splice a dictionary into L1.head"):
        with model.splice(_sae(), "L1.head"):
            pass
    with model.splice(_sae(), "L1.resid_pre"):
        with pytest.raises(PathlensError, match="latent of site L1.sae.F24 is 24, out of range"):
            model.run(token_batch(), cache=["L1.sae.F24"])
        with pytest.raises(PathlensError, match="already has a dictionary"):
            with model.splice(_sae(), "L1.resid_pre", name="other"):
                pass
    with pytest.raises(PathlensError, match="splice: this dictionary does not record its site"):
        with splice(model, _sae()):
            pass
    assert model.splices == []


def test_model_untouched_after_splice_also_after_an_exception() -> None:
    model = tiny_model("llama", weight_scale=3.0)
    before = snapshot(model)
    ids = token_batch()
    base = model.run(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with model.splice(_sae(), "L1.resid_pre") as sp:
            with model.session(interventions=[Intervention(sp.latents, Ablate("zero"))]):
                model.hf(ids)
                raise RuntimeError("boom")
    assert model.splices == []
    assert_untouched(model, before)
    assert torch.equal(model.run(ids).logits, base)


def test_node_circuit_mixes_heads_mlps_and_latents_and_its_faithfulness_is_exact() -> None:
    """Nodes: the latents and error of a dictionary on L1.resid_pre plus layer 1's heads and MLP (a cut of the
    model: they do not overlap). The full node set has faithfulness 1; the chosen circuit's figure equals a
    hand-made run patching every other node to its corrupted value."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with model.splice(_sae(width=12), "L1.resid_pre"):
        nodes = [*latent_sites(model, "L1.sae"), "L1.sae.err", *[f"L1.H{h}" for h in range(4)], "L1.mlp_out"]
        circuit = node_circuit(model, task, nodes, target=0.8)
        assert circuit.curve[-1][0] <= len(nodes)
        full = node_circuit(model, task, nodes, sizes=[len(nodes)])
        assert full.faithfulness == pytest.approx(1.0, abs=1e-6)
        corrupt = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=nodes).cache
        outside = [n for n in nodes if n not in circuit.nodes]
        logits = model.run(
            task.clean_ids,
            attention_mask=task.attention_mask,
            interventions=[Intervention(n, Replace(corrupt[n])) for n in outside],
        ).logits
    m = task.metric(logits, task).mean().item()
    meta = circuit.meta
    assert (m - meta["empty"]) / (meta["full"] - meta["empty"]) == pytest.approx(circuit.faithfulness, abs=1e-5)
    assert set(circuit.effects) == set(nodes) and "L1.sae.err" in str(full)


def test_other_estimators_run_on_latents_and_edge_methods_see_a_bottleneck() -> None:
    """IG with one step is AtP on latents; AtP* with GradDrop runs on them; edge attribution makes a residual
    stream splice a bottleneck of the graph: its latents and error are nodes and the input reaches the logits only
    through them (tests/test_feature_edges.py checks the edge graph with spliced dictionaries)."""
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    with model.splice(_sae(), "L1.resid_pre"):
        sites = [*latent_sites(model, "L1.sae", [0, 3, 7]), "L1.sae.err"]
        ig = pathlens.integrated_gradients(model, task, sites=sites, steps=1)
        first = pathlens.atp(model, task, sites=sites)
        torch.testing.assert_close(ig.values, first.values, atol=1e-5, rtol=0)
        star = pathlens.atp_star(model, task, sites=sites, grad_drop=True)
        assert star.values.shape == first.values.shape and bool(torch.isfinite(star.values).all())
        inside = pathlens.edge_attribution(model, task)
    assert "L1.sae.err" in inside.senders and bool(torch.isnan(inside.scores[0, -1]))


def test_generation_through_a_splice_and_steering_a_latent_while_generating() -> None:
    """Under hf.generate (key/value cache, one token per forward): a spliced dictionary that is only read leaves
    the tokens unchanged and its cached latents cover the whole sequence; adding to a latent equals adding its
    decoder row to the site."""
    model = tiny_model("llama", weight_scale=3.0)
    ids = token_batch(n=2, p=5)
    sae = _sae()

    def generate() -> torch.Tensor:
        return model.hf.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)

    plain = generate()
    with model.splice(sae, "L1.resid_post") as sp, model.session(cache=[sp.latents]) as session:
        read = generate()
    assert torch.equal(read, plain)
    assert session.cache[sp.latents].shape == (2, 5 + 3, 24)  # the last new token is never run through the model
    with model.splice(sae, "L1.resid_post"), model.session([Intervention("L1.sae.F2", Add(torch.tensor(3.0)))]):
        steered = generate()
    with model.session([Intervention("L1.resid_post", Add(feature_direction(sae, 2), 3.0))]):
        by_hand = generate()
    assert torch.equal(steered, by_hand)
