"""Indirect object identification (IOI), after Wang et al. (arXiv 2211.00593).

"Then, Sarah and John went to the park. John gave a book to" → " Sarah". The indirect object (IO, "A")
appears once, the subject (S, "B") twice; the model should name the IO. Answer = " A", wrong = " B", and the
metric is logit(IO) − logit(S) at the last token.

Templates are written in BABA form ("[B] and [A] ..., [B] gave ... to"); their ABBA forms swap the two
first-clause names. Prompts end right before the final IO.

Corruptions:
- "abc" (pABC, Wang et al.): the same sentence with the IO, S1 and S2 slots filled by three different random
  names (none equal to A or B when the pool allows), so no name repeats and the IO cannot be inferred.
- "swap" (the RelP / TransformerLens demo convention): the S/IO-swapped twin — every A and B exchanged, so
  the corrupted prompt's correct answer is the clean wrong one and its logit difference is about −clean.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from pathlens.errors import PathlensError
from pathlens.tasks.base import Task
from pathlens.tasks.tokens import (
    encode,
    locate_spans,
    make_task,
    require_tokenizer,
    single_token_id,
    single_token_words,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "When [B] and [A] arrived at the [PLACE], [B] handed a [OBJECT] to",
    "At the [PLACE], [B] and [A] found a [OBJECT]. [B] handed it to",
    "The [PLACE] was busy when [B] and [A] arrived. [B] brought a [OBJECT] to",
    "Yesterday [B] and [A] cleaned the [PLACE]. [B] threw a [OBJECT] to",
    "Once [B] and [A] reached the [PLACE], [B] showed a [OBJECT] to",
    "Later, [B] and [A] walked to the [PLACE]. [B] sent a [OBJECT] to",
    "When [B] and [A] met at the [PLACE], [B] offered a [OBJECT] to",
    "Since [B] and [A] were bored at the [PLACE], [B] tossed a [OBJECT] to",
    "On Sunday, [B] and [A] visited the [PLACE]. [B] lent a [OBJECT] to",
)


def _to_abba(template: str) -> str:
    """Swap the first [B] and the first [A] (the first-clause names): BABA -> ABBA."""
    return template.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


ABBA_TEMPLATES: tuple[str, ...] = tuple(_to_abba(t) for t in BABA_TEMPLATES)

NAMES: tuple[str, ...] = (
    "John",
    "Mary",
    "James",
    "Michael",
    "David",
    "Robert",
    "William",
    "Richard",
    "Thomas",
    "Charles",
    "Daniel",
    "Matthew",
    "Anthony",
    "Mark",
    "Paul",
    "Steven",
    "Andrew",
    "Joshua",
    "Kevin",
    "Brian",
    "George",
    "Edward",
    "Ronald",
    "Timothy",
    "Jason",
    "Jeffrey",
    "Ryan",
    "Jacob",
    "Gary",
    "Nicholas",
    "Eric",
    "Jonathan",
    "Stephen",
    "Larry",
    "Justin",
    "Scott",
    "Brandon",
    "Benjamin",
    "Samuel",
    "Frank",
    "Gregory",
    "Alexander",
    "Patrick",
    "Jack",
    "Dennis",
    "Jerry",
    "Tyler",
    "Aaron",
    "Adam",
    "Henry",
    "Peter",
    "Nathan",
    "Kyle",
    "Walter",
    "Harry",
    "Carl",
    "Arthur",
    "Roger",
    "Sean",
    "Ian",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Nancy",
    "Lisa",
    "Betty",
    "Sandra",
    "Ashley",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Laura",
    "Sharon",
    "Cynthia",
    "Kathleen",
    "Amy",
    "Anna",
    "Angela",
    "Helen",
    "Emma",
    "Rachel",
    "Alice",
    "Julia",
    "Grace",
    "Rose",
    "Kate",
    "Lucy",
    "Sophie",
    "Victoria",
    "Claire",
    "Diana",
    "Ruth",
    "Maria",
)

PLACES: tuple[str, ...] = (
    "store",
    "school",
    "hospital",
    "station",
    "park",
    "restaurant",
    "office",
    "library",
    "garden",
    "museum",
    "beach",
    "market",
    "church",
    "airport",
    "house",
    "kitchen",
    "hotel",
    "cafe",
    "bank",
    "theater",
    "stadium",
    "farm",
    "river",
    "lake",
    "mall",
    "bakery",
    "gym",
    "zoo",
    "harbor",
    "cinema",
)

OBJECTS: tuple[str, ...] = (
    "book",
    "ball",
    "ring",
    "bag",
    "key",
    "letter",
    "pen",
    "cake",
    "flower",
    "hat",
    "phone",
    "coin",
    "cup",
    "gift",
    "toy",
    "map",
    "ticket",
    "shirt",
    "bottle",
    "camera",
    "watch",
    "candle",
    "lamp",
    "sandwich",
    "basket",
    "drink",
    "snack",
    "necklace",
    "pencil",
    "kite",
)

CORRUPT_MODES = ("abc", "swap")
_MAX_TRIES = 100
_SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


def _select_templates(templates: str | Sequence[str]) -> list[str]:
    """The template list for "all" / "ABBA" / "BABA" or a user list (checked for one [A] and two [B])."""
    named = {"all": BABA_TEMPLATES + ABBA_TEMPLATES, "BABA": BABA_TEMPLATES, "ABBA": ABBA_TEMPLATES}
    if isinstance(templates, str):
        if templates not in named:
            raise PathlensError(
                f"ioi: unknown templates {templates!r}; use 'all', 'ABBA', 'BABA' or a list of template strings."
            )
        return list(named[templates])
    chosen = list(templates)
    if not chosen:
        raise PathlensError("ioi: the template list is empty; pass at least one template or 'all'.")
    for t in chosen:
        if t.count("[A]") != 1 or t.count("[B]") != 2 or t.startswith("["):
            raise PathlensError(
                f"ioi: template {t!r} must contain [A] once and [B] twice, not start with a name slot (the first "
                "word has no leading space), and stop before the final IO, e.g. "
                f"{BABA_TEMPLATES[0]!r}."
            )
    return chosen


def _render(template: str, a: str, b: str, s2: str, place: str, obj: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill a template; return the text and the character spans of the IO, S1 and S2 names.

    The [A] slot gets `a`, the first [B] gets `b` and the second [B] gets `s2` (= b for clean prompts)."""
    fills = {"A": a, "PLACE": place, "OBJECT": obj}
    text, spans, b_count, last = "", {}, 0, 0
    for match in _SLOT.finditer(template):
        text += template[last : match.start()]
        slot = match.group(1)
        role: str | None
        if slot == "B":
            word, role = (b, "S1") if b_count == 0 else (s2, "S2")
            b_count += 1
        else:
            word, role = fills[slot], ("IO" if slot == "A" else None)
        if role is not None:
            spans[role] = (len(text), len(text) + len(word))
        text += word
        last = match.end()
    return text + template[last:], spans


