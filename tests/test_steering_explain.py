"""Why a vector works (pathlens.steering.explain) against slow references.

References: exact activation patching of each head's / MLP's steered output into the unsteered run (a loop of
ordinary runs); on a model whose metric is linear in the site (final norm removed, last layer) the first-order
scores equal it to 1e-5; the vector's own edges sum to its node estimate Δ · ∂m/∂site computed by hand (1e-5),
and its edge into the logits equals adding it to the final residual stream alone on the linear model (1e-5).
"""

from __future__ import annotations

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.interventions import Add, Intervention, Replace
from pathlens.sites import Site
from pathlens.steering import SteeringVector
from pathlens.steering.explain import TokenSetDifference, concept_task, explain
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch
from tests.test_attribution import linear_tail_model

POS, NEG = [3, 5, 7], [11, 13]


def _vector(model, site: str = "L0.resid_post", size: float = 1.0, seed: int = 3) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({site: size * torch.randn(model.arch.d_model, generator=g)})


def _metric(model, task, interventions=()) -> float:
    with torch.no_grad():
        logits = model.run(task.clean_ids, attention_mask=task.attention_mask, interventions=list(interventions))
    return float(task.metric(logits.logits, task).mean())


def _exact(model, task, vec: SteeringVector, kind: str) -> torch.Tensor:
    """Slow reference: the unsteered run's metric with one head's (kind="head") or one MLP's steered output
    patched in, one run per component: (layers, heads) or (layers,)."""
    steer = vec.interventions()
    families = [Site(kind, layer) for layer in range(model.n_layers)]
    with torch.no_grad():
        steered = model.run(task.clean_ids, attention_mask=task.attention_mask, interventions=steer, cache=families)
    out = []
    for layer in range(model.n_layers):
        value = steered.cache[Site(kind, layer)]
        if kind == "head":
            row = [
                _metric(model, task, [Intervention(Site("head", layer, index=h), Replace(value[:, :, h]))])
                for h in range(model.arch.n_heads)
            ]
            out.append(row)
        else:
            out.append(_metric(model, task, [Intervention(Site(kind, layer), Replace(value))]))
    return torch.tensor(out)


@pytest.mark.parametrize("family", ["llama", "gemma3", "neox_parallel"])
def test_scores_track_exact_patching_of_steered_activations_and_model_untouched(family: str) -> None:
    model = tiny_model(family, weight_scale=2.0)
    ids = token_batch(n=4, p=7)
    vec = _vector(model, size=0.3)
    before = snapshot(model)
    found = explain(model, vec, ids, tokens=(POS, NEG), k=3)
    assert_untouched(model, before)
    task = concept_task(model, ids, POS, NEG)
    assert found.unsteered_metric == pytest.approx(_metric(model, task), abs=1e-6)
    assert found.steered_metric == pytest.approx(_metric(model, task, vec.interventions()), abs=1e-6)
    exact_heads = _exact(model, task, vec, "head")
    exact_mlps = _exact(model, task, vec, "mlp_out")
    # layer 0 reads the stream before the vector: its heads are unchanged, exactly and in the estimate
    torch.testing.assert_close(exact_heads[0], torch.full_like(exact_heads[0], found.unsteered_metric))
    torch.testing.assert_close(found.heads.values[0].double(), exact_heads[0].double(), atol=1e-6, rtol=0)
    estimate = torch.cat([found.heads.values.flatten(), found.mlps.values.flatten()]).double()
    exact = torch.cat([exact_heads.flatten(), exact_mlps.flatten()]).double()
    corr = torch.corrcoef(torch.stack([estimate - found.unsteered_metric, exact - found.unsteered_metric]))[0, 1]
    assert corr > 0.95, corr


@pytest.mark.parametrize(("family", "kind"), [("attn_only", "head"), ("gpt2", "mlp_out"), ("llama", "mlp_out")])
def test_scores_equal_exact_patching_where_the_metric_is_linear_in_the_site(family: str, kind: str) -> None:
    """Without the final norm, the last layer's MLP (and, attention-only, its heads) reach the logits linearly:
    the first-order score is the exact patching effect, to 1e-5."""
    model = linear_tail_model(family)
    ids = token_batch(n=3, p=6)
    vec = _vector(model, size=2.0)
    found = explain(model, vec, ids, tokens=(POS, NEG), k=2)
    task = concept_task(model, ids, POS, NEG)
    last = model.n_layers - 1
    exact = _exact(model, task, vec, kind)[last]
    estimate = (found.heads if kind == "head" else found.mlps).values[last]
    torch.testing.assert_close(estimate.double(), exact.double(), atol=1e-5, rtol=0)


