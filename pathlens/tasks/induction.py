"""Induction on repeated random tokens (Olsson et al., arXiv 2209.11895).

Clean:   [BOS] r_1 .. r_T r_1 .. r_{T-1}   → answer r_T (copy the token that followed r_{T-1} before)
Corrupt: [BOS] s_1 .. s_T r_1 .. r_{T-1}   → wrong = s_T

The corrupted first half is replaced by other random tokens, so nothing in the sequence repeats and an
induction head has nothing to copy. All 2T tokens of a row are distinct. The task is token-only (no
prompts), so it also works for models without a tokenizer given just a vocabulary size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.tasks.base import Task
from pathlens.tasks.tokens import leading_special_ids, require_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SKIP_LOW_IDS = 1000


def _tokenizer_setup(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int | None, set[int]]:
    """(vocabulary size, BOS id if the tokenizer adds one else None, special ids to avoid)."""
    lead = leading_special_ids(tokenizer, "a")
    return len(tokenizer), (lead[0] if lead else None), set(tokenizer.all_special_ids)


def _candidates(vocab_size: int, token_range: tuple[int, int] | None, exclude: set[int]) -> Tensor:
    """(K,) token ids to draw from: `token_range` [lo, hi) (default: skip the lowest ids of large
    vocabularies, which are bytes and punctuation), minus special ids."""
    lo, hi = token_range if token_range is not None else (min(_SKIP_LOW_IDS, vocab_size // 4), vocab_size)
    if not 0 <= lo < hi <= vocab_size:
        raise PathlensError(
            f"induction: token_range {(lo, hi)} must satisfy 0 <= lo < hi <= vocab_size ({vocab_size})."
        )
    ids = torch.arange(lo, hi)
    if exclude:
        ids = ids[~torch.isin(ids, torch.tensor(sorted(exclude)))]
    return ids


def induction(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    vocab_size: int | None = None,
    n: int = 16,
    half_len: int = 10,
    seed: int = 0,
    bos_id: int | None = None,
    token_range: tuple[int, int] | None = None,
) -> Task:
    """N repeated-random-token rows of length [BOS] + 2·half_len − 1.

    With a tokenizer, ids are drawn from ordinary tokens (special ids skipped; default range
    [min(1000, V // 4), V)) and the BOS is the tokenizer's if it adds one (`bos_id` overrides). Without one,
    `vocab_size` is required and `bos_id` is optional (default range [0, vocab_size) minus `bos_id`).
    Seeded with a torch.Generator: the same arguments give the same task.

    Roles, (N,) positions: "first_half" = r_1 (start of the first half), "second_start" = the repeated r_1,
    "END" = the last position (predicts r_T).
    """
    if tokenizer is not None:
        require_tokenizer(tokenizer, "induction")
        vocab, default_bos, exclude = _tokenizer_setup(tokenizer)
        vocab_size = vocab if vocab_size is None else vocab_size
        bos_id = default_bos if bos_id is None else bos_id
    elif vocab_size is None:
        raise PathlensError("induction: pass a tokenizer or vocab_size=<model vocabulary size>.")
    else:
        exclude = set()
    if n < 1:
        raise PathlensError(f"induction: empty batch: pass at least one prompt (n >= 1), got n={n}.")
    if half_len < 2:
        raise PathlensError(f"induction: half_len must be at least 2 to have something to repeat, got {half_len}.")
    if bos_id is not None:
        exclude = exclude | {bos_id}
    pool = _candidates(vocab_size, token_range, exclude)
    if len(pool) < 2 * half_len:
        raise PathlensError(
            f"induction: only {len(pool)} candidate tokens but a row needs {2 * half_len} distinct ones; widen "
            "token_range or lower half_len."
        )
    gen = torch.Generator().manual_seed(seed)
    draws = torch.stack([pool[torch.randperm(len(pool), generator=gen)[: 2 * half_len]] for _ in range(n)])
    r, s = draws[:, :half_len], draws[:, half_len:]
    bos = [] if bos_id is None else [torch.full((n, 1), bos_id, dtype=torch.long)]
    clean = torch.cat([*bos, r, r[:, :-1]], dim=1)
    corrupt = torch.cat([*bos, s, r[:, :-1]], dim=1)
    offset, length = len(bos), clean.shape[1]
    full = torch.full((n,), length - 1, dtype=torch.long)
    return Task(
        name="induction",
        clean_ids=clean,
        corrupt_ids=corrupt,
        answer_ids=r[:, -1].clone(),
        wrong_ids=s[:, -1].clone(),
        answer_pos=full,
        attention_mask=torch.ones_like(clean),
        roles={
            "first_half": torch.full((n,), offset, dtype=torch.long),
            "second_start": torch.full((n,), offset + half_len, dtype=torch.long),
            "END": full.clone(),
        },
        meta={
            "seed": seed,
            "half_len": half_len,
            "vocab_size": vocab_size,
            "bos_id": bos_id,
            "token_range": None if token_range is None else list(token_range),
        },
    )
