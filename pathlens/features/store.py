"""The activation store: a model's activations at any set of sites over a corpus, on disk or on the fly.

Collect (`collect(model, sites, source, out)`): the corpus's context windows (`pathlens.features.corpus`) run
through the model in batches of `batch_size` windows, one forward per batch for all sites, read through a
`HookSession` (the one hook mechanism). The forward stops once the last requested block has run (`stop_early`):
nothing after it is needed. Rows — one per token, in window order — are gathered into shards of `shard_windows`
windows. The first position of every window is left out (`skip_first`, on by default): with a BOS token it holds
no text, and without one (SmolLM2) it is the attention sink, whose residual stream is ~150 times the norm of the
others (SmolLM2 L12.resid_post: 23,000 vs 140) and would dominate any dictionary trained on the rows.

On disk, in `out/`:

    manifest.json           format, model (name, family, SHA-256 of its weights), sites and their widths, dtype,
                            corpus (name, source, licence, seed, context, SHA-256 of the window ids), batch and
                            shard sizes, token and row counts, and one entry per committed shard: file, first
                            window, windows, rows, SHA-256 of the file
    windows.safetensors     "ids": the token windows (n_windows, context), int64 (for top-activating contexts)
    shard-00000.safetensors one tensor per site, named by the site ("L6.mlp_post"): (rows, width) in `dtype`

Every file is written atomically (`pathlens.results.io`), a shard before the manifest entry that commits it, so a
process killed at any point (SIGKILL included) leaves only committed shards listed. Shard k always holds the same
windows, run in the same batches, so `collect` on the same folder resumes: it checks that the manifest describes
the same model (weights digest), sites, dtype, windows and sizes — refusing a mismatch with an error naming what
differs — re-checks every committed shard's checksum, and computes only the shards that are missing or damaged.
The committed shards are a set, not a prefix: a resume computes whichever are missing. A resumed store is
byte-identical to an uninterrupted one (same machine, same thread count).

On an executor (`executor="ray"` or a `pathlens.distributed.RayExecutor`): each shard is one chunk, computed on a
worker that builds the model from its spec (`store_work.StoreJob`) by the same function as here and returned as
its file's bytes; this process writes each shard as it arrives, in whatever order, then the manifest entry that
commits it, so a killed worker's shards are computed again elsewhere and a shard that arrives twice is written
once. The files and the manifest equal a local run's byte for byte (given the workers' torch threads equal this
process's), and a store started locally finishes on Ray and vice versa.

Memory: `max_memory=` (bytes or "2GB", per process) sets the windows per forward and per shard from the
collection's cost — the forward up to the last block needed, the cached sites, the shard buffer and its
serialized copy (`store_budget`); `store_budget.store_plan` prints the plan before running. Or set them by hand:
`batch_size` windows per forward, and `max_bytes` for the store's buffers (one shard, its serialized copy and one
batch's rows), which sets the shard size without counting the forward.

Read back (`ActivationStore(path)`): `.dataset(site, batch_size, seed)` is a PyTorch `IterableDataset` that visits
the shards in a seeded random order, `buffer_shards` at a time, and shuffles the rows of the buffer, so every epoch
yields every row exactly once in a new order (`.loader(...)` wraps it in a `DataLoader`). `.rows(site)` reads rows
in order; `.check(model=..., sites=...)` refuses a store made from another model or without a site; a shard whose
bytes do not match its checksum is named in the error (each shard is checked on its first read by a store object
and whenever its file changes). `stream(model, sites, windows)` yields the same batches
without touching disk.

Stable API (the SAE trainer builds on it): `collect`, `stream`, `ActivationStore` with `sites`, `widths`, `dtype`,
`n_rows`, `complete`, `context`, `check`, `shard`, `rows`, `dataset`, `loader`, `window_ids`, `origin`, `manifest`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from pathlens.errors import PathlensError
from pathlens.features.corpus import Corpus, Windows, windows
from pathlens.features.store_budget import store_cost
from pathlens.features.store_work import StoreJob, StoreRunner, probe_widths, resolve_sites, shard_bytes, site_batches
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.checkpoint import weights_digest
from pathlens.patching.executor import Executor, resolved_executor
from pathlens.results.io import writable_folder, write_bytes, write_safetensors, write_text
from pathlens.sites import Site, parse_site

__all__ = ["FORMAT", "ActivationStore", "StoreDataset", "collect", "stream"]

FORMAT = "pathlens.ActivationStore"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WINDOWS_FILE = "windows.safetensors"
DEFAULT_MAX_BYTES = 512 * 2**20
DEFAULT_BATCH = 8
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Progress = Callable[[int, int], None]
"""Called with (windows done, windows in total) after every batch (on an executor: after every shard)."""


# ---- on the fly -----------------------------------------------------------------------------------------------


def stream(
    model: Model,
    sites: Sequence[Site | str] | Site | str,
    source: Windows | Tensor,
    *,
    batch_size: int | None = None,
    max_memory: int | str | None = None,
    dtype: torch.dtype = torch.float32,
    skip_first: bool | None = None,
    stop_early: bool = True,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Activations of `sites` over windows [start, stop) of `source`, one batch of `batch_size` windows at a time
    (default 8; or as many as `max_memory` allows, bytes or "2GB": see `store_budget`): {site: (rows, width)} with
    rows = windows × positions, flattened in window order. `skip_first` leaves out each window's position 0 (None:
    only when the windows start with BOS). Nothing touches disk; one forward per batch reads every site, stopped
    after the last block a site lives in (`stop_early`). The hooks exist only during each batch's forward, so a
    partly consumed stream leaves the model as it was."""
    names = resolve_sites(model, sites)
    ids, bos = _ids_and_bos(source)
    skip = int(bos if skip_first is None else skip_first)
    stop = len(ids) if stop is None else stop
    if max_memory is not None:
        if batch_size is not None:
            raise PathlensError(f"pass max_memory={max_memory!r} or batch_size={batch_size!r}, not both.")
        widths = probe_widths(model, names, ids)
        cost = store_cost(model, widths, max(stop - start, 1), ids.shape[1], dtype, skip, stop_early, shards=False)
        batch_size = cost.plan(parse_bytes(max_memory)).batch_size
    batch_size = DEFAULT_BATCH if batch_size is None else batch_size
    _check_batch(batch_size)
    for cached in site_batches(
        model, names, ids, batch_size, dtype=dtype, stop_early=stop_early, start=start, stop=stop
    ):
        out = {}
        for name in names:
            value = cached[name][:, skip:]  # (B, P', ...)
            out[name] = value.reshape(value.shape[0] * value.shape[1], -1)  # (B·P', width)
        yield out


