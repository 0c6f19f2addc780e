"""Tokenization helpers shared by every task generator.

Prompts are encoded with the tokenizer's leading special tokens only (a BOS if the tokenizer adds one; a
trailing EOS/SEP would sit where the answer is predicted, so it is never added). `make_task` turns texts into
a right-padded `Task` and checks that each clean/corrupted pair has the same token count, so positions line
up between the two runs. Answers must be single tokens: the metric compares two logits at one position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.tasks.base import Metric, Task, logit_diff, role_positions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]


def require_tokenizer(tokenizer: object, task: str) -> None:
    """Raise unless `tokenizer` is a transformers tokenizer (passing the Model itself, or None, is a common slip)."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return
    given = "None" if tokenizer is None else f"a {type(tokenizer).__name__}"
    raise PathlensError(
        f"{task}: the tokenizer argument is {given}, not a transformers tokenizer; pass model.tokenizer (a model "
        "without one supports pathlens.tasks.induction(vocab_size=...) and Task.from_ids)."
    )


def plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def leading_special_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The special tokens the tokenizer puts before `text` by default (e.g. [BOS]), possibly none."""
    special = set(tokenizer.all_special_ids)
    lead: list[int] = []
    for tok in tokenizer(text)["input_ids"]:
        if tok not in special:
            break
        lead.append(tok)
    return lead


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt as the model sees it: leading special tokens (BOS, if any) then the text."""
    return leading_special_ids(tokenizer, text) + plain_ids(tokenizer, text)


def locate_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: Mapping[str, Span]) -> dict[str, int]:
    """Token positions (in `encode(tokenizer, text)`) of character spans of `text`.

    Each span (start, end) maps to the first token whose character offsets overlap it, so a word is found
    whether or not the tokenizer attaches the preceding space to it. Needs a fast tokenizer (offset mapping).
    """
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise PathlensError(
            "locating words in a prompt needs a fast tokenizer (offset mappings); load it with use_fast=True."
        ) from err
    shift = len(leading_special_ids(tokenizer, text))
    offsets = enc["offset_mapping"]
    positions = {}
    for role, (start, end) in spans.items():
        hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        if not hits:
            raise PathlensError(f"no token covers {role} ({text[start:end]!r}) in {text!r}; check the tokenizer.")
        positions[role] = shift + hits[0]
    return positions


def _pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    return [str(tokenizer.decode([i])) for i in ids]


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str, what: str = "answer") -> int:
    """The one token id that `text` encodes to (no special tokens); PathlensError if it is not exactly one
    in-vocabulary token. `what` names the word's role in the message ("answer", "name", ...)."""
    ids = plain_ids(tokenizer, text)
    if len(ids) != 1:
        raise PathlensError(
            f"{what} {text!r} is {len(ids)} tokens {_pieces(tokenizer, ids)} for this tokenizer; choose "
            f"single-token {what}s or pass {what} ids explicitly."
        )
    unk = tokenizer.unk_token_id
    if unk is not None and ids[0] == unk and text.strip() != tokenizer.unk_token:
        raise PathlensError(
            f"{what} {text!r} is not in this tokenizer's vocabulary (it encodes to the unknown token "
            f"{tokenizer.unk_token!r}); choose words the tokenizer knows or pass {what} ids explicitly."
        )
    return ids[0]


def single_token_words(tokenizer: PreTrainedTokenizerBase, words: Sequence[str], prefix: str = " ") -> list[str]:
    """The words of `words` (returned as given, without `prefix`) for which prefix + word is one known token."""
    kept = []
    for word in words:
        try:
            single_token_id(tokenizer, prefix + word, "word")
        except PathlensError:
            continue
        kept.append(word)
    return kept


def pad_id(tokenizer: PreTrainedTokenizerBase | None) -> int:
    """The id used for right padding: the pad token, else EOS, else 0 (padding is masked and never scored)."""
    if tokenizer is not None:
        for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if tok is not None:
                return int(tok)
    return 0


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Right-pad token rows to the longest: ids (N, P) long and attention mask (N, P) long (1 = real)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _token_ids(tokenizer: PreTrainedTokenizerBase, items: Sequence[str | int], what: str) -> Tensor:
    """(N,) ids for answers given as single-token strings or ready ids."""
    ids = [single_token_id(tokenizer, x, what) if isinstance(x, str) else int(x) for x in items]
    return torch.tensor(ids, dtype=torch.long)


def _check_batch(
    name: str, clean: Sequence[str], corrupt: Sequence[str], answers: Sequence[object], wrongs: Sequence[object]
) -> None:
    if len(clean) == 0:
        raise PathlensError(f"task {name!r}: empty batch: pass at least one prompt.")
    sizes = {"clean_prompts": len(clean), "corrupt_prompts": len(corrupt)}
    sizes |= {"answers": len(answers), "wrongs": len(wrongs)}
    if len(set(sizes.values())) != 1:
        raise PathlensError(f"task {name!r}: inputs differ in length {sizes}; pass one entry per prompt in each.")


def _check_pairs(
    name: str, clean: Sequence[str], corrupt: Sequence[str], clean_ids: list[list[int]], corrupt_ids: list[list[int]]
) -> None:
    for i, (c, r, ci, ri) in enumerate(zip(clean, corrupt, clean_ids, corrupt_ids, strict=True)):
        if len(ci) == 0:
            raise PathlensError(f"task {name!r}: row {i}: prompt {c!r} encodes to no tokens; pass non-empty text.")
        if len(ci) != len(ri):
            raise PathlensError(
                f"task {name!r}: row {i}: clean prompt {c!r} is {len(ci)} tokens but corrupted prompt {r!r} is "
                f"{len(ri)}; each pair must have equal token length so positions line up — pick corrupting "
                "words with the same token count."
            )


def make_task(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    clean_prompts: Sequence[str],
    corrupt_prompts: Sequence[str],
    answers: Sequence[str | int],
    wrongs: Sequence[str | int],
    metric: Metric = logit_diff,
    roles: Mapping[str, Sequence[int] | Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Task:
    """Tokenize N clean/corrupted prompt pairs into a right-padded `Task`.

    answers / wrongs are single-token strings (e.g. " Mary") or token ids. Each clean/corrupted pair must have
    the same token count; rows are right-padded to the longest, `attention_mask` marks real tokens and
    `answer_pos` is each row's last real token. `roles` maps a role name to N token positions.
    """
    require_tokenizer(tokenizer, name)
    _check_batch(name, clean_prompts, corrupt_prompts, answers, wrongs)
    clean = [encode(tokenizer, t) for t in clean_prompts]
    corrupt = [encode(tokenizer, t) for t in corrupt_prompts]
    _check_pairs(name, clean_prompts, corrupt_prompts, clean, corrupt)
    pad = pad_id(tokenizer)
    clean_ids, mask = pad_rows(clean, pad)
    corrupt_ids, _ = pad_rows(corrupt, pad)
    return Task(
        name=name,
        clean_ids=clean_ids,
        corrupt_ids=corrupt_ids,
        answer_ids=_token_ids(tokenizer, answers, "answer"),
        wrong_ids=_token_ids(tokenizer, wrongs, "wrong answer"),
        answer_pos=mask.sum(1) - 1,
        attention_mask=mask,
        metric=metric,
        prompts=list(clean_prompts),
        corrupt_prompts=list(corrupt_prompts),
        roles=role_positions(name, roles, len(clean)),
        meta=dict(meta or {}),
    )
