"""Greater-than on years, after Hanna et al. (arXiv 2305.00586).

"The war lasted from the year 1732 to the year 17" → the model should continue with a year later than 32.
The corrupted prompt is the same with the start year's last two digits set to "01" (the standard
01-corruption), after which every continuation is later, so the comparison carries no signal.

A logit-difference metric needs one answer and one wrong token, so each row picks them around YY. How
depends on how the tokenizer splits years, recorded as `meta["mode"]`:

- "two_digit" (GPT-2-style BPE: " 1732" → " 17" "32"): the next token is the two-digit end year.
  answer = YY+1, wrong = YY−1 (as the tokens that follow " CC"), YY in 02..98.
- "digit" (tokenizers that split digits one per token, e.g. Llama / SmolLM2: " 1732" → " " "1" "7" "3" "2"):
  the next token is the first digit of the end year's last two. With tens digit d of YY (kept in 1..8),
  answer = digit d+1, wrong = digit d−1 — the end year must start with a digit ≥ d, so d+1 is a valid start
  and d−1 is not.

Roles: "YY" = the first token of the start year's last two digits, "END" = the last token.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from pathlens.errors import PathlensError
from pathlens.tasks.base import Task
from pathlens.tasks.tokens import encode, locate_spans, make_task, plain_ids, require_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

NOUNS: tuple[str, ...] = (
    "war",
    "expedition",
    "drought",
    "famine",
    "siege",
    "reign",
    "occupation",
    "rebellion",
    "plague",
    "voyage",
    "crusade",
    "conflict",
    "pilgrimage",
    "construction",
    "revolution",
    "blockade",
    "campaign",
    "dynasty",
    "monarchy",
    "alliance",
)
CENTURIES: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "17", "18")
CORRUPT_YY = 1
TEMPLATE = "The {noun} lasted from the year {cc}{yy:02d} to the year {cc}"


def _split_years(tokenizer: PreTrainedTokenizerBase, century: str, n_tail: int) -> dict[int, list[int]]:
    """YY -> the `n_tail` tokens after " CC" for years whose " CCYY" encodes as tokens(" CC") + n_tail tokens."""
    prefix = plain_ids(tokenizer, " " + century)
    out = {}
    for yy in range(100):
        ids = plain_ids(tokenizer, f" {century}{yy:02d}")
        if len(ids) == len(prefix) + n_tail and ids[: len(prefix)] == prefix:
            out[yy] = ids[len(prefix) :]
    return out


def _two_digit_choices(tokenizer: PreTrainedTokenizerBase, century: str) -> dict[int, tuple[int, int]]:
    """YY -> (answer id, wrong id) = (tokens of YY+1, YY−1) for usable start years in two-digit mode."""
    tail = _split_years(tokenizer, century, 1)
    if CORRUPT_YY not in tail:
        return {}
    return {
        yy: (tail[yy + 1][0], tail[yy - 1][0])
        for yy in range(2, 99)
        if yy in tail and yy - 1 in tail and yy + 1 in tail
    }


def _digit_choices(tokenizer: PreTrainedTokenizerBase, century: str) -> dict[int, tuple[int, int]]:
    """YY -> (answer id, wrong id) = (digit d+1, digit d−1), d the tens digit of YY, in digit mode."""
    tail = _split_years(tokenizer, century, 2)
    if CORRUPT_YY not in tail:
        return {}
    first_digit = {yy // 10: ids[0] for yy, ids in tail.items()}
    return {
        yy: (first_digit[yy // 10 + 1], first_digit[yy // 10 - 1])
        for yy in range(10, 90)
        if yy in tail and yy // 10 + 1 in first_digit and yy // 10 - 1 in first_digit
    }


_MODES: dict[str, Callable[[PreTrainedTokenizerBase, str], dict[int, tuple[int, int]]]] = {
    "two_digit": _two_digit_choices,
    "digit": _digit_choices,
}


def year_mode(tokenizer: PreTrainedTokenizerBase) -> tuple[str, dict[str, dict[int, tuple[int, int]]]]:
    """The mode for this tokenizer and, per usable century, YY -> (answer id, wrong id).

    "two_digit" is used if any century works that way, else "digit"; PathlensError if neither fits."""
    for mode, choices in _MODES.items():
        table = {cc: c for cc in CENTURIES if (c := choices(tokenizer, cc))}
        if table:
            return mode, table
    raise PathlensError(
        "greater_than: this tokenizer splits years neither as ' CC' + two-digit token nor one digit per token "
        f"(e.g. ' 1732' -> {plain_ids(tokenizer, ' 1732')}); the task cannot pick single-token answers for it."
    )


def greater_than(tokenizer: PreTrainedTokenizerBase, n: int = 8, seed: int = 0) -> Task:
    """N greater-than prompts with the 01-corruption; see the module docstring for answers and modes.

    Each row draws a noun, a century CC and a start year YY with random.Random(seed); the same seed gives the
    same task. meta records seed, mode and the usable centuries.
    """
    if n < 1:
        raise PathlensError(f"greater_than: empty batch: pass at least one prompt (n >= 1), got n={n}.")
    require_tokenizer(tokenizer, "greater_than")
    mode, table = year_mode(tokenizer)
    rng = random.Random(seed)
    clean, corrupt, answers, wrongs, yy_pos = [], [], [], [], []
    for _ in range(n):
        noun, cc = rng.choice(NOUNS), rng.choice(sorted(table))
        yy = rng.choice(sorted(table[cc]))
        text = TEMPLATE.format(noun=noun, cc=cc, yy=yy)
        start = text.index(f"{cc}{yy:02d}") + len(cc)
        clean.append(text)
        corrupt.append(TEMPLATE.format(noun=noun, cc=cc, yy=CORRUPT_YY))
        answers.append(table[cc][yy][0])
        wrongs.append(table[cc][yy][1])
        yy_pos.append(locate_spans(tokenizer, text, {"YY": (start, start + 2)})["YY"])
    return make_task(
        "greater-than",
        tokenizer,
        clean,
        corrupt,
        answers,
        wrongs,
        roles={"YY": yy_pos, "END": [len(encode(tokenizer, t)) - 1 for t in clean]},
        meta={"seed": seed, "mode": mode, "centuries": sorted(table)},
    )