def _ids_and_bos(source: Windows | Tensor) -> tuple[Tensor, bool]:
    wins = source if isinstance(source, Windows) else Windows.of_ids(source)
    return wins.ids, wins.bos


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PathlensError(f"batch_size={batch_size!r}; give a positive number of windows per forward.")


# ---- collect --------------------------------------------------------------------------------------------------


def collect(
    model: Model,
    sites: Sequence[Site | str] | Site | str,
    source: Windows | Tensor | Corpus | str | None,
    out: str | os.PathLike[str],
    *,
    n_tokens: int | None = None,
    context: int = 128,
    seed: int = 0,
    batch_size: int | None = None,
    max_bytes: int | None = None,
    max_memory: int | str | None = None,
    dtype: torch.dtype | str = torch.float32,
    skip_first: bool = True,
    stop_early: bool = True,
    executor: "str | Executor | None" = None,
    progress: Progress | None = None,
) -> "ActivationStore":
    """Run the model over the windows of `source` and store `sites` in `out` (see the module docstring); resumes
    a store already there. `source` is a corpus (then `n_tokens`, `context` and `seed` cut its windows: see
    `corpus.windows`), ready `Windows` or token ids (n, context). Returns the finished store.

    Sizes: `max_memory` (bytes or "2GB", per process) sets the windows per forward and per shard from the
    collection's cost (`store_budget`); or give them by hand: `batch_size` windows per forward (default 8) and
    `max_bytes` for the store's buffers (default 512 MiB), which sets the shard size. `executor` ("ray" or an
    executor object such as `pathlens.distributed.RayExecutor(...)`) computes the shards on its workers, one shard
    per chunk; this process writes each as it arrives, so the files and manifest equal a local run's."""
    names = resolve_sites(model, sites)
    torch_dtype = _dtype(dtype)
    if max_memory is not None and (batch_size is not None or max_bytes is not None):
        given = "batch_size" if batch_size is not None else "max_bytes"
        raise PathlensError(
            f"pass max_memory={max_memory!r} (which sets the batch and shard sizes) or {given}= by hand, not both."
        )
    budget = None if max_memory is None else parse_bytes(max_memory)
    if batch_size is not None:
        _check_batch(batch_size)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise PathlensError(f"max_bytes={max_bytes!r}; give the store's memory budget in bytes.")
    with resolved_executor(executor) as runner:  # a bad executor fails before any file is written
        folder = writable_folder(out, "out=")
        if isinstance(source, Tensor):
            wins = Windows.of_ids(source)
        else:
            wins = source if isinstance(source, Windows) else windows(source, model.tokenizer, context, n_tokens, seed)
        widths = probe_widths(model, names, wins.ids)
        batch, shard_windows, max_bytes = _sizes(
            model, widths, wins, torch_dtype, int(skip_first), stop_early, batch_size, max_bytes, budget
        )
        job = StoreJob(
            tuple(names),
            tuple(widths.values()),
            wins.ids,
            int(skip_first),
            batch,
            shard_windows,
            torch_dtype,
            stop_early,
        )
        manifest = _new_manifest(model, job, wins, widths, max_bytes, budget)
        committed = _resume(folder, manifest)
        _remove_stale_temporaries(folder)
        if not _windows_match(folder, wins):
            write_safetensors(folder / WINDOWS_FILE, {"ids": wins.ids.contiguous()})
        _write_manifest(folder, manifest, committed)
        todo = [k for k in range(job.n_shards) if k not in committed]

        def commit(index: int, data: bytes) -> None:
            """Write shard `index`'s file, then the manifest entry that commits it (once: a repeat is ignored)."""
            if index in committed:
                return
            first, last = job.windows_of(index)
            file = f"shard-{index:05d}.safetensors"
            write_bytes(folder / file, data)
            committed[index] = {
                "file": file,
                "first_window": first,
                "n_windows": last - first,
                "rows": (last - first) * job.rows_per_window,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            _write_manifest(folder, manifest, committed)

        def windows_done() -> int:
            return sum(entry["n_windows"] for entry in committed.values())

        if runner is None:
            for k in todo:
                before = windows_done()
                report = None if progress is None else lambda done, before=before: progress(before + done, len(wins))
                commit(k, shard_bytes(model, job, k, report))
        else:

            def arrived(index: int, values: Tensor) -> None:
                commit(index, values.numpy().tobytes())
                if progress is not None:
                    progress(windows_done(), len(wins))

            runner.run(model, job, StoreRunner(model, job).fingerprint(), todo, arrived)
        missing = [k for k in todo if k not in committed]
        if missing:
            raise PathlensError(f"the executor returned without computing shards {missing[:10]} of this store.")
        return ActivationStore(folder)


def _sizes(
    model: Model,
    widths: dict[str, int],
    wins: Windows,
    dtype: torch.dtype,
    skip: int,
    stop_early: bool,
    batch_size: int | None,
    max_bytes: int | None,
    budget: int | None,
) -> tuple[int, int, int | None]:
    """(windows per forward, windows per shard, the max_bytes used): from the budget's plan, or by hand."""
    if budget is not None:
        plan = store_cost(model, widths, len(wins), wins.context, dtype, skip, stop_early).plan(budget)
        return plan.batch_size, plan.shard_windows, None
    batch, max_bytes = batch_size or DEFAULT_BATCH, max_bytes or DEFAULT_MAX_BYTES
    window_bytes = sum(widths.values()) * dtype.itemsize * wins.context
    return batch, _shard_windows(max_bytes, batch, window_bytes, len(wins)), max_bytes


def _new_manifest(
    model: Model, job: StoreJob, wins: Windows, widths: dict[str, int], max_bytes: int | None, budget: int | None
) -> dict[str, Any]:
    """The manifest of a store of `job` with no shard committed yet."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": model.name, "family": model.arch.family, "weights_sha256": weights_digest(model.hf)},
        "sites": list(job.sites),
        "widths": widths,
        "dtype": _dtype_name(job.dtype),
        "corpus": wins.describe(),
        "context": wins.context,
        "skip_first": bool(job.skip),
        "rows_per_window": job.rows_per_window,
        "batch_windows": job.batch_windows,
        "shard_windows": job.shard_windows,
        "n_windows": len(wins),
        "n_shards": job.n_shards,
        "tokens_total": wins.n_tokens,
        "rows_total": len(wins) * job.rows_per_window,
        "max_bytes": max_bytes,
        "max_memory": budget,
        "shards": [],
        "rows_stored": 0,
        "complete": False,
    }


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise PathlensError(f"dtype={dtype!r}; the store keeps one of {', '.join(DTYPES)}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _shard_windows(max_bytes: int, batch_size: int, window_bytes: int, n_windows: int) -> int:
    """Windows per shard: a whole number of batches such that the shard, its serialized copy and one batch fit in
    `max_bytes`."""
    fits = (max_bytes // window_bytes - batch_size) // 2
    if fits < batch_size:
        need = 3 * batch_size * window_bytes
        raise PathlensError(
            f"max_bytes={max_bytes} is too small: a shard of one batch ({batch_size} windows of {window_bytes} bytes "
            f"of activations), its serialized copy and the next batch need {need} bytes; raise max_bytes or lower "
            "batch_size."
        )
    batches = min(fits // batch_size, math.ceil(n_windows / batch_size))
    return batches * batch_size


# ---- the manifest and resuming ----------------------------------------------------------------------------------

_IDENTITY = (
    ("format", "format"),
    ("format_version", "format version"),
    ("model", "model"),
    ("sites", "sites"),
    ("dtype", "dtype"),
    ("corpus", "corpus windows"),
    ("skip_first", "skip_first"),
    ("batch_windows", "batch size (set by batch_size or max_memory)"),
    ("shard_windows", "shard size (set by max_bytes or max_memory)"),
)


def _resume(folder: Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The committed shards of a store already in `folder` that matches `manifest` (intact ones only); {} if none."""
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    saved = _read_manifest(path)
    for key, what in _IDENTITY:
        if saved.get(key) != manifest[key]:
            raise PathlensError(
                f"{folder} holds a store with a different {what}: it has {_short(saved.get(key))}, this run asks for "
                f"{_short(manifest[key])}. Pass another out= folder (or delete this one) to start a new store."
            )
    committed = {}
    for entry in saved.get("shards", []):
        file = folder / entry["file"]
        if file.is_file() and hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]:
            committed[int(entry["first_window"]) // manifest["shard_windows"]] = entry
    return committed


def _write_manifest(folder: Path, manifest: dict[str, Any], committed: dict[int, dict[str, Any]]) -> None:
    manifest["shards"] = [committed[k] for k in sorted(committed)]
    manifest["rows_stored"] = sum(entry["rows"] for entry in manifest["shards"])
    manifest["complete"] = len(committed) == manifest["n_shards"]
    write_text(folder / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PathlensError(f"{path} cannot be read as JSON ({err}); the store is damaged, collect it again.") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise PathlensError(f"{path} is not an activation store manifest (written by pathlens.features.collect).")
    if saved.get("format_version") != FORMAT_VERSION:
        raise PathlensError(
            f"{path} has store format version {saved.get('format_version')!r}; this pathlens reads {FORMAT_VERSION}."
        )
    return saved


def _windows_match(folder: Path, wins: Windows) -> bool:
    path = folder / WINDOWS_FILE
    if not path.is_file():
        return False
    try:
        ids = safetensors.torch.load(path.read_bytes()).get("ids")
    except Exception:  # a damaged file is rewritten
        return False
    return ids is not None and ids.shape == wins.ids.shape and bool(torch.equal(ids, wins.ids))


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed write left behind (`.<name>.<hex>.tmp`, see results.io)."""
    for tmp in folder.glob(".*.tmp"):
        if tmp.name.startswith((".shard-", f".{MANIFEST}.", f".{WINDOWS_FILE}.")):
            tmp.unlink(missing_ok=True)


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- reading ----------------------------------------------------------------------------------------------------


class ActivationStore:
    """A store written by `collect`, read back: rows in order (`rows`), shards (`shard`), a shuffled
    `dataset`/`loader`, the windows the rows come from (`window_ids`, `origin`). See the module docstring."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.fspath(path)).expanduser()
        if not (self.path / MANIFEST).is_file():
            raise PathlensError(f"{self.path} holds no activation store ({MANIFEST} is missing); collect one first.")
        self.manifest = _read_manifest(self.path / MANIFEST)
        self._verified: dict[str, tuple[int, int, int]] = {}

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.manifest['shards'])}/{self.manifest['n_shards']} shards"
        return (
            f"ActivationStore({str(self.path)!r}, model={self.manifest['model']['name']!r}, sites={self.sites}, "
            f"rows={self.n_rows}, dtype={self.manifest['dtype']}, {state})"
        )

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def widths(self) -> dict[str, int]:
        return dict(self.manifest["widths"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def n_rows(self) -> int:
        """Rows in the committed shards."""
        return int(self.manifest["rows_stored"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def context(self) -> int:
        return int(self.manifest["context"])

    @property
    def n_shards(self) -> int:
        """Committed shards."""
        return len(self.manifest["shards"])

    def check(self, model: Model | None = None, sites: Sequence[Site | str] | Site | str = ()) -> None:
        """Raise PathlensError unless the store was collected from `model` (same name and weights) and holds
        `sites`."""
        if model is not None:
            saved = self.manifest["model"]
            if saved["name"] != model.name or saved["weights_sha256"] != weights_digest(model.hf):
                same = "with different weights" if saved["name"] == model.name else f"not {model.name!r}"
                raise PathlensError(
                    f"store {self.path} was collected from model {saved['name']!r} {same}; collect a store from "
                    "this model (pathlens store --model ...) or pass the model the store was made from."
                )
        for site in [sites] if isinstance(sites, (str, Site)) else sites:
            name = str(parse_site(site))
            if name not in self.manifest["sites"]:
                raise PathlensError(
                    f"store {self.path} holds no site {name}; it holds {self.sites}. Collect {name} or pick one of "
                    "those."
                )

    def shard(self, index: int, sites: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Committed shard `index`'s tensors (only `sites` if given). The file is checked against the manifest's
        checksum the first time this store object reads it, and again whenever the file changes (inode, size or
        modification time); reads after that load only the wanted tensors."""
        entries = self.manifest["shards"]
        if not 0 <= index < len(entries):
            raise PathlensError(
                f"shard {index} is out of range: store {self.path} has {len(entries)} committed shards."
            )
        entry = entries[index]
        file = self.path / entry["file"]
        wanted = self.sites if sites is None else list(sites)
        try:
            stat = file.stat()
            seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if self._verified.get(entry["file"]) == seen:
                with safetensors.safe_open(str(file), "pt") as opened:
                    return {name: opened.get_tensor(name) for name in wanted}
            data = file.read_bytes()
        except OSError as err:
            raise PathlensError(
                f"shard file {file} of store {self.path} cannot be read ({err}); run collect on the folder again "
                "to recompute it."
            ) from err
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise PathlensError(
                f"shard file {file} is corrupt: its SHA-256 does not match the one in {MANIFEST}; run collect on the "
                "folder again (with the same settings) to recompute it."
            )
        self._verified[entry["file"]] = seen
        tensors = safetensors.torch.load(data)
        return {name: tensors[name] for name in wanted}

    def rows(self, site: Site | str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of `site` in store order (window by window), (rows, width)."""
        name = str(parse_site(site))
        self.check(sites=[name])
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        parts, offset = [], 0
        for index, entry in enumerate(self.manifest["shards"]):
            lo, hi = offset, offset + entry["rows"]
            offset = hi
            if hi <= start or lo >= stop:
                continue
            parts.append(self.shard(index, [name])[name][max(start, lo) - lo : min(stop, hi) - lo])
        if not parts:
            return torch.empty((0, self.widths[name]), dtype=self.dtype)
        return torch.cat(parts)

    def window_ids(self) -> Tensor:
        """The token windows (n_windows, context) the rows come from."""
        return safetensors.torch.load((self.path / WINDOWS_FILE).read_bytes())["ids"]

    def origin(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(window, position) of each store row index in `rows`: positions in the window (0 is the first token)."""
        per = int(self.manifest["rows_per_window"])
        skip = int(self.manifest["context"]) - per
        starts = torch.tensor([0] + [entry["rows"] for entry in self.manifest["shards"]]).cumsum(0)
        firsts = torch.tensor([entry["first_window"] for entry in self.manifest["shards"]])
        shard = torch.searchsorted(starts[1:], rows, right=True)
        local = rows - starts[shard]
        return firsts[shard] + local // per, local % per + skip

    def dataset(
        self,
        sites: Sequence[Site | str] | Site | str,
        batch_size: int = 4096,
        seed: int = 0,
        shuffle: bool = True,
        buffer_shards: int = 4,
        drop_last: bool = False,
    ) -> "StoreDataset":
        """A PyTorch IterableDataset of shuffled row batches (see `StoreDataset`)."""
        return StoreDataset(self, sites, batch_size, seed, shuffle, buffer_shards, drop_last)

    def loader(
        self, sites: Sequence[Site | str] | Site | str, batch_size: int = 4096, seed: int = 0, **kwargs: Any
    ) -> DataLoader:
        """`dataset(...)` in a DataLoader (batches are made by the dataset: batch_size=None, no workers)."""
        return DataLoader(self.dataset(sites, batch_size, seed, **kwargs), batch_size=None)


class StoreDataset(IterableDataset):
    """Row batches of a store, shuffled across shards: each epoch visits the shards in a seeded random order,
    `buffer_shards` at a time, shuffles the buffered rows and yields batches of `batch_size` rows (the rows left
    over join the next buffer), so every row comes exactly once per epoch. Epoch e's order depends only on (seed,
    e); iterating again starts the next epoch (`epoch` says which comes next; set it to replay one).

    Yields a (batch, width) tensor for one site given as a string, else {site: (batch, width)}. Memory: about
    `buffer_shards` shards (the buffer; each batch gathers its rows from it)."""

    def __init__(
        self,
        store: ActivationStore,
        sites: Sequence[Site | str] | Site | str,
        batch_size: int = 4096,
        seed: int = 0,
        shuffle: bool = True,
        buffer_shards: int = 4,
        drop_last: bool = False,
    ) -> None:
        self.single = isinstance(sites, (str, Site))
        self.sites = [str(parse_site(s)) for s in ([sites] if isinstance(sites, (str, Site)) else sites)]
        store.check(sites=self.sites)
        if not self.sites:
            raise PathlensError("give at least one site to read.")
        _check_batch(batch_size)
        if isinstance(buffer_shards, bool) or not isinstance(buffer_shards, int) or buffer_shards < 1:
            raise PathlensError(f"buffer_shards={buffer_shards!r}; give a positive number of shards to mix.")
        if store.n_shards == 0:
            raise PathlensError(f"store {store.path} has no committed shard yet; collect it first.")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.shuffle, self.buffer_shards, self.drop_last = shuffle, buffer_shards, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.store.n_rows, self.batch_size)
        return full + int(bool(rest) and not self.drop_last)

    def __iter__(self) -> Iterator[Tensor | dict[str, Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.store.n_shards
        order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        carry: dict[str, Tensor] | None = None
        for at in range(0, n, self.buffer_shards):
            loaded = [self.store.shard(i, self.sites) for i in order[at : at + self.buffer_shards]]
            parts = ([carry] if carry is not None else []) + loaded
            buffer = {s: torch.cat([p[s] for p in parts]) if len(parts) > 1 else parts[0][s] for s in self.sites}
            rows = buffer[self.sites[0]].shape[0]  # buffer: {site: (rows, width)}
            full = rows // self.batch_size * self.batch_size
            if self.shuffle:  # each batch gathers its rows of one permutation: no shuffled copy of the buffer
                perm = torch.randperm(rows, generator=gen)
                for lo in range(0, full, self.batch_size):
                    yield self._batch({s: v[perm[lo : lo + self.batch_size]] for s, v in buffer.items()})
                carry = {s: v[perm[full:]] for s, v in buffer.items()}
            else:
                for lo in range(0, full, self.batch_size):
                    yield self._batch({s: v[lo : lo + self.batch_size] for s, v in buffer.items()})
                carry = {s: v[full:] for s, v in buffer.items()}
        if carry is not None and carry[self.sites[0]].shape[0] and not self.drop_last:
            yield self._batch(carry)

    def _batch(self, batch: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:
        return batch[self.sites[0]] if self.single else batch
