"""Counterfactual pairs for interchange interventions (DAS, subspace patching): your own data as a `Task`.

An interchange intervention runs a *base* prompt with a variable taken from a *source* prompt; its label is the
token the base should then predict (`Task.counterfactual_ids`). Base prompts are the task's clean prompts and
sources its corrupted ones, so `direction="noise"` patching (the clean run, corrupted activations patched in) is
the interchange intervention. `ioi(..., corrupt="position")` builds such pairs for IOI; `counterfactual_task`
builds them from any prompts (with a tokenizer) or token ids (without one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from pathlens.errors import PathlensError
from pathlens.tasks.base import IdsLike, Task
from pathlens.tasks.tokens import make_task, single_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def counterfactual_task(
    bases: Sequence[str] | IdsLike,
    sources: Sequence[str] | IdsLike,
    labels: Sequence[str | int],
    answers: Sequence[str | int],
    wrongs: Sequence[str | int],
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    name: str = "counterfactual",
    meta: Mapping[str, Any] | None = None,
) -> Task:
    """N base/source pairs with the counterfactual label of each pair.

    bases / sources: prompts (with `tokenizer`) or (N, P) token ids (without); each pair has one token count.
    labels: the token each base should predict after the interchange (a single-token string or an id).
    answers / wrongs: the base's own answer and the competing token; the metric is their logit difference, so
        the fractional logit-difference decrease of a patch is measured on them (for IOI: the base IO and S).
    """
    if len(labels) != len(answers):
        raise PathlensError(
            f"counterfactual_task {name!r}: labels has {len(labels)} entries but answers has {len(answers)}; give "
            "one counterfactual label per pair."
        )
    if tokenizer is not None:
        task = make_task(name, tokenizer, list(bases), list(sources), answers, wrongs, meta=meta)  # type: ignore[arg-type]
        ids = [lab if isinstance(lab, int) else single_token_id(tokenizer, lab, "label") for lab in labels]
    else:
        if any(isinstance(x, str) for x in (*answers, *wrongs, *labels)):
            raise PathlensError(
                f"counterfactual_task {name!r}: labels, answers and wrongs are strings but no tokenizer was given; "
                "pass tokenizer= or token ids."
            )
        task = Task.from_ids(bases, sources, list(answers), list(wrongs), name=name, meta=meta)  # type: ignore[arg-type]
        ids = [int(lab) for lab in labels]
    return replace(task, counterfactual_ids=torch.tensor(ids, dtype=torch.long))


def require_counterfactuals(task: Task, what: str) -> torch.Tensor:
    """The task's counterfactual labels (N,), or a PathlensError saying how to build a task that has them."""
    if task.counterfactual_ids is None:
        raise PathlensError(
            f"{what}: task {task.name!r} has no counterfactual labels (Task.counterfactual_ids); build it with "
            "pathlens.tasks.ioi(..., corrupt='position') or pathlens.tasks.counterfactual_task(bases, sources, "
            "labels, answers, wrongs)."
        )
    return task.counterfactual_ids
