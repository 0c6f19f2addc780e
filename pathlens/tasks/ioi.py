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
- "position" (counterfactual pairs for DAS, Makelov et al. 2311.17030): the source is the same template with two
  fresh names, in the base's name order or (with probability `flip`) the opposite one (ABBA <-> BABA). Each
  pair's counterfactual label (`Task.counterfactual_ids`) follows the paper's position rule: the base IO if
  base and source have S1 at the same position, otherwise the base S — the name the model should output if
  the patched variable is "where the subject stands".

`split="train"` / `"test"` draws from disjoint halves of the templates (both name orders of a template stay on
one side), names, places and objects (the paper's split); the halves used are recorded in `meta["split"]`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

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

CORRUPT_MODES = ("abc", "swap", "position")
SPLITS = ("train", "test")
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
    if mode == "position":
        others = [x for x in names if x not in (a, b)]
        c, d = rng.sample(others if len(others) >= 2 else names, 2)
        return c, d, d
    others = [x for x in names if x not in (a, b)]
    c, d, e = rng.sample(others if len(others) >= 3 else names, 3)
    return c, d, e


class _Row(NamedTuple):
    clean: str
    corrupt: str
    io: str
    s: str
    spans: dict[str, tuple[int, int]]
    flipped: bool = False


def _row(
    rngs: tuple[random.Random, random.Random],
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    templates: list[str],
    mode: str,
    pools: tuple[Sequence[str], Sequence[str]] = (PLACES, OBJECTS),
    flip: float = 0.5,
) -> _Row:
    """One prompt pair with equal clean/corrupted token counts; the names are redrawn until the counts match.

    `rngs` = (clean generator, corruption generator): kept apart so a seed gives the same clean prompts
    whichever corruption is chosen. In "position" mode the source takes the opposite name order with
    probability `flip`."""
    rng, corrupt_rng = rngs
    template, place, obj = rng.choice(templates), rng.choice(pools[0]), rng.choice(pools[1])
    flipped = mode == "position" and corrupt_rng.random() < flip
    source_template = _to_abba(template) if flipped else template
    for _ in range(_MAX_TRIES):
        a, b = rng.sample(names, 2)
        clean, spans = _render(template, a, b, b, place, obj)
        corrupt, _ = _render(source_template, *_corrupt_names(corrupt_rng, names, a, b, mode), place, obj)
        if len(encode(tokenizer, clean)) == len(encode(tokenizer, corrupt)):
            return _Row(clean, corrupt, a, b, spans, flipped)
    raise PathlensError(
        f"ioi: could not find names giving equal clean/corrupted token lengths for template {template!r} in "
        f"{_MAX_TRIES} tries; use templates='BABA' or a tokenizer with single-token names."
    )


def _halves(templates: list[str], names: list[str], split: str | None) -> tuple[list[str], list[str], dict[str, Any]]:
    """The templates and names of one side of the train/test split (None: all of them), places and objects
    recorded alike in the returned meta. Templates are split by pair {t, its other name order}, in order."""
    if split is None:
        return templates, names, {}
    if split not in SPLITS:
        raise PathlensError(f"ioi: unknown split {split!r}; use 'train', 'test' or None (no split).")
    pairs = list(dict.fromkeys(min(t, _to_abba(t)) for t in templates))
    if len(pairs) < 2 or len(names) < 6:
        raise PathlensError(
            f"ioi: split={split!r} needs at least 2 templates (up to name order) and 6 names, got {len(pairs)} and "
            f"{len(names)}; pass more templates, or split=None."
        )
    side = 0 if split == "train" else 1

    def half(xs: Sequence[str]) -> list[str]:
        cut = (len(xs) + 1) // 2
        return list(xs[:cut] if side == 0 else xs[cut:])

    kept = set(half(pairs))
    chosen = [t for t in templates if min(t, _to_abba(t)) in kept]
    meta = {
        "side": split,
        "templates": chosen,
        "names": half(names),
        "places": half(PLACES),
        "objects": half(OBJECTS),
    }
    return chosen, half(names), meta


def ioi(
    tokenizer: PreTrainedTokenizerBase,
    n: int = 8,
    seed: int = 0,
    templates: str | Sequence[str] = "all",
    corrupt: str = "abc",
    split: str | None = None,
    flip: float = 0.5,
) -> Task:
    """N IOI prompt pairs for `tokenizer`.

    Args:
        n: number of prompts.
        seed: random seed; the same seed (and tokenizer) gives the same task.
        templates: "all" (15 BABA + 15 ABBA), "BABA", "ABBA", or a list of template strings with one [A], two
            [B] and optional [PLACE] / [OBJECT] slots.
        corrupt: "abc" (three fresh names), "swap" (every A and B exchanged) or "position" (DAS pairs with
            counterfactual labels), see the module docstring.
        split: None, or "train" / "test": disjoint halves of the templates, names, places and objects.
        flip: in "position" mode, the probability that a source has the opposite name order (1.0: every pair's
            label is the base S, as in the paper's test pairs).

    Returns a Task with answer = " IO", wrong = " S", and roles "IO", "S1", "S1+1", "S2", "END" — (N,) token
    positions found from the tokenization of each clean prompt (valid for the corrupted one too, since
    names are single tokens and the pair has equal length). If a pair's token counts differ, the row's names are
    redrawn (at most 100 times, then PathlensError).
    """
    if corrupt not in CORRUPT_MODES:
        raise PathlensError(f"ioi: unknown corrupt mode {corrupt!r}; use one of {list(CORRUPT_MODES)}.")
    if n < 1:
        raise PathlensError(f"ioi: empty batch: pass at least one prompt (n >= 1), got n={n}.")
    if not 0.0 <= flip <= 1.0:
        raise PathlensError(f"ioi: flip must be a probability in [0, 1], got {flip}.")
    require_tokenizer(tokenizer, "ioi")
    chosen, names, split_meta = _halves(_select_templates(templates), _name_pool(tokenizer), split)
    pools = (split_meta.get("places", PLACES), split_meta.get("objects", OBJECTS))
    rngs = (random.Random(seed), random.Random(f"ioi-corrupt-{seed}"))
    rows = [_row(rngs, tokenizer, names, chosen, corrupt, pools, flip) for _ in range(n)]
    roles: dict[str, list[int]] = {"IO": [], "S1": [], "S1+1": [], "S2": [], "END": []}
    for row in rows:
        pos = locate_spans(tokenizer, row.clean, row.spans)
        for role in ("IO", "S1", "S2"):
            roles[role].append(pos[role])
        roles["S1+1"].append(pos["S1"] + 1)
        roles["END"].append(len(encode(tokenizer, row.clean)) - 1)
    answers = [single_token_id(tokenizer, " " + r.io, "name") for r in rows]
    wrongs = [single_token_id(tokenizer, " " + r.s, "name") for r in rows]
    meta: dict[str, object] = {
        "seed": seed,
        "templates": templates if isinstance(templates, str) else list(templates),
        "corrupt": corrupt,
        "n_names": len(names),
    }
    if split is not None:
        meta["split"] = split_meta
    if corrupt == "position":
        meta["flip"] = flip
    task = make_task(
        "ioi",
        tokenizer,
        clean_prompts=[r.clean for r in rows],
        corrupt_prompts=[r.corrupt for r in rows],
        answers=answers,
        wrongs=wrongs,
        roles=roles,
        meta=meta,
    )
    if corrupt != "position":
        return task
    labels = [wrong if r.flipped else answer for r, answer, wrong in zip(rows, answers, wrongs, strict=True)]
    return replace(task, counterfactual_ids=torch.tensor(labels, dtype=torch.long))
