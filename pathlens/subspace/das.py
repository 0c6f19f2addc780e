"""Distributed alignment search (DAS): learn the k-dim subspace whose interchange moves the output to the
counterfactual label (Geiger et al.; the training of Makelov et al. 2311.17030, METHODS §2).

The learned object is an orthonormal basis B (d, k) = the first k rows of a rotation R (Rᵀ[(Ru)[:k]; (Rw)[k:]] is
the same patch as w + (u − w)BBᵀ). It is parametrised as B = QR(A).Q of an unconstrained (d, k) matrix A, which
spans every k-dim subspace and costs O(d·k²) per step instead of the O(d³) of a full d×d orthogonal
parametrisation; A starts with unit-length columns, so that an Adam step of size lr per entry turns the subspace
about as fast as the rotation parametrisation's step per rotation angle.

Each step runs the base prompts (by default only their last tokens, after a key/value cache of the earlier ones:
`LastTokenRunner`) with the subspace patch at the site (at each row's last token,
source values read once from the source prompts: the model is frozen, so they never change) through the
library's session mechanism, takes the cross-entropy of the patched logits against each pair's counterfactual
label, and differentiates with `torch.autograd.grad` with respect to A only — the model's parameters are never
updated, never receive a `.grad`, and no hook outlives the call. Adam, a linear learning-rate decay, a seeded
initialisation and a seeded order of pairs make it reproducible; a batch is split into chunks of at most
`max_batch_tokens` tokens whose gradients are summed (the memory budget).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Project
from pathlens.model import Model
from pathlens.sites import Site
from pathlens.subspace.basis import Subspace
from pathlens.subspace.reads import answer_values, row_chunks, scored_logits
from pathlens.tasks.base import Task
from pathlens.tasks.counterfactual import require_counterfactuals


@dataclass(frozen=True)
class DASSettings:
    """Training settings; defaults follow the paper's notebook (Adam lr 0.01, linear decay to 0.1×, 30 epochs,
    batch 20)."""

    k: int = 1
    epochs: int = 30
    batch_size: int = 20
    lr: float = 0.01
    end_factor: float = 0.1
    seed: int = 0
    max_batch_tokens: int = 2048
    cached_prefix: bool = True

    def check(self) -> None:
        for name in ("k", "epochs", "batch_size", "max_batch_tokens"):
            if int(getattr(self, name)) < 1:
                raise PathlensError(f"das: {name} must be at least 1, got {getattr(self, name)}.")
        if not self.lr > 0 or not 0 < self.end_factor <= 1:
            raise PathlensError(
                f"das: lr must be > 0 and end_factor in (0, 1], got lr={self.lr}, end_factor={self.end_factor}."
            )


def orthonormal(raw: Tensor) -> Tensor:
    """The orthonormal basis (d, k) spanning the columns of `raw` (differentiable)."""
    return torch.linalg.qr(raw).Q


class LastTokenRunner:
    """Runs the task's base prompts' last tokens after a key/value cache of their earlier tokens.

    A DAS patch sits at each row's last token, and the model is frozen, so every earlier position computes the
    same numbers at every step: they are run once (rows left-padded so that every last token is in the final
    column), and a step runs one token per row through the model's own forward with that key/value cache — about
    1/P of a full forward and its backward. `usable` is False (and DAS runs full forwards) for a model whose
    forward takes no key/value cache, for one-token prompts, for a cache it lays out otherwise (sliding-window
    layers), or when the cached step does not reproduce the
    full run's logits on the first rows (atol 1e-3), which is checked at construction.
    """

    def __init__(self, model: Model, task: Task, max_batch_tokens: int):
        self.model, self.task = model, task
        n, p = task.n, task.seq_len
        lengths = task.answer_pos + 1  # (N,) real tokens per row
        self.ids = torch.zeros(n, p, dtype=torch.long)
        self.mask = torch.zeros(n, p, dtype=torch.long)
        for i in range(n):
            size = int(lengths[i])
            self.ids[i, p - size :] = task.clean_ids[i, :size]
            self.mask[i, p - size :] = 1
        self.positions = (lengths - 1)[:, None]  # (N, 1)
        self.kv: list[tuple[Tensor, Tensor]] = []
        params = inspect.signature(model.hf.forward).parameters
        self.cache_arg = next((name for name in ("cache", "past_key_values") if name in params), None)
        self.usable = p > 1 and self.cache_arg is not None
        if self.usable:
            self.kv = self._prefix(max_batch_tokens)
            self.usable = bool(self.kv) and self._reproduces(torch.arange(min(4, n)))

    def _prefix(self, max_batch_tokens: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer (keys, values) (N, G, P − 1, d_head) of every row's tokens before its last one."""
        parts: list[list[tuple[Tensor, Tensor]]] = []
        for rows in row_chunks(self.task.n, self.task.seq_len, max_batch_tokens):
            mask = self.mask[rows, :-1]
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                out = self.model.hf(
                    input_ids=self.ids[rows, :-1].to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    position_ids=position_ids.to(self.model.device),
                    use_cache=True,
                )
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            layers = getattr(cache, "layers", None)
            if not layers or not all(
                isinstance(getattr(x, "keys", None), Tensor) and x.keys.shape[-2] == self.task.seq_len - 1
                for x in layers
            ):
                return []
            parts.append([(x.keys.detach(), x.values.detach()) for x in layers])
        return [
            (torch.cat([c[i][0] for c in parts]), torch.cat([c[i][1] for c in parts])) for i in range(len(parts[0]))
        ]

    def _reproduces(self, rows: Tensor) -> bool:
        with torch.no_grad():
            try:
                cached = self.logits(rows, [])
            except RuntimeError:  # a cache layout the rebuilt DynamicCache does not match (e.g. sliding windows)
                return False
            full = scored_logits(self.model, self.task, rows, 1, [], grad=False)
        return bool(torch.allclose(cached.float(), full.float(), atol=1e-3, rtol=1e-3))

    def logits(self, rows: Tensor, interventions: list[Intervention]) -> Tensor:
        """Logits (R, V) at each row's last token with `interventions` (positions "last") in force."""
        device = self.model.device
        assert self.cache_arg is not None
        cache = {self.cache_arg: DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in self.kv])}
        with self.model.session(interventions=interventions, grad=torch.is_grad_enabled()):
            out = self.model.hf(
                input_ids=self.ids[rows, -1:].to(device),
                attention_mask=self.mask[rows].to(device),
                position_ids=self.positions[rows].to(device),
                use_cache=True,
                **cache,
            )
        return out.logits[:, -1]


