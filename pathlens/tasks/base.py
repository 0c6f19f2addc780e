"""The `Task`: what behaviour to explain — clean and corrupted token ids, the answers, and a metric.

A task holds N prompt pairs already tokenized for one model's tokenizer. Rows are right-padded to a common
length P; `answer_pos[i]` is the position whose next-token prediction is scored (the last real token of row i),
so padding never changes a scored value (causal attention: positions before the pad never see it).
Clean and corrupted prompts of one row always have the same length, so positions line up between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError

if TYPE_CHECKING:
    from pathlens.tasks.metrics import Metric


@dataclass
class Task:
    """N clean/corrupted prompt pairs with their answers and a metric.

    Attributes:
        name: short name (e.g. "ioi").
        clean_ids: (N, P) long token ids of the clean prompts, right-padded.
        corrupt_ids: (N, P) long token ids of the corrupted prompts, same padding as `clean_ids`.
        answer_ids: (N,) token id of the correct next token.
        wrong_ids: (N,) token id of the incorrect next token (e.g. the subject name in IOI).
        answer_pos: (N,) position whose logits are scored (the last real token of each row).
        attention_mask: (N, P) 1 for real tokens, 0 for padding (shared by clean and corrupt).
        metric: callable (logits (N, P, V), task) -> (N,) per-prompt value; logit difference by default.
        prompts / corrupt_prompts: the texts, for reports (None for token-only tasks).
        roles: named token positions per row, e.g. {"IO": (N,), "S1": (N,), "S2": (N,), "END": (N,)}.
        meta: generator settings (seed, templates, ...), saved with results.
    """

    name: str
    clean_ids: Tensor
    corrupt_ids: Tensor
    answer_ids: Tensor
    wrong_ids: Tensor
    answer_pos: Tensor
    attention_mask: Tensor
    metric: Callable[[Tensor, "Task"], Tensor] | None = None
    prompts: list[str] | None = None
    corrupt_prompts: list[str] | None = None
    roles: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric is None:
            from pathlens.tasks.metrics import logit_diff

            self.metric = logit_diff
        self.validate()

    @property
    def n(self) -> int:
        return int(self.clean_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean_ids.shape[1])

    def validate(self) -> None:
        """Check shapes and dtypes; raise PathlensError naming the offending field and the fix."""
        if self.clean_ids.ndim != 2 or self.clean_ids.shape[0] == 0:
            raise PathlensError(
                f"task {self.name!r}: clean_ids must be a non-empty (N, P) tensor, got shape "
                f"{tuple(self.clean_ids.shape)}; build the task with at least one prompt."
            )
        if self.corrupt_ids.shape != self.clean_ids.shape:
            raise PathlensError(
                f"task {self.name!r}: clean and corrupted token ids differ in shape "
                f"({tuple(self.clean_ids.shape)} vs {tuple(self.corrupt_ids.shape)}); each corrupted prompt "
                "must have the same number of tokens as its clean prompt — pad or align them (see "
                "pathlens.tasks.make_task, which checks this per row)."
            )
        n, p = self.clean_ids.shape
        for fname in ("answer_ids", "wrong_ids", "answer_pos"):
            t = getattr(self, fname)
            if t.shape != (n,):
                raise PathlensError(f"task {self.name!r}: {fname} must have shape ({n},), got {tuple(t.shape)}.")
        if self.attention_mask.shape != (n, p):
            raise PathlensError(
                f"task {self.name!r}: attention_mask must have shape ({n}, {p}), "
                f"got {tuple(self.attention_mask.shape)}."
            )
        if int(self.answer_pos.min()) < 0 or int(self.answer_pos.max()) >= p:
            raise PathlensError(f"task {self.name!r}: answer_pos must lie in [0, {p - 1}].")

    def rows(self, index: Tensor | slice | list[int]) -> "Task":
        """A task with only the given rows (same metric, roles sliced alike)."""
        idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)

        def pick(t: Tensor) -> Tensor:
            return t[idx]

        def pick_list(xs: list[str] | None) -> list[str] | None:
            if xs is None:
                return None
            if isinstance(idx, slice):
                return xs[idx]
            return [xs[int(i)] for i in idx]

        return replace(
            self,
            clean_ids=pick(self.clean_ids),
            corrupt_ids=pick(self.corrupt_ids),
            answer_ids=pick(self.answer_ids),
            wrong_ids=pick(self.wrong_ids),
            answer_pos=pick(self.answer_pos),
            attention_mask=pick(self.attention_mask),
            prompts=pick_list(self.prompts),
            corrupt_prompts=pick_list(self.corrupt_prompts),
            roles={k: pick(v) for k, v in self.roles.items()},
        )

    def tile(self, k: int) -> "Task":
        """The task repeated k times along the batch (row r*N + i is prompt i): for K variants in one forward."""
        return self.rows(torch.arange(self.n).repeat(k))

    def with_metric(self, metric: "Metric | Callable[[Tensor, Task], Tensor]") -> "Task":
        return replace(self, metric=metric)

    def score(self, logits: Tensor) -> Tensor:
        """Per-prompt metric values (N,) for logits (N, P, V) of a run on this task's rows."""
        assert self.metric is not None
        return self.metric(logits, self)
