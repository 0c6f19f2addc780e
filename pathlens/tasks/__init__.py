"""Tasks: what behaviour to explain — clean/corrupted prompt pairs, answers and a metric.

Generators build a `Task` for a given tokenizer: `ioi`, `induction`, `greater_than`, `factual`, or
`build_task(name, tokenizer, **kw)` by name. `make_task` turns your own prompt pairs into a Task, and
`Task.from_ids` your own token ids (no tokenizer). Metrics: `logit_diff` (the default), `NormalizedLogitDiff`,
`Probability`, `KL`, or any callable (logits, task) -> (N,); `answer_logits` reads the scored positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pathlens.errors import PathlensError
from pathlens.tasks.base import Task
from pathlens.tasks.counterfactual import counterfactual_task
from pathlens.tasks.factual import factual
from pathlens.tasks.greater_than import greater_than
from pathlens.tasks.induction import induction
from pathlens.tasks.ioi import ioi
from pathlens.tasks.metrics import (
    KL,
    Metric,
    NormalizedLogitDiff,
    Probability,
    answer_logits,
    logit_diff,
    metric_from_name,
    metric_name,
)
from pathlens.tasks.tokens import make_task, single_token_id, single_token_words

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS: dict[str, Callable[..., Task]] = {
    "ioi": ioi,
    "induction": induction,
    "greater-than": greater_than,
    "factual": factual,
}


def build_task(name: str, tokenizer: PreTrainedTokenizerBase | None, **kw: Any) -> Task:
    """The task generator `name` (a key of TASKS) called with the tokenizer and keyword arguments."""
    if name not in TASKS:
        raise PathlensError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}.")
    return TASKS[name](tokenizer, **kw)


__all__ = [
    "KL",
    "TASKS",
    "Metric",
    "NormalizedLogitDiff",
    "Probability",
    "Task",
    "answer_logits",
    "build_task",
    "counterfactual_task",
    "factual",
    "greater_than",
    "induction",
    "ioi",
    "logit_diff",
    "make_task",
    "metric_from_name",
    "metric_name",
    "single_token_id",
    "single_token_words",
]