class DASTrainer:
    """The parts of DAS a step needs, built once: the site, the source values at the scored positions (N, d),
    the labels, and the trainable (d, k) parameter. `loss_and_grad(rows)` is one step's work."""

    def __init__(self, model: Model, task: Task, site: Site | str, settings: DASSettings, init: Tensor | None = None):
        settings.check()
        self.model, self.task, self.settings = model, task, settings
        self.labels = require_counterfactuals(task, "das")
        self.site = model.resolve(site, write=True)
        self.sources = answer_values(model, task, self.site, "corrupt", settings.max_batch_tokens)  # (N, d)
        if self.sources.ndim != 2:
            raise PathlensError(
                f"das: {self.site} holds a {tuple(self.sources.shape[1:])} value per position; DAS learns directions "
                "over one axis — pick one head (e.g. 'L9.H6.z') or a residual/MLP site."
            )
        d = int(self.sources.shape[1])
        if settings.k > d:
            raise PathlensError(f"das: k={settings.k} exceeds the width {d} of {self.site}.")
        self.generator = torch.Generator().manual_seed(settings.seed)
        if init is None:
            start = torch.randn(d, settings.k, generator=self.generator, dtype=torch.float32) / math.sqrt(d)
        else:
            start = init.detach().to(torch.float32).reshape(d, -1).clone()
            if start.shape[1] != settings.k:
                raise PathlensError(f"das: init has {start.shape[1]} columns, expected k={settings.k}.")
        self.raw = start.requires_grad_(True)  # (d, k)
        self.runner = LastTokenRunner(model, task, settings.max_batch_tokens) if settings.cached_prefix else None
        if self.runner is not None and not self.runner.usable:
            self.runner = None

    def loss_and_grad(self, rows: Tensor) -> tuple[float, Tensor]:
        """Mean cross-entropy over `rows` (B,) of the patched logits against the counterfactual labels, and its
        gradient with respect to the (d, k) parameter; chunks of the batch are summed."""
        task, total, loss_sum = self.task, torch.zeros_like(self.raw), 0.0
        chunks = row_chunks(int(rows.numel()), task.seq_len, self.settings.max_batch_tokens)
        for part in chunks:
            chunk = rows[part]
            basis = orthonormal(self.raw)  # (d, k)
            source = self.sources[chunk][:, None]  # (R, 1, d)
            iv = Intervention(self.site, Project(basis, source), positions="last")
            if self.runner is not None:
                with torch.enable_grad():
                    logits = self.runner.logits(chunk, [iv])  # (R, V)
            else:
                logits = scored_logits(self.model, task, chunk, 1, [iv], grad=True)  # (R, V)
            labels = self.labels[chunk].to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") / rows.numel()
            (grad,) = torch.autograd.grad(loss, self.raw)
            total += grad
            loss_sum += float(loss.detach())
        return loss_sum, total

    def basis(self) -> Tensor:
        with torch.no_grad():
            return orthonormal(self.raw.detach())


