"""Task metrics: callables `(logits (N, P, V), task) -> (N,)` giving one value per prompt.

Every metric reads the logits at `task.answer_pos` (the last real token of each right-padded row), so padding
never enters a score. A metric is any callable with that signature; the ones here also carry a `name`
(and `__name__`) so results can be labelled. Nothing needs registering: pass your own function anywhere a
metric is accepted. The default metric `logit_diff` and the `answer_logits` reader are defined with `Task` in
`pathlens.tasks.base` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.tasks.base import Metric, Task, answer_logits, logit_diff


class NormalizedLogitDiff:
    """(LD − corrupt) / (clean − corrupt): 1 at the clean baseline, 0 at the corrupted one.

    `clean` and `corrupt` are the (batch-mean) logit differences of the unpatched clean and corrupted runs, so
    patching effects from tasks of different scale can be compared on one axis.
    """

    name = "normalized_logit_diff"
    __name__ = name

    def __init__(self, clean: float | Tensor, corrupt: float | Tensor) -> None:
        clean, corrupt = float(clean), float(corrupt)
        if clean == corrupt:
            raise PathlensError(
                f"NormalizedLogitDiff: clean and corrupted logit differences are equal ({clean}), so the "
                "normalization divides by zero; check that the corruption changes the answer (e.g. a different "
                "corrupt mode) or use the plain logit_diff metric."
            )
        self.clean = clean
        self.corrupt = corrupt

    def __call__(self, logits: Tensor, task: Task) -> Tensor:
        return (logit_diff(logits, task) - self.corrupt) / (self.clean - self.corrupt)

    def __repr__(self) -> str:
        return f"NormalizedLogitDiff(clean={self.clean}, corrupt={self.corrupt})"


class Probability:
    """Softmax probability of the answer token at the answer position: (N, P, V) -> (N,)."""

    name = "prob"
    __name__ = name

    def __call__(self, logits: Tensor, task: Task) -> Tensor:
        probs = answer_logits(logits, task).float().softmax(-1)
        return probs.gather(1, task.answer_ids.to(probs.device)[:, None])[:, 0]

    def __repr__(self) -> str:
        return "Probability()"


class KL:
    """KL(reference ‖ run) over the vocabulary at the answer position, one value per row.

    `reference_logits` are the logits of the reference run (usually the clean, unpatched model), either the
    full (N, P, V) tensor (read at `task.answer_pos`) or the already-selected (N, V) answer-position logits.
    The value is 0 when the run matches the reference and grows as the run's next-token distribution departs.
    """

    name = "kl"
    __name__ = name

    def __init__(self, reference_logits: Tensor) -> None:
        if reference_logits.ndim not in (2, 3):
            raise PathlensError(
                f"KL: reference_logits must be (N, P, V) or (N, V), got shape {tuple(reference_logits.shape)}."
            )
        self.reference_logits = reference_logits.detach()

    def _reference_log_probs(self, task: Task) -> Tensor:
        ref = self.reference_logits
        final = answer_logits(ref, task) if ref.ndim == 3 else ref
        if final.shape[0] != task.n:
            raise PathlensError(
                f"KL: reference has {final.shape[0]} rows but task {task.name!r} has {task.n}; build the metric "
                "from a run on the same rows (use task.rows / task.tile alike on both)."
            )
        return final.float().log_softmax(-1)

    def __call__(self, logits: Tensor, task: Task) -> Tensor:
        run = answer_logits(logits, task).float().log_softmax(-1)
        ref = self._reference_log_probs(task).to(run.device)
        if ref.shape != run.shape:
            raise PathlensError(
                f"KL: reference vocabulary size {ref.shape[-1]} differs from the run's {run.shape[-1]}; "
                "compare runs of the same model."
            )
        return (ref.exp() * (ref - run)).sum(-1)

    def __repr__(self) -> str:
        return f"KL(reference_logits={tuple(self.reference_logits.shape)})"


_BY_NAME: dict[str, Callable[[], Metric]] = {
    "logit_diff": lambda: logit_diff,
    "prob": Probability,
}


def metric_from_name(name: str) -> Metric:
    """The metric called `name` ("logit_diff" or "prob"); metrics with arguments are built from their classes."""
    if name not in _BY_NAME:
        raise PathlensError(
            f"unknown metric {name!r}; valid names: {', '.join(sorted(_BY_NAME))}. For normalized logit "
            "difference or KL build NormalizedLogitDiff(clean, corrupt) or KL(reference_logits), or pass any "
            "callable (logits, task) -> (N,) tensor."
        )
    return _BY_NAME[name]()


def metric_name(metric: Metric) -> str:
    """A label for any metric: its `name`, else its `__name__`, else its class name."""
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


__all__ = [
    "KL",
    "Metric",
    "NormalizedLogitDiff",
    "Probability",
    "answer_logits",
    "logit_diff",
    "metric_from_name",
    "metric_name",
]
