"""The `Task`: what behaviour to explain — clean and corrupted token ids, the answers, and a metric.

A task holds N prompt pairs already tokenized for one model's tokenizer. Rows are right-padded to a common
length P; `answer_pos[i]` is the position whose next-token prediction is scored (the last real token of row i),
so padding never changes a scored value (causal attention: positions before the pad never see it).
Clean and corrupted prompts of one row always have the same length, so positions line up between them.

The default metric, `logit_diff`, lives here with the `answer_logits` reader it is built on, so that `Task`
needs nothing from `pathlens.tasks.metrics` (which holds the other metrics and builds on this module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError

Metric = Callable[[Tensor, "Task"], Tensor]
"""A metric: logits (N, P, V) of a run on a task's rows and the task -> one value per prompt (N,)."""

IdsLike = Tensor | Sequence[Sequence[int]]
"""Token ids of N prompts: an (N, P) tensor or N equal-length lists of ints."""


def answer_logits(logits: Tensor, task: Task) -> Tensor:
    """The (N, V) logits at each row's `answer_pos`, taken from run logits of shape (N, P, V); half-precision
    logits come back in fp32, so metrics (differences, softmaxes) lose nothing more than the model's own rounding."""
    if logits.ndim != 3 or logits.shape[0] != task.n or logits.shape[1] <= int(task.answer_pos.max()):
        raise PathlensError(
            f"metric: expected logits of shape (N={task.n}, P>{int(task.answer_pos.max())}, V) for task "
            f"{task.name!r}, got {tuple(logits.shape)}; pass the full-sequence logits of a run on this task's rows."
        )
    rows = torch.arange(task.n, device=logits.device)
    final = logits[rows, task.answer_pos.to(logits.device)]  # (N, V)
    return final.float() if final.dtype in (torch.float16, torch.bfloat16) else final


def logit_diff(logits: Tensor, task: Task) -> Tensor:
    """Per-prompt logit(answer) − logit(wrong) at the answer position: (N, P, V) -> (N,)."""
    final = answer_logits(logits, task)
    answer = final.gather(1, task.answer_ids.to(final.device)[:, None])[:, 0]
    wrong = final.gather(1, task.wrong_ids.to(final.device)[:, None])[:, 0]
    return answer - wrong


