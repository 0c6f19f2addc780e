"""Finders on a tiny model with a word-level tokenizer: difference in means equals the hand computation (each
prompt run alone, unpadded, read at its last token), the PCA and probe vectors' signs follow the contrast (swapping
the sets flips them), CAA's A/B prompts read the letter, and layer selection scores every layer.

Tolerance 1e-5: the finder runs right-padded batches, the reference one prompt at a time.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pathlens import Model
from pathlens.steering.finders import (
    ab_prompts,
    layer_sites,
    mean_difference,
    pca_direction,
    probe_direction,
    read_activations,
    select_layer,
)
from tests.helpers import tiny_model

WORDS = "the a film book day meal was is good great lovely fine bad awful sad dull very so and it A B ( ) : Answer ?"
POSITIVE = ["the film was good", "a day is great", "the meal was very lovely", "it is so fine", "a book was good"]
NEGATIVE = ["the film was bad", "a day is awful", "the meal was very sad", "it is so dull", "a book was bad"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS.split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_with_words(family: str = "llama") -> Model:
    model = tiny_model(family)
    model.tokenizer = word_tokenizer()
    return model


def _alone(model: Model, prompt: str, site: str) -> torch.Tensor:
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
    return model.run(ids, cache=[site]).cache[site][0, -1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mean_difference_equals_the_hand_computation(family: str) -> None:
    model = tiny_with_words(family)
    sites = ["L0.resid_post", "L1.mlp_out"]
    vec = mean_difference(model, POSITIVE, NEGATIVE[:3], sites, data="words")
    for site in sites:
        pos = torch.stack([_alone(model, p, site) for p in POSITIVE])
        neg = torch.stack([_alone(model, p, site) for p in NEGATIVE[:3]])
        torch.testing.assert_close(vec.vectors[site], pos.mean(0) - neg.mean(0), atol=1e-5, rtol=1e-5)
        expected_norm = torch.cat([pos, neg]).norm(dim=-1).mean()
        assert abs(vec.norms[site] - float(expected_norm)) < 1e-4
    assert vec.meta["method"] == "mean-diff" and vec.meta["model"] == model.name and vec.meta["data"] == "words"
    assert vec.meta["n_positive"] == 5 and vec.meta["n_negative"] == 3 and vec.meta["site"] == sites


def test_read_positions_mean_and_explicit() -> None:
    model = tiny_with_words()
    site = "L1.resid_post"
    acts = read_activations(model, POSITIVE[:2], site, at=1)[site]
    ids = torch.tensor([model.tokenizer(POSITIVE[0])["input_ids"]])
    full = model.run(ids, cache=[site]).cache[site][0]
    torch.testing.assert_close(acts[0], full[1], atol=1e-5, rtol=1e-5)
    mean = read_activations(model, POSITIVE[:1], site, at="mean")[site]
    torch.testing.assert_close(mean[0], full.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("finder", [pca_direction, probe_direction])
def test_pca_and_probe_signs_follow_the_contrast(finder: object) -> None:
    model = tiny_with_words()
    site = "L1.resid_post"
    forward = finder(model, POSITIVE, NEGATIVE, site)  # type: ignore[operator]
    backward = finder(model, NEGATIVE, POSITIVE, site)  # type: ignore[operator]
    torch.testing.assert_close(forward.vectors[site], -backward.vectors[site], atol=1e-4, rtol=1e-3)
    pos = read_activations(model, POSITIVE, site)[site]
    neg = read_activations(model, NEGATIVE, site)[site]
    above = ((pos - neg) @ forward.vectors[site] > 0).sum()
    assert int(above) * 2 > len(POSITIVE)  # repeng's rule: positive projects above negative in most pairs


def test_pca_equals_the_first_component_of_the_centred_differences() -> None:
    model = tiny_with_words()
    site = "L0.resid_post"
    vec = pca_direction(model, POSITIVE, NEGATIVE, site)
    diffs = (read_activations(model, POSITIVE, site)[site] - read_activations(model, NEGATIVE, site)[site]).double()
    _, _, vh = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    unit = vec.vectors[site].double() / vec.vectors[site].double().norm()
    assert abs(abs(float(unit @ vh[0])) - 1.0) < 1e-5


def test_ab_prompts_read_the_answer_letter() -> None:
    model = tiny_with_words()
    positive, negative = ab_prompts(
        ["is it good ?"] * 2, ["A", "B"], ["B", "A"], template="{question} Answer : ( {letter}"
    )
    assert positive == ["is it good ? Answer : ( A", "is it good ? Answer : ( B"]
    vec = mean_difference(model, positive, negative, "L1.resid_post", method="caa")
    assert vec.meta["method"] == "caa"
    # both letters appear on both sides, so the mean difference of the letter-position reads cancels exactly
    assert float(vec.vectors["L1.resid_post"].norm()) < 1e-5


def test_select_layer_scores_every_layer() -> None:
    model = tiny_with_words()
    table = select_layer(model, (POSITIVE[:3], NEGATIVE[:3]), (POSITIVE[3:], NEGATIVE[3:]), effect=lambda v: 1.0)
    assert sorted(table["site"]) == layer_sites(model)
    assert set(table.columns) == {"layer", "site", "accuracy", "d_prime", "effect"}
    assert table["accuracy"].between(0, 1).all()


def test_shipped_data_is_deterministic_and_paired() -> None:
    from pathlens.steering.data import CONCEPTS, contrast, heldout_text, neutral_prompts

    sizes = {name: len(contrast(name).positive) for name in CONCEPTS}
    assert sizes == {"sentiment": 48, "formality": 24, "refusal": 24, "joy": 12, "anger": 12, "sadness": 12, "fear": 12}
    for name in CONCEPTS:
        first, again = contrast(name), contrast(name)
        assert first == again and len(first.positive) == len(first.negative) and first.description
        assert len(set(first.positive)) == len(first.positive)
    assert contrast("sentiment").positive[0] == "I think the movie was wonderful."
    assert contrast("sentiment").negative[0] == "I think the movie was terrible."
    assert len(neutral_prompts()) == 64 and len(set(neutral_prompts())) == 64
    assert len(heldout_text()) == 30
