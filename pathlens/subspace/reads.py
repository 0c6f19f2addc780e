"""Reading a site at each prompt's scored position, and running many patched variants of a task in one batch.

Every subspace method works at each row's last real token (`Task.answer_pos`, where IOI's END sits and where DAS
is trained). `answer_values` reads a site there for the clean (base) or corrupted (source) prompts; `run_variants`
runs K interventions — each a function of the task rows it patches — as K·R-row forwards chunked to a token
budget, and returns the logits at the scored position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention
from pathlens.model import Model
from pathlens.sites import Site
from pathlens.tasks.base import Task

Prompts = Literal["clean", "corrupt"]
VariantFn = Callable[[Tensor, slice], "Intervention | None"]
"""A variant: (task rows (R,), its batch rows in the K·R-row forward) -> the intervention, or None (unpatched)."""


def row_chunks(n: int, tokens_per_row: int, max_batch_tokens: int) -> list[Tensor]:
    """Consecutive row index chunks (each (R,)) whose R·tokens_per_row fits `max_batch_tokens` (at least 1 row)."""
    if max_batch_tokens < 1:
        raise PathlensError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}.")
    size = max(1, max_batch_tokens // max(1, tokens_per_row))
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


def answer_values(
    model: Model, task: Task, site: Site | str, prompts: Prompts = "clean", max_batch_tokens: int = 2048
) -> Tensor:
    """The value of `site` at each row's scored position (N, *cell) for the clean or corrupted prompts."""
    resolved = model.resolve(site)
    ids = task.clean_ids if prompts == "clean" else task.corrupt_ids
    parts = []
    for rows in row_chunks(task.n, task.seq_len, max_batch_tokens):
        run = model.run(ids[rows], attention_mask=task.attention_mask[rows], cache=[resolved])
        value = run.cache[resolved]  # (R, P, *cell)
        parts.append(value[torch.arange(rows.numel()), task.answer_pos[rows].to(value.device)].detach())
    return torch.cat(parts)


def scored_logits(
    model: Model, task: Task, rows: Tensor, k: int, interventions: Sequence[Intervention], grad: bool
) -> Tensor:
    """Logits (K·R, V) at each row's scored position for K copies of task `rows` run with `interventions`."""
    pos = task.answer_pos[rows]  # (R,)
    kept = torch.unique(pos)
    run = model.run(
        task.clean_ids[rows].repeat(k, 1),
        attention_mask=task.attention_mask[rows].repeat(k, 1),
        interventions=interventions,
        grad=grad,
        logits_at=kept,
    )
    at = torch.searchsorted(kept, pos).repeat(k).to(run.logits.device)  # (K·R,)
    return run.logits[torch.arange(k * rows.numel(), device=run.logits.device), at]


def run_variants(model: Model, task: Task, variants: Sequence[VariantFn], max_batch_tokens: int = 2048) -> list[Tensor]:
    """Logits at the scored position (N, V) of the clean prompts under each variant, K variants per forward."""
    k = len(variants)
    outs: list[list[Tensor]] = [[] for _ in range(k)]
    for rows in row_chunks(task.n, k * task.seq_len, max_batch_tokens):
        r = int(rows.numel())
        ivs = [iv for i, fn in enumerate(variants) if (iv := fn(rows, slice(i * r, (i + 1) * r))) is not None]
        with torch.no_grad():
            logits = scored_logits(model, task, rows, k, ivs, grad=False)  # (K·R, V)
        for i in range(k):
            outs[i].append(logits[i * r : (i + 1) * r])
    return [torch.cat(o) for o in outs]
