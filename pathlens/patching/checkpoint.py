"""Resumable sweep progress in an `out=` folder, and the checks that the folder holds this very sweep, intact.

A folder holds three files:
- `sweep.json`: what the sweep is — the model's weights (SHA-256 over every parameter and buffer), the
  dictionaries spliced into it (`splice_records`: sites and SHA-256, so latents are never resumed with another
  dictionary's), the task's tensors (SHA-256), the settings (direction, ablation, positions, the planned dims
  and coords, ...) and the metric's behaviour (its per-row values on the base and source runs, which tell apart
  two metrics of one name).
  Written last when a sweep starts, so a folder with a `sweep.json` holds a whole checkpoint.
- `progress.safetensors`: the per-variant, per-row metric values (float64) and the finished chunks, as of the
  last merge (when the sweep started, resumed or finished);
- `progress.log`: while the sweep runs or after it stopped early, an `AppendLog` of the chunks finished since
  (chunk index + values): one small append per chunk instead of rewriting the state. It is merged into
  `progress.safetensors` on resume, and merged and removed when the sweep finishes.

A killed process loses no finished chunk (the appends are with the operating system); a machine crash loses at
most the chunks of the last `SYNC_SECONDS` (the log is fsynced that often), which a resume runs again. A resume
that finds different weights, task, settings or metric, or a damaged file, raises saying which and how to start
over (`overwrite=True`, `pathlens patch --overwrite`); values are replayed bit for bit, so a resumed sweep's
scores equal an uninterrupted one's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torch import Tensor, nn

from pathlens.arch.base import own_tensor
from pathlens.errors import PathlensError
from pathlens.hooks import Splice
from pathlens.results.io import AppendLog, write_bytes, write_safetensors
from pathlens.tasks.base import Task

__all__ = ["SWEEP_VERSION", "Checkpoint", "ChunkRows", "splice_records", "task_digest", "weights_digest"]

SWEEP_VERSION = 2
"""Version of the checkpoint layout; a folder written by another layout is not resumed."""
SYNC_SECONDS = 5.0
"""The progress log is fsynced at most this often (and when a sweep stops)."""
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-6
"""How close the metric's values on the base and source runs must come to the saved ones for a resume."""
START_OVER = "pass overwrite=True (pathlens patch --overwrite) to discard the saved progress and start over"
_INDEX = struct.Struct("<q")


class ChunkRows(Protocol):
    """What the checkpoint needs of a planned chunk: which variants and task rows its values cover."""

    @property
    def variants(self) -> tuple[int, ...]: ...
    @property
    def row_start(self) -> int: ...
    @property
    def row_stop(self) -> int: ...


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the name, dtype, shape and raw bytes of every parameter and buffer of `module`.

    About 0.5 s for SmolLM2's 135M parameters on one core: the cost of knowing that a resume uses the same model.
    Weights accelerate offloaded (meta tensors) are read through their module's hook (`own_tensor`)."""
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    return _digest((name, _loaded(module, name, t)) for name, t in named)


def _loaded(root: nn.Module, name: str, tensor: Tensor) -> Tensor:
    """`tensor` (the parameter or buffer `name` of `root`), loaded if accelerate offloaded it."""
    if tensor.device.type != "meta":
        return tensor
    owner, _, leaf = name.rpartition(".")
    return own_tensor(root.get_submodule(owner), leaf)


def splice_records(splices: Sequence[Splice]) -> list[dict[str, Any]]:
    """What a checkpoint records of the dictionaries spliced into the model: each one's latent family, source and
    target sites, width and SHA-256 over its tensors (parameters and buffers of a module; else its tensor
    attributes)."""
    return [
        {
            "latents": str(sp.latents),
            "source": str(sp.source),
            "target": str(sp.target),
            "width": sp.width,
            "sha256": _dictionary_digest(sp.dictionary),
        }
        for sp in splices
    ]


def _dictionary_digest(dictionary: object) -> str:
    if isinstance(dictionary, nn.Module):
        return weights_digest(dictionary)
    return _digest(sorted((k, v) for k, v in vars(dictionary).items() if isinstance(v, Tensor)))


def task_digest(task: Task) -> str:
    """SHA-256 over every tensor of `task` (ids, answers, positions, mask and roles), with dtypes and shapes."""
    return _digest(
        [
            ("clean_ids", task.clean_ids),
            ("corrupt_ids", task.corrupt_ids),
            ("answer_ids", task.answer_ids),
            ("wrong_ids", task.wrong_ids),
            ("answer_pos", task.answer_pos),
            ("attention_mask", task.attention_mask),
            *sorted((f"roles.{k}", v) for k, v in task.roles.items()),
        ]
    )


