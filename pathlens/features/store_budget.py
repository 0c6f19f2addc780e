"""What collecting an activation store costs in memory, and the batch and shard sizes a `max_memory=` budget allows.

A collection holds, for its whole life, the token windows (`fixed`: the ids and one transient copy of them, made
when they are checked against the store's windows file or hashed). Each batch then adds, per window, what the
forward keeps alive at the peak of a block call (`patching.budget.forward_activation`: the same per-token figure
the patching sweeps use; under no grad only one block's activations live at a time, so the number of blocks run
does not multiply it), the logits when a site needs the whole model (no early stop: 2·V per token, the logits and
their upcast), and the cached values of every stored site (kept by the session until the batch is copied out).
A shard adds, per window, its buffer of rows and, when the buffer is serialized, a copy of the same size (the
file's bytes, kept until written). `stream` holds no shard, but its consumer holds the previous batch's rows
while the next forward runs, so two batches of rows count.

The plan (`StoreCost.plan`): the batch gets at most half of what the budget leaves after `fixed` (with the
smallest shard it needs), and at most `MAX_BATCH_TOKENS` tokens per forward (larger batches are no faster on a
CPU); the shard gets the rest, in whole batches, and at most `MAX_SHARD_BYTES` per file (the shuffled loader keeps
several shards in memory). `store_plan(model, sites, windows, max_memory)` is what `pathlens plan` prints. These
are estimates from shapes, upper bounds by construction: the tests check the peak `pathlens.memory.TensorPeak`
measures (plus the serialized shard, which is bytes and not a tensor) stays under the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.features.corpus import Windows
from pathlens.features.store_work import probe_widths, resolve_sites, runs_whole_model
from pathlens.memory import megabytes, parse_bytes
from pathlens.model import Model
from pathlens.patching.budget import element_size, forward_activation
from pathlens.sites import Site

__all__ = ["MAX_BATCH_TOKENS", "MAX_SHARD_BYTES", "StoreCost", "StorePlan", "store_cost", "store_plan"]

MAX_BATCH_TOKENS = 4096
"""Most tokens one forward runs under a budget (a CPU forward is no faster per token beyond ~1k)."""
MAX_SHARD_BYTES = 256 * 2**20
"""Most bytes of one shard file under a budget (the shuffled loader holds `buffer_shards` of them)."""
_LOGIT_COPIES = 2  # the logits and their float upcast


@dataclass(frozen=True)
class StorePlan:
    """Windows per forward (`batch_size`) and per shard (`shard_windows`) under `budget` bytes, the estimated
    peak, the forwards over all windows and the least budget that collects (or streams) one window at a time."""

    batch_size: int
    shard_windows: int
    peak_bytes: int
    forwards: int
    least_bytes: int
    budget: int


@dataclass(frozen=True)
class StoreCost:
    """Bytes a collection holds throughout (`fixed`), per window of a batch (`per_window`: the forward and the
    cached sites), per window of a shard (`stored_per_window`: its rows in the stored dtype; the serialized copy is
    as large again), over `n_windows` windows of `context` tokens. With `shards=False` (streaming) no shard is
    held and the consumer's previous batch of rows counts instead."""

    fixed: int
    per_window: int
    stored_per_window: int
    n_windows: int
    context: int
    shards: bool = True

    @property
    def batch_window(self) -> int:
        """Bytes one window adds to a batch, with the smallest shard it needs (a shard holds whole batches)."""
        return self.per_window + 2 * self.stored_per_window

    @property
    def least(self) -> int:
        """The smallest budget that runs one window per forward (and per shard)."""
        return self.fixed + self.batch_window

    def peak(self, batch_size: int, shard_windows: int) -> int:
        """The estimated peak with batches of `batch_size` windows and shards of `shard_windows`."""
        if not self.shards:
            return self.fixed + batch_size * self.batch_window
        return self.fixed + batch_size * self.per_window + 2 * shard_windows * self.stored_per_window

    def plan(self, budget: int) -> StorePlan:
        """Batch and shard sizes under `budget` bytes (see the module docstring); PathlensError naming the least
        budget if one window does not fit."""
        if budget < self.least:
            what = "collect" if self.shards else "stream"
            raise PathlensError(
                f"max_memory={megabytes(budget)} MB is too small to {what} one window of {self.context} tokens: it "
                f"needs at least {megabytes(self.least)} MB ({self.least} bytes: the forward and the cached sites "
                f"{megabytes(self.per_window)} MB, the window's rows {megabytes(self.stored_per_window)} MB"
                f"{' twice (buffer and file)' if self.shards else ' twice (this batch and the previous one)'}, the "
                f"token ids {megabytes(self.fixed)} MB); raise max_memory, or store fewer or narrower sites, a "
                "shorter context or a smaller dtype."
            )
        room = budget - self.fixed
        cap = max(1, MAX_BATCH_TOKENS // self.context)
        if not self.shards:  # the whole budget goes to the batch
            batch = min(self.n_windows, cap, room // self.batch_window)
            return StorePlan(batch, 0, self.peak(batch, 0), math.ceil(self.n_windows / batch), self.least, budget)
        batch = min(self.n_windows, cap, max(1, room // (2 * self.batch_window)))
        by_budget = (room - batch * self.per_window) // (2 * self.stored_per_window * batch)
        by_file = max(1, MAX_SHARD_BYTES // (self.stored_per_window * batch))
        shard = batch * min(math.ceil(self.n_windows / batch), by_budget, by_file)
        forwards = math.ceil(self.n_windows / batch)
        return StorePlan(batch, shard, self.peak(batch, shard), forwards, self.least, budget)


def store_cost(
    model: Model,
    widths: dict[str, int],
    n_windows: int,
    context: int,
    dtype: torch.dtype = torch.float32,
    skip: int = 1,
    stop_early: bool = True,
    shards: bool = True,
) -> StoreCost:
    """The memory cost of collecting (`shards=True`) or streaming the sites of `widths` ({site: width per token})
    over `n_windows` windows of `context` tokens, stored in `dtype`, leaving `skip` rows out of each window."""
    e, stored = element_size(model), torch.empty(0, dtype=dtype).element_size()
    width = sum(widths.values())
    whole = runs_whole_model(list(widths)) or not stop_early
    per_token = e * forward_activation(model, context) + (e * _LOGIT_COPIES * model.vocab_size if whole else 0)
    cached = width * (e + (stored if stored != e else 0))  # the session's values, cast when the dtypes differ
    per_window = context * (per_token + cached + 8)  # + the window's token ids
    return StoreCost(
        fixed=2 * 8 * n_windows * context if shards else 0,  # a stream reads the caller's ids as they are
        per_window=per_window,
        stored_per_window=(context - skip) * width * stored,
        n_windows=n_windows,
        context=context,
        shards=shards,
    )


def store_plan(
    model: Model,
    sites: Sequence[Site | str] | Site | str,
    windows: Windows | Tensor | tuple[int, int],
    max_memory: int | str,
    *,
    dtype: torch.dtype = torch.float32,
    skip_first: bool = True,
    stop_early: bool = True,
) -> StorePlan:
    """The batch size, shard size, estimated peak and forwards of `collect(model, sites, windows, max_memory=...)`:
    `windows` are the token windows, or just (n_windows, context) to plan before tokenizing a corpus."""
    names = resolve_sites(model, sites)
    if isinstance(windows, tuple):
        n_windows, context = windows
    else:
        ids = windows.ids if isinstance(windows, Windows) else windows
        n_windows, context = int(ids.shape[0]), int(ids.shape[1])
    if n_windows < 1 or context < 2:
        raise PathlensError(f"windows=({n_windows}, {context}): plan at least one window of at least 2 tokens.")
    widths = probe_widths(model, names, torch.zeros((1, 2), dtype=torch.long))
    cost = store_cost(model, widths, n_windows, context, dtype, int(skip_first), stop_early)
    return cost.plan(parse_bytes(max_memory))
