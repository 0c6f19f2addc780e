"""What one process computes for the activation store, here or on an executor's worker.

`site_batches` runs windows through the model in batches, one forward per batch for every site, read through a
`HookSession` and stopped after the last block a site lives in. `shard_bytes` turns the windows of one shard into
the bytes of its safetensors file; `collect` calls it for every shard it runs in this process, and a Ray worker
calls the same function through `StoreJob` / `StoreRunner` (the `ChunkWork` / `ChunkRunner` of
`pathlens.patching.executor`: one chunk = one shard), so a shard made anywhere is the same file, byte for byte,
given the same torch threads. A worker hands the file back as one uint8 tensor (the runner protocol returns one
tensor): its sites are packed by the safetensors format itself, and the driver writes those bytes unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.hooks import HookSession
from pathlens.model import Model
from pathlens.patching.executor import tensor_fingerprint
from pathlens.sites import Site, parse_site

__all__ = ["StoreJob", "StoreRunner", "probe_widths", "resolve_sites", "shard_bytes", "shard_tensors", "site_batches"]


class _Collected(Exception):
    """Raised by the early-stop hook once every requested site has been read: the rest of the forward is skipped."""


def resolve_sites(model: Model, sites: Sequence[Site | str] | Site | str) -> list[str]:
    """The canonical names of `sites` on `model`; PathlensError for none, a repeat, or a site without a fixed
    width per token (attention patterns)."""
    listed = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not listed:
        raise PathlensError("give at least one site to collect, e.g. sites=['L6.mlp_post'].")
    names: list[str] = []
    for site in listed:
        resolved = model.resolve(site)
        if resolved.kind == "attn_pattern":
            raise PathlensError(
                f"site {resolved}: attention patterns have no fixed width per token; store q/k/v instead."
            )
        if str(resolved) in names:
            raise PathlensError(f"site {resolved} is listed twice; list each site once.")
        names.append(str(resolved))
    return names


def runs_whole_model(names: Sequence[str]) -> bool:
    """Whether reading `names` needs the forward to reach the logits (no early stop)."""
    return any(parse_site(n).kind in ("logits", "module") for n in names)


def last_block(model: Model, names: Sequence[str]) -> int:
    """The last block (0-based) a forward must run to read `names`: -1 when only the embedding is read, the last
    layer when a site needs the whole model."""
    if runs_whole_model(names):
        return model.n_layers - 1
    layers = [s.layer for s in map(parse_site, names) if s.layer is not None]
    return max(layers, default=-1)


def _stop_hooks(model: Model, names: Sequence[str]) -> list[tuple[str, str, Callable[..., Any]]]:
    """A hook that ends the forward after the last block any site lives in (none if a site needs the whole model)."""
    if runs_whole_model(names):
        return []

    def stop(*_: Any) -> None:
        raise _Collected

    last = last_block(model, names)
    if last < 0:
        return [(f"{model.arch.blocks}.0", "pre", stop)]
    return [(f"{model.arch.blocks}.{last}", "fwd", stop)]


def site_batches(
    model: Model,
    names: Sequence[str],
    ids: Tensor,
    batch_size: int,
    *,
    dtype: torch.dtype | None = None,
    stop_early: bool = True,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """{site: (B, P, ...)} for windows [start, stop) of `ids` (n, P), `batch_size` windows per forward, cached in
    `dtype` (None: the model's own). The dict is emptied when the next batch is asked for, so a consumer that copies
    the values out holds one batch at a time; the hooks exist only during each forward."""
    stop = len(ids) if stop is None else stop
    reads = [parse_site(s) for s in names]
    hooks = _stop_hooks(model, names) if stop_early else []
    for first in range(start, stop, batch_size):
        batch = ids[first : min(first + batch_size, stop)]  # (B, P)
        session = HookSession(model, reads, cache_dtype=dtype, extra_hooks=hooks)
        with session:
            try:
                model.forward(batch, None, session)
            except _Collected:
                pass
        cached = {name: session.cache[name] for name in names}
        del session
        yield cached
        cached.clear()


def probe_widths(model: Model, names: Sequence[str], ids: Tensor) -> dict[str, int]:
    """Each site's width per token (its trailing dimensions flattened), from one forward on two tokens."""
    batch = next(site_batches(model, names, ids[:1, :2], 1))
    return {name: math.prod(value.shape[2:]) for name, value in batch.items()}


@dataclass(frozen=True)
class StoreJob:
    """How to compute a store's shards on any process holding the model: the sites with their widths, the token
    windows, the rows left out of each window (`skip`), the batch and shard sizes (windows), the stored dtype and
    the early stop. Picklable (no weights, no activations): the `ChunkWork` a Ray worker rebuilds."""

    sites: tuple[str, ...]
    widths: tuple[int, ...]
    ids: Tensor  # (n_windows, context) int64
    skip: int
    batch_windows: int
    shard_windows: int
    dtype: torch.dtype
    stop_early: bool

    @property
    def description(self) -> str:
        return f"collecting {', '.join(self.sites)}"

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.ids) / self.shard_windows)

    @property
    def rows_per_window(self) -> int:
        return int(self.ids.shape[1]) - self.skip

    def windows_of(self, index: int) -> tuple[int, int]:
        """The windows [first, last) of shard `index`."""
        first = index * self.shard_windows
        return first, min(first + self.shard_windows, len(self.ids))

    def build(self, model: Model) -> StoreRunner:
        return StoreRunner(model, self)