def _digest(named: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over the name, dtype, shape and raw bytes of each tensor."""
    digest = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


class Checkpoint:
    """A sweep's per-row metric values (n_variants, n_rows; NaN until run) and finished chunks, kept in `out`.

    Without a folder it only holds them in memory. Use: `open` (checks the saved weights, task and settings
    before any forward), then `start` after the base runs (checks the metric, loads the progress), `record`
    per chunk, and `close` (merges the log when the sweep finished)."""

    def __init__(self, out: Path | None, identity: dict[str, Any], n_variants: int, n_rows: int, resume: bool):
        self.out = out
        self.identity = identity
        self.resume = resume
        self.values = torch.full((n_variants, n_rows), float("nan"), dtype=torch.float64)
        self.done = torch.zeros(0, dtype=torch.uint8)
        self.chunks: Sequence[ChunkRows] = ()
        self._saved: dict[str, Any] = {}
        self._log: AppendLog | None = None

    @classmethod
    def open(
        cls, out: Path | None, identity: dict[str, Any], n_variants: int, n_rows: int, overwrite: bool = False
    ) -> Checkpoint:
        """The checkpoint of the sweep `identity` (weights, task, settings) in `out`.

        A folder holding another sweep raises, naming what differs; a damaged `sweep.json` raises naming it.
        With `overwrite` the folder's progress is discarded (when `start` runs) instead."""
        resume = out is not None and not overwrite and (out / "sweep.json").exists()
        checkpoint = cls(out, identity, n_variants, n_rows, resume)
        if out is not None and resume:
            checkpoint._saved = _read_sweep_json(out / "sweep.json")
            _compare(out, checkpoint._saved, identity)
        return checkpoint

    def start(self, chunks: Sequence[ChunkRows], metric: dict[str, Any]) -> None:
        """Begin recording `chunks` (the sweep's plan). `metric`: its name and per-row values on the base and
        source runs. A resume checks them against the saved ones and loads the progress; a new sweep writes its
        files (`sweep.json` last)."""
        self.chunks = chunks
        self.done = torch.zeros(len(chunks), dtype=torch.uint8)
        if self.out is None:
            return
        sweep_json, state, log = self.out / "sweep.json", self.out / "progress.safetensors", self.out / "progress.log"
        if self.resume:
            _compare_metric(self.out, self._saved["metric"], metric)
            self._load(state, log)
            self._log = self._merge()
            return
        sweep_json.unlink(missing_ok=True)
        log_file = self._merge()
        try:
            write_bytes(sweep_json, json.dumps({**self.identity, "metric": metric}, indent=1).encode())
        except BaseException:
            log_file.close()
            raise
        self._log = log_file

    def record(self, chunk_index: int, values: Tensor) -> None:
        """Store a finished chunk's (variants, rows) values and append them to the log."""
        chunk = self.chunks[chunk_index]
        values = values.double().reshape(len(chunk.variants), chunk.row_stop - chunk.row_start)
        self.values[list(chunk.variants), chunk.row_start : chunk.row_stop] = values
        self.done[chunk_index] = 1
        if self._log is not None:
            self._log.append(_INDEX.pack(chunk_index) + values.contiguous().numpy().tobytes())

    def close(self) -> None:
        """Stop recording: if every chunk is done, merge the log into `progress.safetensors` and remove it (a crash
        in between replays it on the merged state, which changes nothing); else just fsync it."""
        if self._log is None:
            return
        log, self._log = self._log, None
        log.close()
        if bool(self.done.all()):
            write_safetensors(log.path.with_name("progress.safetensors"), {"values": self.values, "done": self.done})
            log.path.unlink()

    def _merge(self) -> AppendLog:
        """Write the state to `progress.safetensors`, then an empty log (a crash in between replays the old log
        on the new state, which changes nothing); returns the new log, open for appending."""
        assert self.out is not None
        write_safetensors(self.out / "progress.safetensors", {"values": self.values, "done": self.done})
        return AppendLog.create(self.out / "progress.log", SYNC_SECONDS)

    def _load(self, state: Path, log: Path) -> None:
        """Read `progress.safetensors` and replay `progress.log` (if any) on it, checking every shape and index."""
        if not state.is_file():
            raise _damaged(state, "is missing")
        try:
            tensors = safetensors.torch.load(state.read_bytes())
        except Exception as err:  # safetensors raises its own error type for truncated or garbled files
            raise _damaged(state, f"cannot be read as safetensors ({err})") from err
        expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "values": (tuple(self.values.shape), torch.float64),
            "done": (tuple(self.done.shape), torch.uint8),
        }
        for key, (shape, dtype) in expected.items():
            found = tensors.get(key)
            if found is None:
                raise _damaged(state, f"lacks the tensor {key!r}")
            if tuple(found.shape) != shape or found.dtype != dtype:
                raise _damaged(
                    state,
                    f"holds {key!r} as {found.dtype} {tuple(found.shape)}, this sweep needs {dtype} {tuple(shape)}",
                )
        self.values, self.done = tensors["values"].clone(), tensors["done"].clone()
        try:
            records = AppendLog.read(log) if log.exists() else []
        except (OSError, ValueError) as err:
            raise _damaged(log, str(err)) from err
        for number, payload in enumerate(records):
            (index,) = _INDEX.unpack_from(payload) if len(payload) >= _INDEX.size else (-1,)
            if not 0 <= index < len(self.chunks):
                raise _damaged(log, f"record {number} names chunk {index}; this sweep has {len(self.chunks)}")
            chunk = self.chunks[index]
            shape = (len(chunk.variants), chunk.row_stop - chunk.row_start)
            if len(payload) != _INDEX.size + 8 * math.prod(shape):
                raise _damaged(log, f"record {number} does not hold {shape} values for chunk {index}")
            values = torch.frombuffer(bytearray(payload[_INDEX.size :]), dtype=torch.float64).reshape(shape)
            self.values[list(chunk.variants), chunk.row_start : chunk.row_stop] = values
            self.done[index] = 1


