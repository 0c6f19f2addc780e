"""Factual recall on a small hand-written set of facts.

"The capital of France is" → " Paris". Each fact belongs to a relation (a template with one subject slot).
A row pairs a fact with another of the same relation that has a different answer: the clean prompt uses
the first subject (answer = its object), the corrupted prompt the second subject, and wrong = the second
fact's object — so the metric measures how much the subject, not the template, drives the answer.

Pairs are kept only when both answers are single tokens and both prompts have the same token count for the
tokenizer; the seed picks each fact's partner among those and the row order.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NamedTuple

from pathlens.errors import PathlensError
from pathlens.tasks.base import Task
from pathlens.tasks.tokens import encode, locate_spans, make_task, require_tokenizer, single_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Fact(NamedTuple):
    template: str
    subject: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)


_CAPITAL = "The capital of {} is"
_LANDMARK = "The {} is located in the city of"
_LANGUAGE = "The official language of {} is"
_SPORT = "{} is best known for playing"

FACTS: tuple[Fact, ...] = (
    Fact(_CAPITAL, "France", " Paris"),
    Fact(_CAPITAL, "Germany", " Berlin"),
    Fact(_CAPITAL, "Italy", " Rome"),
    Fact(_CAPITAL, "Spain", " Madrid"),
    Fact(_CAPITAL, "Japan", " Tokyo"),
    Fact(_CAPITAL, "Russia", " Moscow"),
    Fact(_CAPITAL, "Egypt", " Cairo"),
    Fact(_CAPITAL, "Greece", " Athens"),
    Fact(_CAPITAL, "Canada", " Ottawa"),
    Fact(_CAPITAL, "Poland", " Warsaw"),
    Fact(_LANDMARK, "Eiffel Tower", " Paris"),
    Fact(_LANDMARK, "Colosseum", " Rome"),
    Fact(_LANDMARK, "Brandenburg Gate", " Berlin"),
    Fact(_LANDMARK, "British Museum", " London"),
    Fact(_LANDMARK, "Kremlin", " Moscow"),
    Fact(_LANDMARK, "Acropolis", " Athens"),
    Fact(_LANDMARK, "Sagrada Familia", " Barcelona"),
    Fact(_LANDMARK, "Forbidden City", " Beijing"),
    Fact(_LANGUAGE, "France", " French"),
    Fact(_LANGUAGE, "Germany", " German"),
    Fact(_LANGUAGE, "Italy", " Italian"),
    Fact(_LANGUAGE, "Spain", " Spanish"),
    Fact(_LANGUAGE, "Japan", " Japanese"),
    Fact(_LANGUAGE, "Russia", " Russian"),
    Fact(_LANGUAGE, "China", " Chinese"),
    Fact(_LANGUAGE, "Portugal", " Portuguese"),
    Fact(_SPORT, "Michael Jordan", " basketball"),
    Fact(_SPORT, "Tiger Woods", " golf"),
    Fact(_SPORT, "Serena Williams", " tennis"),
    Fact(_SPORT, "Lionel Messi", " soccer"),
    Fact(_SPORT, "Wayne Gretzky", " hockey"),
    Fact(_SPORT, "Babe Ruth", " baseball"),
)


def _usable(tokenizer: PreTrainedTokenizerBase) -> list[tuple[Fact, int]]:
    """Facts whose answer is a single token, with their prompt's token count."""
    kept = []
    for fact in FACTS:
        try:
            single_token_id(tokenizer, fact.answer)
        except PathlensError:
            continue
        kept.append((fact, len(encode(tokenizer, fact.prompt))))
    return kept


def _subject_last(tokenizer: PreTrainedTokenizerBase, fact: Fact) -> int:
    """Position of the token holding the subject's last character."""
    end = fact.template.index("{}") + len(fact.subject)
    return locate_spans(tokenizer, fact.prompt, {"subject": (end - 1, end)})["subject"]


def fact_pairs(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> list[tuple[Fact, Fact]]:
    """(clean fact, corrupting fact) pairs valid for this tokenizer, one per fact that has a partner,
    in an order and with partners chosen by `seed`."""
    rng = random.Random(seed)
    usable = _usable(tokenizer)
    pairs = []
    for fact, length in usable:
        partners = [
            other
            for other, other_len in usable
            if other.template == fact.template and other.answer != fact.answer and other_len == length
        ]
        if partners:
            pairs.append((fact, rng.choice(partners)))
    rng.shuffle(pairs)
    return pairs


def factual(tokenizer: PreTrainedTokenizerBase, n: int | None = None, seed: int = 0) -> Task:
    """Factual-recall task: up to one row per usable fact (all of them if n is None, else the first n after a
    seeded shuffle). PathlensError if no pair fits the tokenizer or n exceeds the number that do.

    Roles: "subject_last" = the subject's last token (where factual-recall studies find the subject's
    enrichment), "END" = the last token. meta: seed, number of usable pairs.
    """
    require_tokenizer(tokenizer, "factual")
    pairs = fact_pairs(tokenizer, seed)
    if not pairs:
        raise PathlensError(
            "factual: no fact pair has single-token answers and equal-length prompts for this tokenizer; "
            "build your own task with pathlens.tasks.make_task."
        )
    if n is not None and not 1 <= n <= len(pairs):
        raise PathlensError(
            f"factual: n={n} but only {len(pairs)} fact pairs fit this tokenizer; pass 1 <= n <= {len(pairs)} "
            "or n=None for all of them."
        )
    rows = pairs if n is None else pairs[:n]
    clean = [fact.prompt for fact, _ in rows]
    return make_task(
        "factual",
        tokenizer,
        clean_prompts=clean,
        corrupt_prompts=[other.prompt for _, other in rows],
        answers=[fact.answer for fact, _ in rows],
        wrongs=[other.answer for _, other in rows],
        roles={
            "subject_last": [_subject_last(tokenizer, fact) for fact, _ in rows],
            "END": [len(encode(tokenizer, t)) - 1 for t in clean],
        },
        meta={"seed": seed, "n_pairs": len(pairs)},
    )