def shard_tensors(
    model: Model, job: StoreJob, index: int, on_batch: Callable[[int], None] | None = None
) -> dict[str, Tensor]:
    """Shard `index` of `job` as {site: (rows, width)} in the job's dtype, rows in window order; `on_batch(windows)`
    is called with the shard's windows done after every batch. Each batch is copied (and cast) straight from the
    cache into the shard's buffer: one batch and the buffer are alive at a time."""
    first, last = job.windows_of(index)
    per = job.rows_per_window
    rows = (last - first) * per
    buffers = {name: torch.empty((rows, w), dtype=job.dtype) for name, w in zip(job.sites, job.widths, strict=True)}
    row = 0
    for cached in site_batches(
        model, job.sites, job.ids, job.batch_windows, stop_early=job.stop_early, start=first, stop=last
    ):
        for name in job.sites:
            value = cached[name][:, job.skip :]  # (b, P', ...)
            b = value.shape[0]
            buffers[name][row : row + b * per].view(b, per, -1).copy_(value.reshape(b, per, -1))  # (b, P', width)
        row += b * per
        if on_batch is not None:
            on_batch(row // per)
    return buffers


def shard_bytes(model: Model, job: StoreJob, index: int, on_batch: Callable[[int], None] | None = None) -> bytes:
    """The safetensors file of shard `index` of `job` (the buffers are freed once serialized)."""
    return safetensors.torch.save(shard_tensors(model, job, index, on_batch))


class StoreRunner:
    """A store job on one process: `run(i)` is shard i's file as a uint8 tensor; `fingerprint` tells a worker
    whose model reads other activations (other weights or dtype) from the driver's."""

    def __init__(self, model: Model, job: StoreJob) -> None:
        self.model, self.job = model, job

    def fingerprint(self) -> str:
        """SHA-256 of every site's activations on the first two tokens of the first window (as cheap as the width
        probe), and of the job's sizes and sites."""
        job = self.job
        probe = next(site_batches(self.model, job.sites, job.ids[:1, :2], 1, stop_early=job.stop_early))
        plan = (job.sites, job.widths, tuple(job.ids.shape), job.skip, job.batch_windows, job.shard_windows)
        return tensor_fingerprint(*(probe[name] for name in job.sites), extra=repr((plan, job.dtype, job.stop_early)))

    def chunk_count(self) -> int:
        return self.job.n_shards

    def run(self, index: int) -> Tensor:
        """Shard `index`'s file bytes, (file size,) uint8."""
        return torch.frombuffer(bytearray(shard_bytes(self.model, self.job, index)), dtype=torch.uint8)