logit_diff.name = "logit_diff"  # type: ignore[attr-defined]


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
        counterfactual_ids: (N,) for interchange interventions (DAS, subspace patching): the token each clean
            (base) prompt should predict once the hypothesised variable takes its value from the corrupted
            (source) prompt; None for tasks that do not define one.
    """

    name: str
    clean_ids: Tensor
    corrupt_ids: Tensor
    answer_ids: Tensor
    wrong_ids: Tensor
    answer_pos: Tensor
    attention_mask: Tensor
    metric: Metric = logit_diff
    prompts: list[str] | None = None
    corrupt_prompts: list[str] | None = None
    roles: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    counterfactual_ids: Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_ids(
        cls,
        clean_ids: IdsLike,
        corrupt_ids: IdsLike,
        answer_ids: int | Sequence[int] | Tensor,
        wrong_ids: int | Sequence[int] | Tensor,
        *,
        name: str = "custom",
        pad_id: int | None = None,
        attention_mask: IdsLike | None = None,
        metric: Metric = logit_diff,
        roles: Mapping[str, Sequence[int] | Tensor] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Task:
        """A task from your own token ids, with no tokenizer (e.g. a model trained on a synthetic vocabulary).

        `clean_ids` / `corrupt_ids` are (N, P) ids, right-padded alike; `answer_ids` / `wrong_ids` one id per
        prompt, or one id for every prompt. The attention mask is all ones, unless `attention_mask` is given
        (1 = real token, right-padded) or `pad_id` marks the trailing padding of `clean_ids`; `answer_pos` is the
        last real token of each row. Raises PathlensError naming the argument whose shape or content is wrong.
        """
        clean = _id_rows(clean_ids, "clean_ids", name)
        corrupt = _id_rows(corrupt_ids, "corrupt_ids", name)
        if corrupt.shape != clean.shape:
            raise PathlensError(
                f"task {name!r}: corrupt_ids has shape {tuple(corrupt.shape)} but clean_ids has "
                f"{tuple(clean.shape)}; each corrupted prompt must have as many tokens as its clean prompt, "
                "padded alike."
            )
        if attention_mask is not None and pad_id is not None:
            raise PathlensError(
                f"task {name!r}: pass attention_mask or pad_id, not both (the mask is derived from pad_id)."
            )
        if attention_mask is not None:
            mask = _given_mask(attention_mask, clean.shape, name)
        elif pad_id is not None:
            mask = _mask_from_pad(clean, corrupt, pad_id, name)
        else:
            mask = torch.ones_like(clean)
        n = clean.shape[0]
        return cls(
            name=name,
            clean_ids=clean,
            corrupt_ids=corrupt,
            answer_ids=_one_per_row(answer_ids, "answer_ids", n, name),
            wrong_ids=_one_per_row(wrong_ids, "wrong_ids", n, name),
            answer_pos=mask.sum(1) - 1,
            attention_mask=mask,
            metric=metric,
            roles=role_positions(name, roles, n),
            meta=dict(meta or {}),
        )

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
        if self.counterfactual_ids is not None and (
            self.counterfactual_ids.shape != (n,)
            or self.counterfactual_ids.is_floating_point()
            or self.counterfactual_ids.dtype == torch.bool
            or bool((self.counterfactual_ids < 0).any())
        ):
            raise PathlensError(
                f"task {self.name!r}: counterfactual_ids must be ({n},) non-negative integer token ids (one label "
                f"per pair), got {self.counterfactual_ids.dtype} of shape {tuple(self.counterfactual_ids.shape)}."
            )
        if self.attention_mask.shape != (n, p):
            raise PathlensError(
                f"task {self.name!r}: attention_mask must have shape ({n}, {p}), "
                f"got {tuple(self.attention_mask.shape)}."
            )
        for fname in ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "answer_pos", "attention_mask"):
            t = getattr(self, fname)
            if t.is_floating_point() or t.dtype == torch.bool:
                raise PathlensError(f"task {self.name!r}: {fname} must hold integers, got {t.dtype}.")
        if int(self.answer_pos.min()) < 0 or int(self.answer_pos.max()) >= p:
            raise PathlensError(f"task {self.name!r}: answer_pos must lie in [0, {p - 1}].")
        for fname in ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids"):
            t = getattr(self, fname)
            if bool((t < 0).any()):
                raise PathlensError(
                    f"task {self.name!r}: {fname} holds a negative token id ({int(t.min())}) at row "
                    f"{int((t < 0).nonzero()[0, 0])}; token ids count from 0."
                )
        if bool(((self.attention_mask != 0) & (self.attention_mask != 1)).any()):
            raise PathlensError(f"task {self.name!r}: attention_mask must hold only 0 (padding) and 1 (real token).")
        scored = self.attention_mask[torch.arange(n), self.answer_pos]
        if bool((scored == 0).any()):
            row = int((scored == 0).nonzero()[0, 0])
            raise PathlensError(
                f"task {self.name!r}: row {row} scores position {int(self.answer_pos[row])}, which is padding "
                "(attention_mask 0 there); answer_pos must be a real token — the last one of the prompt."
            )
        same = self.answer_ids == self.wrong_ids
        if bool(same.any()):
            row = int(same.nonzero()[0, 0])
            raise PathlensError(
                f"task {self.name!r}: row {row} has the same answer and wrong answer (token "
                f"{int(self.answer_ids[row])}), so its logit difference is always 0; give each prompt a wrong answer "
                "that differs from its answer."
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise PathlensError unless every token id of the task (prompts and answers) is below `vocab_size`, naming
        the first offending field, row and id."""
        for fname in ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "counterfactual_ids"):
            t = getattr(self, fname)
            if t is None:
                continue
            bad = t >= vocab_size
            if bool(bad.any()):
                where = bad.nonzero()[0]
                raise PathlensError(
                    f"task {self.name!r}: {fname} row {int(where[0])} holds token id {int(t[tuple(where)])}, outside "
                    f"the model's vocabulary (0..{vocab_size - 1}); build the task with this model's tokenizer."
                )

    def rows(self, index: Tensor | slice | list[int]) -> Task:
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
            counterfactual_ids=None if self.counterfactual_ids is None else pick(self.counterfactual_ids),
        )

    def tile(self, k: int) -> Task:
        """The task repeated k times along the batch (row r*N + i is prompt i): for K variants in one forward."""
        return self.rows(torch.arange(self.n).repeat(k))

    def with_metric(self, metric: Metric) -> Task:
        return replace(self, metric=metric)

    def score(self, logits: Tensor) -> Tensor:
        """Per-prompt metric values (N,) for logits (N, P, V) of a run on this task's rows."""
        return self.metric(logits, self)