def _damaged(path: Path, what: str) -> PathlensError:
    return PathlensError(f"checkpoint file {path} {what}: it is damaged; {START_OVER}, or pass another out= folder.")


def _read_sweep_json(path: Path) -> dict[str, Any]:
    """The saved sweep description, checked to be a whole one of this layout."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"cannot be read as JSON ({err})") from err
    if not isinstance(saved, dict):
        raise _damaged(path, "does not hold a JSON object")
    if saved.get("version") != SWEEP_VERSION:
        raise PathlensError(
            f"{path} was written by another pathlens version (checkpoint layout {saved.get('version')!r}, this one "
            f"reads {SWEEP_VERSION}), so it cannot be checked against this sweep; {START_OVER}."
        )
    sections = ("weights", "task", "settings", "metric")
    missing = [key for key in sections if not isinstance(saved.get(key), dict)]
    if missing:
        raise _damaged(path, f"lacks {missing}")
    return saved


def _different(out: Path, what: str, detail: str) -> PathlensError:
    return PathlensError(
        f"out={out} holds a different sweep: {what} differ ({detail}). Resume with the same model, task, metric "
        f"and arguments, {START_OVER}, or pass another out= folder."
    )


def _compare(out: Path, saved: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise naming the first of weights / task / settings in which `saved` differs from `identity`."""
    details = {
        "weights": "the model's parameters or buffers changed since the progress was saved",
        "task": "its prompts, answers, answer positions or attention mask changed",
    }
    for section in ("weights", "splices", "task", "settings"):
        old, new = saved.get(section, []), json.loads(json.dumps(identity.get(section, [])))  # as JSON reads it back
        if section == "splices":
            if old != new:
                raise _different(
                    out,
                    "the spliced dictionaries",
                    f"{_spliced(old)} saved, {_spliced(new)} now; splice the dictionary the sweep began with",
                )
            continue
        if old == new:
            continue
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if section == "settings" or changed != ["sha256"]:
            shown = [f"{k}: {_short(old.get(k))} saved, {_short(new.get(k))} now" for k in changed]
            raise _different(out, section, "; ".join(shown))
        raise _different(out, section, details[section])


def _spliced(records: Any) -> str:
    """Saved or current splice records as text: 'L6.sae at L6.resid_post (sha256 0123abcd…)', or 'none'."""
    if not isinstance(records, list) or not records:
        return "none"
    return ", ".join(
        f"{r.get('latents')} at {r.get('source')}"
        + (f" -> {r.get('target')}" if r.get("target") != r.get("source") else "")
        + f" (width {r.get('width')}, sha256 {str(r.get('sha256'))[:12]}…)"
        for r in records
        if isinstance(r, dict)
    )


def _compare_metric(out: Path, saved: dict[str, Any], metric: dict[str, Any]) -> None:
    """Raise if the metric's per-row values on the base or source run differ from the saved ones."""
    if saved.get("name") != metric["name"]:
        raise _different(out, "metric", f"{saved.get('name')!r} saved, {metric['name']!r} now")
    for run in ("base", "source"):
        old, new = saved.get(run), metric[run]
        if old is None and new is None:
            continue
        same = (
            isinstance(old, list)
            and new is not None
            and len(old) == len(new)
            and torch.allclose(
                torch.tensor(old, dtype=torch.float64),
                torch.tensor(new, dtype=torch.float64),
                rtol=METRIC_RTOL,
                atol=METRIC_ATOL,
                equal_nan=True,
            )
        )
        if not same:
            raise _different(
                out,
                "metric",
                f"{metric['name']!r} gives other values on the {run} run than the saved one (same name, another "
                f"function or baseline): {_short(old)} saved, {_short(new)} now",
            )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
