"""What collecting an activation store will cost before it runs (`pathlens plan --method store`); see
`patching.estimate` for the `Estimate` it returns.

`collect` runs one probe forward on two tokens (the sites' widths), then the windows in batches, each batch one
forward stopped after the last block a site lives in; shards hold whole batches, so the forwards are the probe and
ceil(windows / batch). Under `max_memory` the batch and shard sizes, the peak and the least budget are the store's
own plan (`features.store_budget.store_plan`); by hand (`batch_size`, `max_bytes`), the shard holds as many whole
batches as `max_bytes` allows for it, its serialized copy and one batch (as `collect` sizes it), and the peak is
the store's cost model at those sizes. Time: one timed batch of the store's own forward (stopped early), times the
batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from pathlens.errors import PathlensError
from pathlens.features.corpus import Windows
from pathlens.features.store import DEFAULT_BATCH, DEFAULT_MAX_BYTES
from pathlens.features.store_budget import store_cost, store_plan
from pathlens.features.store_work import probe_widths, resolve_sites, site_batches
from pathlens.model import Model
from pathlens.patching.estimate import Estimate
from pathlens.sites import Site


def _shard_windows(max_bytes: int, batch: int, window_bytes: int, n_windows: int) -> int:
    """Windows per shard by hand: whole batches such that the shard, its serialized copy and one batch of rows fit
    `max_bytes` (the rule `collect` applies without `max_memory`)."""
    fits = (max_bytes // window_bytes - batch) // 2
    if fits < batch:
        raise PathlensError(
            f"max_bytes={max_bytes} is too small: a shard of one batch ({batch} windows of {window_bytes} bytes), "
            "its serialized copy and the next batch do not fit; raise max_bytes or lower batch_size."
        )
    return batch * min(fits // batch, math.ceil(n_windows / batch))


def _batch_seconds(model: Model, names: Sequence[str], ids: torch.Tensor, stop_early: bool) -> float:
    """Seconds of one batch of the store's forward on `ids` (the second of two)."""
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        next(site_batches(model, names, ids, len(ids), stop_early=stop_early))
        seconds.append(time.perf_counter() - start)
    return seconds[-1]


def estimate_store(
    model: Model,
    sites: Sequence[Site | str] | Site | str,
    windows: Windows | torch.Tensor,
    *,
    batch_size: int | None = None,
    max_bytes: int | None = None,
    max_memory: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    skip_first: bool = True,
    stop_early: bool = True,
) -> Estimate:
    """The estimate of `collect(model, sites, windows, batch_size=..., max_bytes=..., max_memory=..., dtype=...)`
    (module docstring); runs a probe forward and two timed batches."""
    if max_memory is not None and (batch_size is not None or max_bytes is not None):
        raise PathlensError(
            "pass max_memory (which sets the batch and shard sizes) or batch_size / max_bytes, not both."
        )
    names = resolve_sites(model, sites)
    ids = windows.ids if isinstance(windows, Windows) else windows
    n, context = int(ids.shape[0]), int(ids.shape[1])
    widths = probe_widths(model, names, ids)
    cost = store_cost(model, widths, n, context, dtype, int(skip_first), stop_early)
    if max_memory is not None:
        plan = store_plan(model, names, (n, context), max_memory, dtype=dtype, skip_first=skip_first)
        batch, shard, peak, least = plan.batch_size, plan.shard_windows, plan.peak_bytes, plan.least_bytes
    else:
        batch = batch_size or DEFAULT_BATCH
        window_bytes = sum(widths.values()) * torch.empty(0, dtype=dtype).element_size() * context
        shard = _shard_windows(max_bytes or DEFAULT_MAX_BYTES, batch, window_bytes, n)
        peak, least = cost.peak(batch, shard), cost.least
    batches = math.ceil(n / batch)
    seconds = _batch_seconds(model, names, ids[:batch], stop_early)
    return Estimate(
        method="store",
        forwards=1 + batches,
        backwards=0,
        max_batch_tokens=min(batch, n) * context,
        peak_bytes=peak,
        least_bytes=least,
        seconds=seconds * batches,
        forward_seconds=seconds,
        units={"windows": n, "windows per forward": batch, "shards": math.ceil(n / shard)},
        notes=("peak: the forward, the cached sites and the store's buffers; the serialized shard is bytes, counted",),
    )