def role_positions(name: str, roles: Mapping[str, Sequence[int] | Tensor] | None, n: int) -> dict[str, Tensor]:
    """`roles` as (N,) long position tensors, one per role; PathlensError if a role does not give N positions."""
    out = {k: torch.as_tensor(v, dtype=torch.long) for k, v in (roles or {}).items()}
    for role, pos in out.items():
        if pos.shape != (n,):
            raise PathlensError(
                f"task {name!r}: role {role!r} must give one position per prompt ({n},), got {tuple(pos.shape)}."
            )
    return out


def _id_rows(value: IdsLike, arg: str, name: str) -> Tensor:
    """`value` as a non-empty (N, P) long tensor of integers; PathlensError naming `arg` otherwise."""
    try:
        ids = torch.as_tensor(value)
    except (ValueError, TypeError) as err:
        raise PathlensError(
            f"task {name!r}: {arg} could not be read as an (N, P) array of token ids ({err}); rows of different "
            "lengths must be right-padded to one length (pass pad_id or attention_mask to mark the padding)."
        ) from err
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise PathlensError(f"task {name!r}: {arg} must hold integer token ids, got dtype {ids.dtype}.")
    if ids.ndim != 2 or 0 in ids.shape:
        raise PathlensError(
            f"task {name!r}: {arg} must be a non-empty (N, P) array (N prompts of P tokens), got shape "
            f"{tuple(ids.shape)}; for a single prompt pass [ids]."
        )
    return ids.long()


def _one_per_row(value: int | Sequence[int] | Tensor, arg: str, n: int, name: str) -> Tensor:
    """`value` as (N,) long ids: one per prompt, or a single id repeated for every prompt."""
    ids = torch.as_tensor(value)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise PathlensError(f"task {name!r}: {arg} must hold integer token ids, got dtype {ids.dtype}.")
    if ids.ndim == 0:
        return ids.long().expand(n).clone()
    if ids.shape != (n,):
        raise PathlensError(
            f"task {name!r}: {arg} must give one token id per prompt, shape ({n},), or a single id; got shape "
            f"{tuple(ids.shape)}."
        )
    return ids.long()


def _given_mask(value: IdsLike, shape: torch.Size, name: str) -> Tensor:
    """A user's attention mask checked to be (N, P), 0/1 and right-padded with a real token in every row."""
    mask = torch.as_tensor(value)
    if mask.shape != shape:
        raise PathlensError(
            f"task {name!r}: attention_mask must have the shape of clean_ids {tuple(shape)}, got {tuple(mask.shape)}."
        )
    mask = mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise PathlensError(f"task {name!r}: attention_mask must hold only 0 (padding) and 1 (real token).")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        row = int((mask[:, 1:] > mask[:, :-1]).any(1).nonzero()[0])
        raise PathlensError(
            f"task {name!r}: attention_mask row {row} has a real token after padding; tasks are right-padded "
            "(real tokens first, then padding), so move each row's padding to its end."
        )
    if bool((mask[:, 0] == 0).any()):
        row = int((mask[:, 0] == 0).nonzero()[0])
        raise PathlensError(f"task {name!r}: attention_mask row {row} has no real token; drop the row.")
    return mask


def _mask_from_pad(clean: Tensor, corrupt: Tensor, pad_id: int, name: str) -> Tensor:
    """The right-padding mask of `clean`: 1 up to each row's last token that is not `pad_id`, 0 after it.

    A pad id inside a prompt (e.g. an EOS used as pad) stays a real token; only the trailing run is padding.
    """
    p = clean.shape[1]
    positions = torch.arange(1, p + 1)  # (P,)
    lengths = ((clean != pad_id).long() * positions).max(1).values  # (N,) last real position + 1, 0 if none
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0])
        raise PathlensError(f"task {name!r}: clean_ids row {row} is all pad_id ({pad_id}); drop the row.")
    mask = (positions[None] <= lengths[:, None]).long()  # (N, P)
    longer = ((mask == 0) & (corrupt != pad_id)).any(1)  # (N,)
    if bool(longer.any()):
        row = int(longer.nonzero()[0])
        raise PathlensError(
            f"task {name!r}: corrupt_ids row {row} has tokens where clean_ids row {row} is padded (pad_id "
            f"{pad_id}); each corrupted prompt must have as many tokens as its clean prompt, padded alike."
        )
    return mask