def _name_pool(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    names = single_token_words(tokenizer, NAMES, prefix=" ")
    if len(names) < 3:
        raise PathlensError(
            f"ioi: only {len(names)} of {len(NAMES)} names are single tokens (with a leading space) for this "
            "tokenizer; IOI needs at least 3. Use a tokenizer with whole-word name tokens."
        )
    return names


def _corrupt_names(rng: random.Random, names: list[str], a: str, b: str, mode: str) -> tuple[str, str, str]:
    """(IO, S1, S2) names of the corrupted prompt."""
    if mode == "swap":
        return b, a, a
    others = [x for x in names if x not in (a, b)]
    c, d, e = rng.sample(others if len(others) >= 3 else names, 3)
    return c, d, e


class _Row(NamedTuple):
    clean: str
    corrupt: str
    io: str
    s: str
    spans: dict[str, tuple[int, int]]


def _row(
    rngs: tuple[random.Random, random.Random],
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    templates: list[str],
    mode: str,
) -> _Row:
    """One prompt pair with equal clean/corrupted token counts; the names are redrawn until the counts match.

    `rngs` = (clean generator, corruption generator): kept apart so a seed gives the same clean prompts
    whichever corruption is chosen."""
    rng, corrupt_rng = rngs
    template, place, obj = rng.choice(templates), rng.choice(PLACES), rng.choice(OBJECTS)
    for _ in range(_MAX_TRIES):
        a, b = rng.sample(names, 2)
        clean, spans = _render(template, a, b, b, place, obj)
        corrupt, _ = _render(template, *_corrupt_names(corrupt_rng, names, a, b, mode), place, obj)
        if len(encode(tokenizer, clean)) == len(encode(tokenizer, corrupt)):
            return _Row(clean, corrupt, a, b, spans)
    raise PathlensError(
        f"ioi: could not find names giving equal clean/corrupted token lengths for template {template!r} in "
        f"{_MAX_TRIES} tries; use templates='BABA' or a tokenizer with single-token names."
    )


def ioi(
    tokenizer: PreTrainedTokenizerBase,
    n: int = 8,
    seed: int = 0,
    templates: str | Sequence[str] = "all",
    corrupt: str = "abc",
) -> Task:
    """N IOI prompt pairs for `tokenizer`.

    Args:
        n: number of prompts.
        seed: random seed; the same seed (and tokenizer) gives the same task.
        templates: "all" (15 BABA + 15 ABBA), "BABA", "ABBA", or a list of template strings with one [A], two
            [B] and optional [PLACE] / [OBJECT] slots.
        corrupt: "abc" (three fresh names) or "swap" (every A and B exchanged), see the module docstring.

    Returns a Task with answer = " IO", wrong = " S", and roles "IO", "S1", "S1+1", "S2", "END" — (N,) token
    positions found from the tokenization of each clean prompt (valid for the corrupted one too, since
    names are single tokens and the pair has equal length). If a pair's token counts differ, the row's names are
    redrawn (at most 100 times, then PathlensError).
    """
    if corrupt not in CORRUPT_MODES:
        raise PathlensError(f"ioi: unknown corrupt mode {corrupt!r}; use one of {list(CORRUPT_MODES)}.")
    if n < 1:
        raise PathlensError(f"ioi: empty batch: pass at least one prompt (n >= 1), got n={n}.")
    require_tokenizer(tokenizer, "ioi")
    names = _name_pool(tokenizer)
    chosen = _select_templates(templates)
    rngs = (random.Random(seed), random.Random(f"ioi-corrupt-{seed}"))
    rows = [_row(rngs, tokenizer, names, chosen, corrupt) for _ in range(n)]
    roles: dict[str, list[int]] = {"IO": [], "S1": [], "S1+1": [], "S2": [], "END": []}
    for row in rows:
        pos = locate_spans(tokenizer, row.clean, row.spans)
        for role in ("IO", "S1", "S2"):
            roles[role].append(pos[role])
        roles["S1+1"].append(pos["S1"] + 1)
        roles["END"].append(len(encode(tokenizer, row.clean)) - 1)
    return make_task(
        "ioi",
        tokenizer,
        clean_prompts=[r.clean for r in rows],
        corrupt_prompts=[r.corrupt for r in rows],
        answers=[single_token_id(tokenizer, " " + r.io, "name") for r in rows],
        wrongs=[single_token_id(tokenizer, " " + r.s, "name") for r in rows],
        roles=roles,
        meta={
            "seed": seed,
            "templates": templates if isinstance(templates, str) else list(templates),
            "corrupt": corrupt,
            "n_names": len(names),
        },
    )