def das(
    model: Model,
    task: Task,
    site: Site | str,
    k: int = 1,
    *,
    epochs: int = 30,
    batch_size: int = 20,
    lr: float = 0.01,
    end_factor: float = 0.1,
    seed: int = 0,
    max_batch_tokens: int = 2048,
    init: Tensor | None = None,
    cached_prefix: bool = True,
) -> Subspace:
    """Learn a k-dim subspace at `site` (at each row's last token) by DAS on `task`'s counterfactual pairs.

    task: base prompts (clean), source prompts (corrupted) and `counterfactual_ids` (e.g.
        `pathlens.tasks.ioi(tok, corrupt="position", split="train")`); a task without labels is refused.
    cached_prefix: run each step on the last tokens only, after a key/value cache of the earlier ones
        (`LastTokenRunner`; the full forward when the model cannot). Returns a `Subspace` with the training
    settings and the loss per epoch in `meta`.
    """
    settings = DASSettings(k, epochs, batch_size, lr, end_factor, seed, max_batch_tokens, cached_prefix)
    trainer = DASTrainer(model, task, site, settings, init)
    opt = torch.optim.Adam([trainer.raw], lr=lr)
    steps = epochs * math.ceil(task.n / batch_size)
    schedule = torch.optim.lr_scheduler.LinearLR(opt, 1.0, end_factor, total_iters=steps)
    curve = []
    for _ in range(epochs):
        order = torch.randperm(task.n, generator=trainer.generator)
        epoch_loss = 0.0
        for start in range(0, task.n, batch_size):
            rows = order[start : start + batch_size]
            loss, grad = trainer.loss_and_grad(rows)
            trainer.raw.grad = grad
            opt.step()
            schedule.step()
            epoch_loss += loss * rows.numel() / task.n
        curve.append(epoch_loss)
    trainer.raw.grad = None
    meta = {
        "finder": "das",
        "model": model.name,
        "task": task.name,
        "n_pairs": task.n,
        "k": k,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "end_factor": end_factor,
        "seed": seed,
        "loss_per_epoch": curve,
        "parametrisation": "QR of a (d, k) matrix",
        "cached_prefix": trainer.runner is not None,
    }
    return Subspace(trainer.basis(), trainer.site, "last", meta)