def test_the_vectors_edges_sum_to_its_node_estimate_and_reach_only_later_readers() -> None:
    model = tiny_model("gpt2", weight_scale=2.0)
    ids = token_batch(n=3, p=6)
    vec = _vector(model, size=0.5)
    found = explain(model, vec, ids, tokens=(POS, NEG), k=4)
    graph = found.graph
    sender = "intervention:L0.resid_post"
    assert graph.senders[-1] == sender
    row = graph.scores[graph.senders.index(sender)]
    layer0 = [j for j, r in enumerate(graph.receivers) if r.startswith("L0.")]
    later = [j for j, r in enumerate(graph.receivers) if not r.startswith("L0.")]
    assert bool(torch.isnan(row[layer0]).all()) and not bool(torch.isnan(row[later]).any())
    # by hand: Δ · ∂m/∂resid_post[0] at the unsteered run, summed over positions, batch mean
    task = concept_task(model, ids, POS, NEG)
    run = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=["L0.resid_post"], grad=True)
    (grad,) = torch.autograd.grad(task.metric(run.logits, task).sum(), run.cache["L0.resid_post"])
    by_hand = float((grad * vec.effective("L0.resid_post")).sum() / task.n)
    assert float(row[later].double().sum()) == pytest.approx(by_hand, abs=1e-5)
    # every head's outgoing edges sum to its node estimate
    heads = graph.node_scores()
    for layer in range(model.n_layers):
        for h in range(model.arch.n_heads):
            node = float(found.heads.values[layer, h]) - found.unsteered_metric
            assert heads[f"L{layer}.H{h}"] == pytest.approx(node, abs=1e-5)
    assert found.paths and all(p.nodes[0] == sender and p.nodes[-1] == "logits" for p in found.paths)
    summary = found.summary(k=3)
    assert summary["paths"][0]["nodes"][0] == sender and len(summary["top_heads"]) == 3


def test_the_edge_into_the_logits_is_exact_on_a_linear_tail() -> None:
    model = linear_tail_model("gpt2")
    ids = token_batch(n=3, p=6)
    vec = _vector(model, size=2.0)
    found = explain(model, vec, ids, tokens=(POS, NEG), k=2)
    task = concept_task(model, ids, POS, NEG)
    last = f"L{model.n_layers - 1}.resid_post"
    only_logits = [Intervention(Site("resid_post", model.n_layers - 1), Add(vec.effective("L0.resid_post")))]
    exact = _metric(model, task, only_logits) - _metric(model, task)
    score = float(found.graph.scores[-1, found.graph.receivers.index("logits")])
    assert score == pytest.approx(exact, abs=1e-5), last


def test_concept_tokens_drop_shared_ids_and_name_an_unusable_vocabulary() -> None:
    from pathlens.steering.explain import concept_tokens
    from tests.test_steering_finders import tiny_with_words

    words = tiny_with_words()
    positive, negative = concept_tokens(words, "sentiment")
    unk = words.tokenizer.unk_token_id
    assert unk not in positive and unk not in negative and positive and negative
    with pytest.raises(PathlensError, match="share every token"):
        concept_tokens(_OneToken(), "sentiment")


class _OneToken:
    """A stand-in model whose tokenizer maps every word to token 7."""

    name = "one-token"
    tokenizer = staticmethod(lambda text, add_special_tokens=False: {"input_ids": [7]})


def test_explain_bad_inputs_are_named() -> None:
    model = tiny_model("gpt2")
    vec = _vector(model)
    ids = token_batch(n=2, p=5)
    with pytest.raises(PathlensError, match="formality"):
        explain(model, vec, ids, concept="formality")
    with pytest.raises(PathlensError, match="k must be"):
        explain(model, vec, ids, tokens=(POS, NEG), k=0)
    with pytest.raises(PathlensError, match="both sets"):
        TokenSetDifference([1, 2], [2, 3])
    wide = SteeringVector({"L0.resid_post": torch.ones(model.arch.d_model + 1)})
    with pytest.raises(PathlensError, match="wide"):
        explain(model, wide, ids, tokens=(POS, NEG))
