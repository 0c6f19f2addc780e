"""Where an engine's independent chunks run: in this process (the default) or on an executor such as Ray's.

An engine whose work splits into chunks (a patching sweep) describes that work as a `ChunkWork`: a small,
picklable recipe (the task, the options) that rebuilds the engine's state on any process holding the model,
as a `ChunkRunner` that runs chunk `i` by index. The engine plans its chunks itself, exactly as it does
locally, so an executor only decides where each chunk index runs; the engine records the values it gets back
(checkpointing them as usual), which keeps the merged result bit-identical to a local run with the same
chunking and the same torch threads per process.

An `Executor` receives the model (to know how workers rebuild it), the work, the chunk indices still to run,
the fingerprint of the engine's own base runs (so a worker whose model computes other numbers is refused)
and a `done(index, values)` callback it calls once per chunk. `executor="ray"` names
`pathlens.distributed.RayExecutor` (imported only then: Ray is an optional extra).

An executor may also take the work early: `announce(executor, model, work)`, called by an engine before its own
base runs, hands the work to an executor that has a `prepare(model, work)` method, so its workers rebuild their
state (their base runs) while this process runs its own, instead of after them; `run` then picks up what was
prepared for the same work. Executors without `prepare` are unaffected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model

EXECUTORS = ("local", "ray")
"""The executor names engines accept besides executor objects."""


class ChunkRunner(Protocol):
    """An engine's state on one process (after its base runs): runs chunks by index."""

    def fingerprint(self) -> str: ...

    def chunk_count(self) -> int: ...

    def run(self, index: int) -> Tensor: ...


class ChunkWork(Protocol):
    """A picklable recipe that rebuilds an engine's `ChunkRunner` on a process that holds `model`."""

    @property
    def description(self) -> str: ...

    def build(self, model: Model) -> ChunkRunner: ...


class Executor(Protocol):
    """Runs the chunk indices `todo` of `work`, calling `done(index, values)` once per finished chunk."""

    def run(
        self,
        model: Model,
        work: ChunkWork,
        fingerprint: str,
        todo: Sequence[int],
        done: Callable[[int, Tensor], None],
    ) -> None: ...


def announce(executor: "Executor | None", model: Model, work: ChunkWork) -> None:
    """Hand `work` to `executor` before the engine's own base runs, if it prepares work early (module docstring)."""
    prepare = getattr(executor, "prepare", None)
    if callable(prepare):
        prepare(model, work)


def tensor_fingerprint(*tensors: Tensor, extra: str = "") -> str:
    """SHA-256 over the dtype, shape and bytes of `tensors` and `extra`: what tells two processes' base runs
    apart bit for bit."""
    digest = hashlib.sha256(extra.encode())
    for t in tensors:
        flat = t.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{flat.dtype}:{tuple(t.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


@contextmanager
def resolved_executor(executor: "str | Executor | None") -> Iterator[Executor | None]:
    """The executor an engine's `executor=` names: None (or "local") runs in this process; "ray" starts a
    `RayExecutor` for this call and closes it afterwards; an executor object is used as given (and kept open)."""
    if executor is None or (isinstance(executor, str) and executor == "local"):
        yield None
        return
    if isinstance(executor, str):
        if executor != "ray":
            raise PathlensError(
                f"executor={executor!r} is not an executor; pass 'local', 'ray' or an executor object such as "
                "pathlens.distributed.RayExecutor(address=...)."
            )
        from pathlens.distributed import RayExecutor  # Ray is optional: imported only when asked for

        with RayExecutor() as ray_executor:
            yield ray_executor
        return
    if not callable(getattr(executor, "run", None)):
        raise PathlensError(
            f"executor={executor!r} has no run(model, work, fingerprint, todo, done) method; pass 'local', 'ray' or "
            "an executor object such as pathlens.distributed.RayExecutor(address=...)."
        )
    yield executor
