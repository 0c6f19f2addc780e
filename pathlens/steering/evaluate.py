"""The harness every steering method is judged on: a concept score and the cost.

Concept scores: `vader_scores` (the VADER lexicon's compound sentiment of generated text, −1..1, from the
`vaderSentiment` package) and `token_set_probability` (the next-token probability mass on a set of tokens).
Cost, on held-out neutral text: `perplexity`, `next_token_kl` (mean KL(unsteered ‖ steered) of next-token
distributions over every real position) and `next_token_entropy`; `cost` gives all of them from two forwards.
Steering is applied to held-out text at every position ("all"), as it is to every generated token: the cost of
steering the text the model would produce, whatever the vector's own positions policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.steering.vector import SteeringVector


def vader_scores(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text (−1 most negative .. +1 most positive; 0 for an empty text)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # type: ignore[import-untyped]

    analyzer = SentimentIntensityAnalyzer()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def _interventions(model: Model, steer: SteeringVector | None, scale: float | None) -> list[Any]:
    if steer is None:
        return []
    steer.check(model)
    return steer.interventions(scale=scale, positions="all")


def next_token_logprobs(
    model: Model, texts: Sequence[str], steer: SteeringVector | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """For each text (right-padded batch): log-probabilities (b, p, vocab) of the next token, the ids (b, p) and
    the mask (b, p) of positions whose next token is real (all but each row's last real token)."""
    if isinstance(texts, str) or len(texts) == 0:
        raise PathlensError("evaluation texts must be a non-empty list of texts.")
    ids, mask = model.tokenize(list(texts))
    with torch.no_grad():
        logits = model.run(ids, attention_mask=mask, interventions=_interventions(model, steer, scale)).logits
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    scored = mask.clone()
    scored[torch.arange(ids.shape[0]), mask.sum(1) - 1] = 0
    return logprobs, ids, scored.bool()


def _nll(logprobs: Tensor, ids: Tensor, scored: Tensor) -> Tensor:
    """Negative log-likelihood of each scored position's actual next token (n,)."""
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (b, p): the token after each position
    taken = logprobs.gather(-1, nxt[..., None].to(logprobs.device))[..., 0]
    return -taken[scored]


def perplexity(
    model: Model, texts: Sequence[str], steer: SteeringVector | None = None, scale: float | None = None
) -> float:
    """exp(mean next-token NLL) over every real token of `texts` (after the first of each row)."""
    logprobs, ids, scored = next_token_logprobs(model, texts, steer, scale)
    return float(_nll(logprobs, ids, scored).mean().exp())


def next_token_entropy(
    model: Model, texts: Sequence[str], steer: SteeringVector | None = None, scale: float | None = None
) -> float:
    """Mean entropy (nats) of the next-token distribution over the real positions of `texts`."""
    logprobs, _, scored = next_token_logprobs(model, texts, steer, scale)
    return float(-(logprobs.exp() * logprobs).sum(-1)[scored].mean())


def next_token_kl(model: Model, texts: Sequence[str], steer: SteeringVector, scale: float | None = None) -> float:
    """Mean KL(unsteered ‖ steered) (nats) of next-token distributions over the real positions of `texts`."""
    base, _, scored = next_token_logprobs(model, texts)
    steered, _, _ = next_token_logprobs(model, texts, steer, scale)
    return float((base.exp() * (base - steered)).sum(-1)[scored].mean())


def cost(
    model: Model,
    texts: Sequence[str],
    steer: SteeringVector | None,
    scale: float | None = None,
    baseline: tuple[Tensor, Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """Perplexity (unsteered and steered), its relative increase, KL and steered entropy on `texts`; pass
    `baseline` (`next_token_logprobs(model, texts)`) to reuse the unsteered forward across many calls."""
    base, ids, scored = baseline if baseline is not None else next_token_logprobs(model, texts)
    steered = base if steer is None else next_token_logprobs(model, texts, steer, scale)[0]
    ppl_base = float(_nll(base, ids, scored).mean().exp())
    ppl = float(_nll(steered, ids, scored).mean().exp())
    return {
        "ppl_base": ppl_base,
        "ppl": ppl,
        "ppl_increase": ppl / ppl_base - 1.0,
        "kl": float((base.exp() * (base - steered)).sum(-1)[scored].mean()),
        "entropy": float(-(steered.exp() * steered).sum(-1)[scored].mean()),
    }


def token_ids(model: Model, tokens: Sequence[str] | Sequence[int]) -> list[int]:
    """Token ids of a token set: ids as given, or each string's first token (" good" -> its id)."""
    ids = []
    for t in tokens:
        if isinstance(t, int):
            ids.append(t)
            continue
        if model.tokenizer is None:
            raise PathlensError(f"token set entry {t!r}: this model has no tokenizer; give token ids.")
        encoded = model.tokenizer(t, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise PathlensError(f"token set entry {t!r} has no tokens.")
        ids.append(int(encoded[0]))
    if not ids:
        raise PathlensError("token set is empty; give at least one token.")
    return ids


def token_set_probability(
    model: Model,
    prompts: Sequence[str],
    tokens: Sequence[str] | Sequence[int],
    steer: SteeringVector | None = None,
    scale: float | None = None,
) -> Tensor:
    """Probability mass (N,) of the next token being in `tokens`, after each prompt's last real token."""
    logprobs, ids, _ = next_token_logprobs(model, prompts, steer, scale)
    last = model.tokenize(list(prompts))[1].sum(1) - 1
    chosen = torch.tensor(sorted(set(token_ids(model, tokens))))
    probs = logprobs[torch.arange(ids.shape[0]), last].exp()  # (N, vocab)
    return probs[:, chosen].sum(-1).float()
