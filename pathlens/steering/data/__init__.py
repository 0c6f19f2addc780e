"""Contrast sets, neutral prompts and held-out text that pathlens ships for steering (written for the project).

Contrast sets (`contrast(name)`: positive and negative prompts, paired row by row):

- "sentiment" (sentiment.json): 48 pairs, templated — 4 templates × 12 subjects, the 8 (positive, negative)
  adjective pairs cycled in that fixed order ("I think the movie was wonderful." / "... terrible.").
- "formality" (formality.json): 24 hand-written pairs, formal (positive) vs casual (negative).
- "refusal" (refusal.json): 24 hand-written pairs, a harmful-looking instruction (positive) vs a harmless one on
  the same topic (negative); written to be mild — nothing in it is actionable.
- "joy", "anger", "sadness", "fear" (emotions.json): 12 pairs each, templated — each situation followed by the
  emotion's phrases (cycled) vs by a neutral phrase (cycled), the emotions studied in "Do LLMs Feel? Emotion
  Circuits Discovery and Control".

`neutral_prompts()` (neutral_prompts.txt): 64 neutral sentence openings to generate from. `heldout_text()`
(heldout.txt): 30 neutral sentences to measure perplexity, KL and entropy on. Templated sets are expanded here,
deterministically (no randomness), so every load gives the same lists in the same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from itertools import cycle, product
from typing import Any

from pathlens.errors import PathlensError

EMOTIONS = ("joy", "anger", "sadness", "fear")
CONCEPTS = ("sentiment", "formality", "refusal", *EMOTIONS)


@dataclass(frozen=True)
class Contrast:
    """A shipped contrast set: `positive[i]` and `negative[i]` form pair i."""

    name: str
    positive: list[str]
    negative: list[str]
    description: str


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def _json(name: str) -> dict[str, Any]:
    data = json.loads(_read(name))
    assert isinstance(data, dict)
    return data


def _sentiment() -> Contrast:
    spec = _json("sentiment.json")
    positive, negative = [], []
    adjectives = cycle(spec["adjectives"])
    for template, subject in product(spec["templates"], spec["subjects"]):
        good, bad = next(adjectives)
        positive.append(template.format(subject=subject, adjective=good))
        negative.append(template.format(subject=subject, adjective=bad))
    return Contrast("sentiment", positive, negative, spec["description"])


def _paired(name: str) -> Contrast:
    spec = _json(f"{name}.json")
    return Contrast(name, [p for p, _ in spec["pairs"]], [n for _, n in spec["pairs"]], spec["description"])


def _emotion(name: str) -> Contrast:
    spec = _json("emotions.json")
    phrases, neutral = cycle(spec["emotions"][name]), cycle(spec["neutral"])
    positive = [f"{s}, {next(phrases)}" for s in spec["situations"]]
    negative = [f"{s}, {next(neutral)}" for s in spec["situations"]]
    return Contrast(name, positive, negative, f"{name}: {spec['description']}")


def contrast(name: str) -> Contrast:
    """The shipped contrast set `name` (one of `CONCEPTS`)."""
    if name == "sentiment":
        return _sentiment()
    if name in ("formality", "refusal"):
        return _paired(name)
    if name in EMOTIONS:
        return _emotion(name)
    raise PathlensError(f"unknown concept set {name!r}; pathlens ships {list(CONCEPTS)}.")


def neutral_prompts() -> list[str]:
    """64 neutral sentence openings to generate from."""
    return [line for line in _read("neutral_prompts.txt").splitlines() if line.strip()]


def heldout_text() -> list[str]:
    """30 neutral sentences for perplexity, KL and entropy (not used to find any vector)."""
    return [line for line in _read("heldout.txt").splitlines() if line.strip()]
