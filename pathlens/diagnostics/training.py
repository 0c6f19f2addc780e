"""Interventions held during training: clamp or ablate chosen heads' patterns, values or outputs at every step while
the model's parameters train (seed: "What needs to go right for an induction head?", Singh et al. 2024).

`train(model, batches, optimizer, steps, interventions=...)` is the documented loop: it holds
`model.session(interventions=...)` across the optimizer steps — every forward of the model, and so every gradient,
sees the interventions — and steps out of the session only to evaluate at checkpoints (an evaluation such as a head
detector runs its own session, with the same interventions passed to it). The model is in train mode inside and
returns to the mode it had; no hook outlives the call, also after an exception.

The same loop by hand, for any other recipe:

    with model.session(interventions=[Intervention("L0.H1.pattern", Replace(perfect))]):
        for step in range(steps):
            loss = model.hf(input_ids=ids, labels=labels).loss
            optimizer.zero_grad(); loss.backward(); optimizer.step()

Pattern writes need an architecture whose attention goes through the transformers attention interface
(`model.arch.qkv == "interface"`, e.g. Llama-style models and induction-2l's attention-only model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.progress import Progress
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.hooks import HookSession
from pathlens.interventions import Intervention
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.sites import Site

Batch = tuple[Tensor, Tensor]
"""(input_ids (b, p), labels (b, p)); labels −100 where no loss is taken (the model shifts them itself)."""


@dataclass(frozen=True)
class Training:
    """What `train` recorded: the loss at every step, Scores (step,), and the evaluation at each checkpoint, Scores
    (checkpoint, measure) whose `checkpoint` coords are the step numbers (empty without `evaluate`)."""

    loss: Scores
    checkpoints: Scores

    def save(self, folder: str | os.PathLike[str]) -> Path:
        out = Path(os.fspath(folder))
        self.loss.save(out / "loss")
        self.checkpoints.save(out / "checkpoints")
        write_text(out / "training.json", json.dumps({"format": "pathlens.Training", "parts": ["loss", "checkpoints"]}))
        return out

    @staticmethod
    def load(folder: str | os.PathLike[str]) -> Training:
        out = Path(os.fspath(folder))
        if not (out / "training.json").is_file():
            raise PathlensError(f"{out} holds no training.json; pass the folder a Training was saved to.")
        return Training(loss=Scores.load(out / "loss"), checkpoints=Scores.load(out / "checkpoints"))


def uniform_pattern(p: int) -> Tensor:
    """(1, p, p) causal uniform attention: query i attends 1/(i+1) to every key j <= i."""
    return (torch.tril(torch.ones(p, p)) / torch.arange(1, p + 1)[:, None])[None]


def previous_token_pattern(p: int) -> Tensor:
    """(1, p, p) a perfect previous-token head: query i attends to i−1 (query 0 to itself)."""
    pattern = torch.diag_embed(torch.ones(p - 1), offset=-1)
    pattern[0, 0] = 1.0
    return pattern[None]


def _batch_source(batches: Callable[[int], Batch] | Iterable[Batch]) -> Callable[[int], Batch]:
    if callable(batches):
        return batches
    iterator: Iterator[Batch] = iter(batches)

    def next_batch(step: int) -> Batch:
        try:
            return next(iterator)
        except StopIteration as err:
            raise PathlensError(f"train: the batches ran out at step {step}; give as many batches as steps.") from err

    return next_batch


def train(
    model: Model,
    batches: Callable[[int], Batch] | Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    steps: int,
    *,
    interventions: Sequence[Intervention] = (),
    cache: Sequence[Site | str] = (),
    objective: Callable[[Model, Tensor, Any], Tensor] | None = None,
    learning_rate: Callable[[int], float] | None = None,
    evaluate: Callable[[Model, int], dict[str, float]] | None = None,
    every: int = 100,
    on_step: Callable[[int, HookSession, float], None] | None = None,
    progress: bool = False,
) -> Training:
    """Train `model.hf` for `steps` optimizer steps with `interventions` applied at every forward.

    batches: a function step → (input_ids, labels), or an iterable of such pairs.
    objective: (model, loss, output) → the tensor to minimise (default: the model's own loss), e.g. to add a penalty.
    learning_rate: step → rate, set on every parameter group before the step.
    evaluate: (model, step) → {measure: value}, called outside the session at step 0, every `every` steps and after
        the last step; pass the same interventions to whatever it runs if it should see them.
    on_step: (step, session, loss) after each forward, inside the session: e.g. read `session.cache` (`cache` names
        the sites the session reads).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PathlensError(f"train: steps={steps!r}; give a positive number of optimizer steps.")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise PathlensError(f"train: every={every!r}; give a positive checkpoint interval.")
    next_batch = _batch_source(batches)
    was_training = model.hf.training
    losses: list[float] = []
    rows: list[tuple[int, dict[str, float]]] = []
    marks = sorted({0, *range(every, steps, every), steps})
    try:
        with Progress(disable=not progress, transient=True) as bar:
            job = bar.add_task(f"training {steps} steps", total=steps)
            for begin, end in zip(marks[:-1], marks[1:], strict=True):
                if evaluate is not None:
                    rows.append((begin, _evaluated(model, evaluate, begin)))
                model.hf.train()
                with model.session(interventions=interventions, cache=cache, grad=False) as session:
                    for step in range(begin, end):
                        losses.append(
                            _step(model, session, next_batch(step), optimizer, objective, learning_rate, step)
                        )
                        if on_step is not None:
                            on_step(step, session, losses[-1])
                        bar.advance(job)
            if evaluate is not None:
                rows.append((steps, _evaluated(model, evaluate, steps)))
    finally:
        model.hf.train(was_training)
    return _record(model, losses, rows, interventions)


def _evaluated(model: Model, evaluate: Callable[[Model, int], dict[str, float]], step: int) -> dict[str, float]:
    model.hf.eval()
    with torch.no_grad():
        return {k: float(v) for k, v in evaluate(model, step).items()}


def _step(
    model: Model,
    session: HookSession,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    objective: Callable[[Model, Tensor, Any], Tensor] | None,
    learning_rate: Callable[[int], float] | None,
    step: int,
) -> float:
    ids, labels = batch
    if learning_rate is not None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
    with torch.enable_grad():
        output = model.hf(input_ids=ids.to(model.device), labels=labels.to(model.device))
        loss = output.loss
        target = loss if objective is None else objective(model, loss, output)
        optimizer.zero_grad(set_to_none=True)
        target.backward()
    optimizer.step()
    return float(loss.detach())


def _record(
    model: Model, losses: list[float], rows: list[tuple[int, dict[str, float]]], interventions: Sequence[Intervention]
) -> Training:
    meta = {"model": model.name, "interventions": [f"{iv.site}: {type(iv.op).__name__}" for iv in interventions]}
    loss = Scores(
        torch.tensor(losses, dtype=torch.float64), ("step",), {"step": list(range(len(losses)))}, "loss", "train", meta
    )
    measures = sorted({k for _, values in rows for k in values})
    grid = torch.tensor([[values.get(k, float("nan")) for k in measures] for _, values in rows], dtype=torch.float64)
    checkpoints = Scores(
        grid.reshape(len(rows), len(measures)),
        ("checkpoint", "measure"),
        {"checkpoint": [step for step, _ in rows], "measure": measures},
        "value",
        "train",
        meta,
    )
    return Training(loss=loss, checkpoints=checkpoints)


def plot_runs(
    runs: dict[str, Training],
    measure: str | None = None,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    smooth: int = 25,
) -> Figure:
    """Loss curves of several runs (left; a running mean over `smooth` steps) and one checkpoint measure per run
    (right), e.g. the induction head's score under each clamp."""
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for name, run in runs.items():
        loss = run.loss.values.double().numpy()
        window = max(1, min(smooth, loss.size))
        smoothed = np.convolve(loss, np.ones(window) / window, mode="valid")
        left.plot(np.arange(smoothed.size) + window - 1, smoothed, label=name)
        if measure is not None and measure in run.checkpoints.coords["measure"]:
            values = run.checkpoints.sel(measure=measure).values.numpy()
            right.plot(run.checkpoints.coords["checkpoint"], values, marker="o", label=name)
    left.set_xlabel("step")
    left.set_ylabel(f"training loss (running mean of {smooth})")
    left.legend(fontsize=8)
    right.set_xlabel("step")
    right.set_ylabel(measure or "")
    right.legend(fontsize=8)
    fig.suptitle(title or "training with interventions")
    if path is not None:
        fig.savefig(os.fspath(path), dpi=150)
    return fig
