"""The evaluation harness and the dose–response sweep: perplexity, KL and entropy equal their hand computations
(and KL is zero at scale 0), the token-set probability sums the set's softmax mass, VADER reads sentiment, and a
sweep on a tiny model returns one table row per (vector, scale), every generation, and writes its four files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pathlens.steering.evaluate import (
    cost,
    next_token_entropy,
    next_token_kl,
    perplexity,
    token_set_probability,
    vader_scores,
)
from pathlens.steering.sweep import sweep
from pathlens.steering.vector import SteeringVector
from tests.test_steering_finders import NEGATIVE, POSITIVE, tiny_with_words

TEXTS = POSITIVE[:3] + ["the book"]


def _hand(model: object, steer: SteeringVector | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per text alone: log-probs (p-1, vocab) of the next token and the actual next ids (p-1,)."""
    logps, nexts = [], []
    for text in TEXTS:
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])  # type: ignore[attr-defined]
        ivs = [] if steer is None else steer.interventions(positions="all")
        logits = model.run(ids, interventions=ivs).logits[0].double()  # type: ignore[attr-defined]
        logps.append(torch.log_softmax(logits[:-1], -1))
        nexts.append(ids[0, 1:])
    return logps, nexts


def test_perplexity_kl_and_entropy_equal_their_hand_computations() -> None:
    model = tiny_with_words()
    vec = SteeringVector({"L0.resid_post": torch.randn(32, generator=torch.Generator().manual_seed(1))}, scale=2.0)
    base, nexts = _hand(model, None)
    steered, _ = _hand(model, vec)
    nll = torch.cat([-lp.gather(-1, n[:, None])[:, 0] for lp, n in zip(base, nexts, strict=True)])
    assert math.isclose(perplexity(model, TEXTS), float(nll.mean().exp()), rel_tol=1e-5)
    kl = torch.cat([(b.exp() * (b - s)).sum(-1) for b, s in zip(base, steered, strict=True)]).mean()
    assert math.isclose(next_token_kl(model, TEXTS, vec), float(kl), rel_tol=1e-4, abs_tol=1e-7)
    entropy = torch.cat([-(s.exp() * s).sum(-1) for s in steered]).mean()
    assert math.isclose(next_token_entropy(model, TEXTS, vec), float(entropy), rel_tol=1e-5)
    zero = cost(model, TEXTS, vec, scale=0.0)
    assert zero["kl"] == 0.0 and zero["ppl_increase"] == 0.0


def test_token_set_probability_sums_the_set() -> None:
    model = tiny_with_words()
    probs = token_set_probability(model, POSITIVE[:2], ["good", "bad"])
    ids = model.tokenizer(POSITIVE[0])["input_ids"]
    last = torch.softmax(model.run(torch.tensor([ids])).logits[0, -1].double(), -1)
    good, bad = (model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("good", "bad"))
    assert math.isclose(float(probs[0]), float(last[good] + last[bad]), rel_tol=1e-5)


def test_vader_reads_sentiment() -> None:
    pos, neg, neutral = vader_scores(["What a wonderful, lovely day!", "This is awful and sad.", "The bus is red."])
    assert pos > 0.5 and neg < -0.5 and neutral == 0.0


def test_sweep_table_generations_and_files(tmp_path: Path) -> None:
    model = tiny_with_words()
    gen = torch.Generator().manual_seed(3)
    vectors = {
        "a": SteeringVector({"L1.resid_pre": torch.randn(32, generator=gen)}, meta={"method": "mean-diff"}),
        "b": SteeringVector({"L0.resid_post": torch.randn(32, generator=gen)}, meta={"method": "pca"}),
    }
    result = sweep(
        model, vectors, [-2.0, 0.0, 2.0], POSITIVE, heldout=NEGATIVE, max_new_tokens=3, batch_size=7, out=tmp_path
    )
    assert list(result.table["scale"]) == [-2.0, 0.0, 2.0] * 2 and list(result.table["name"]) == ["a"] * 3 + ["b"] * 3
    assert len(result.generations) == len(POSITIVE) * 5  # the unsteered rows are generated once
    assert (result.table[result.table["scale"] == 0.0]["vader_shift"] == 0.0).all()
    assert (result.table["n"] == len(POSITIVE)).all()
    for path in result.files.values():
        assert path.is_file() and path.stat().st_size > 0
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["vectors"]["a"]["meta"]["method"] == "mean-diff" and len(summary["rows"]) == 6
    assert (tmp_path / "dose_response.png").read_bytes()[:4] == b"\x89PNG"
