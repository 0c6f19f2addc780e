"""`RayExecutor`: an engine's chunks run on Ray actors, each holding its own copy of the model.

The driver (the process that called `patch(..., executor=...)`) plans the chunks and keeps the results and the
checkpoint, as in a local run; the actors compute chunks by index. Each actor loads the model once, from a
`ModelSpec` (the arguments `pathlens.load` recorded, or a builder), never from weights sent through the object
store, and keeps it across calls for as long as the executor is open. For each job the actors first rebuild the
engine's base runs and report their fingerprint; a worker whose numbers differ from the driver's (other weights
or dtype) is refused, so merged results equal the local run's bit for bit (given the same torch threads per
process: `threads=`).

Early start: an engine that calls `prepare(model, work)` (through `patching.executor.announce`) before its own base
runs has the actors rebuild the job at the same time; `run` then waits only for whatever of that is left.

Scheduling: every live actor keeps `in_flight` chunks queued (so it never waits for the driver), chunks go out in
plan order (largest cone first), and each result is handed to the engine as it arrives: one progress bar counts
all workers. An actor that dies (a crashed node, `ray.kill`) loses only its queued chunks, which go back to the
front of the queue and run on another actor; a replacement actor is started up to `replacements` times. The
engine records a chunk once, so nothing is lost or counted twice.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pathlens.distributed.connect import connect, import_ray
from pathlens.distributed.spec import Builder, ModelSpec
from pathlens.distributed.worker import ChunkWorker
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching.executor import ChunkWork

_KEYS = itertools.count()


@dataclass
class _Job:
    """A job handed to the actors: its work (to recognise it in `run`), key, object reference and the pending
    `prepare` calls."""

    work: ChunkWork
    key: int
    ref: Any
    pending: dict[Any, tuple[_Slot, int | None]]


@dataclass
class _Slot:
    """One actor and what the driver knows of it: whether it holds the current job, and its queued chunks."""

    actor: Any
    ready: bool = False
    queued: int = 0
    alive: bool = True


class RayExecutor:
    """Run chunks on Ray actors. Use as `patch(model, task, executor=RayExecutor(...))`, or as a context manager
    to keep the actors (and their loaded models) across calls; `close()` ends them.

    address: None starts a local Ray cluster (unless `ray.init` was already called in this process, whose
        connection is used); "ray://<head>:10001" connects through the Ray client; "auto" or "<head>:6379" from a
        cluster node. An unreachable address raises at once, naming it.
    workers: number of actors (None: the cluster's CPUs divided by `threads`, at least 1).
    threads: torch threads per actor (and the CPUs each actor reserves); bit-identical to a local run with as
        many threads.
    model: how actors build the model (a `ModelSpec`, a name or folder for `pathlens.load`, or a builder
        function); None: the arguments `pathlens.load` recorded on the driver's model (`Model.source`).
    gpus_per_worker: GPUs each actor reserves (then load the model with device="cuda" in its spec).
    replacements: how many dead actors are replaced by new ones during one executor's life.
    in_flight: chunks queued on each actor at a time.
    init: extra keyword arguments for `ray.init` (e.g. {"num_cpus": 2} for a local cluster, or a runtime_env).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        threads: int = 1,
        model: "ModelSpec | str | Builder | None" = None,
        gpus_per_worker: float = 0.0,
        replacements: int = 2,
        in_flight: int = 2,
        init: Mapping[str, Any] | None = None,
    ):
        import_ray()
        for name, value, least in (
            ("threads", threads, 1),
            ("in_flight", in_flight, 1),
            ("replacements", replacements, 0),
        ):
            if not isinstance(value, int) or value < least:
                raise PathlensError(f"RayExecutor({name}={value!r}): pass an integer of at least {least}.")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise PathlensError(f"RayExecutor(workers={workers!r}): pass at least 1, or None for one per CPU.")
        self.address, self.workers, self.threads = address, workers, threads
        self.model = None if model is None else ModelSpec.coerce(model)
        self.gpus_per_worker, self.replacements, self.in_flight = gpus_per_worker, replacements, in_flight
        self.init = dict(init or {})
        self._started_ray = False
        self._spec: ModelSpec | None = None
        self._slots: list[_Slot] = []
        self._early: _Job | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the actors; shut Ray down if this executor started it."""
        ray = import_ray()
        for slot in self._slots:
            if slot.alive and ray.is_initialized():
                ray.kill(slot.actor)
        self._slots, self._spec, self._early = [], None, None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    @property
    def actors(self) -> list[Any]:
        """The live actor handles (for inspection; `ray.kill` one to see a chunk rerun elsewhere)."""
        return [slot.actor for slot in self._slots if slot.alive]

    # ---- running ------------------------------------------------------------------------------------

    def prepare(self, model: Model, work: ChunkWork) -> None:
        """Start the actors (once) and have each rebuild `work` now (its base runs), so that `run(model, work, ...)`
        right after this process's own base runs finds them ready or nearly so."""
        self._early = self._submit(model, work)

    def _submit(self, model: Model, work: ChunkWork) -> _Job:
        """Connect, start the actors for the model's spec, and send every actor `prepare` of `work`."""
        if model.splices:
            spliced = ", ".join(str(sp.latents) for sp in model.splices)
            raise PathlensError(
                f"this model has dictionaries spliced in ({spliced}), but a Ray worker builds its model from its spec "
                "without them, so its chunks would compute another model; run this call locally (executor='local')."
            )
        ray = import_ray()
        spec = self.model or ModelSpec.of(model)
        self._started_ray = connect(self.address, self.init) or self._started_ray
        self._ensure_actors(spec)
        job = _Job(work, next(_KEYS), ray.put(work), {})
        for slot in self._slots:
            slot.ready, slot.queued = False, 0
            job.pending[slot.actor.prepare.remote(job.key, job.ref)] = (slot, None)
        return job

    def run(
        self,
        model: Model,
        work: ChunkWork,
        fingerprint: str,
        todo: Sequence[int],
        done: Callable[[int, Tensor], None],
    ) -> None:
        """Run chunks `todo` of `work` on the actors, calling `done(index, values)` as each one arrives."""
        early, self._early = self._early, None
        if not todo:
            return
        ray = import_ray()
        spec = self.model or ModelSpec.of(model)
        job = early if early is not None and early.work is work and self._spec == spec else self._submit(model, work)
        key, work_ref, pending = job.key, job.ref, job.pending
        queue = deque(todo)
        try:
            while queue or pending:
                for slot in self._slots:
                    while slot.alive and slot.ready and queue and slot.queued < self.in_flight:
                        next_index = queue.popleft()
                        pending[slot.actor.run.remote(key, next_index)] = (slot, next_index)
                        slot.queued += 1
                if not pending:
                    raise PathlensError("every Ray worker of this executor died; no chunk can run.")
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                slot, index = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    if index is not None:
                        queue.appendleft(index)
                    if slot.alive:
                        slot.alive = False
                        self._replace(spec, key, work_ref, pending)
                    continue
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    raise (cause if isinstance(cause, Exception) else err) from None
                if index is None:
                    self._check(slot, result, fingerprint, spec)
                else:
                    slot.queued -= 1
                    done(*result)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def _check(self, slot: _Slot, result: tuple[str, int], fingerprint: str, spec: ModelSpec) -> None:
        """Accept an actor for the current job if its base runs and chunk plan match the driver's bit for bit."""
        theirs, _ = result
        if theirs != fingerprint:
            raise PathlensError(
                f"a Ray worker's model, built from {spec.describe()}, computes other base-run logits than the model "
                "passed here (other weights, dtype, device or torch threads), so its chunks would not match a local "
                "run; load the model the same way on both sides, set RayExecutor(threads=...) to this process's "
                "torch threads, or pass RayExecutor(model=...) naming how this model was made."
            )
        slot.ready = True

    def _ensure_actors(self, spec: ModelSpec) -> None:
        """Start the actors for `spec` (once; a new spec replaces them)."""
        ray = import_ray()
        self._slots = [slot for slot in self._slots if slot.alive]
        if self._slots and self._spec == spec:
            return
        for slot in self._slots:
            ray.kill(slot.actor)
        count = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.threads))
        self._spec = spec
        self._slots = [_Slot(self._new_actor(spec)) for _ in range(count)]

    def _new_actor(self, spec: ModelSpec) -> Any:
        ray = import_ray()
        remote = ray.remote(ChunkWorker).options(num_cpus=self.threads, num_gpus=self.gpus_per_worker)
        return remote.remote(spec, self.threads)

    def _replace(self, spec: ModelSpec, key: int, work_ref: Any, pending: dict[Any, tuple[_Slot, int | None]]) -> None:
        """Start a new actor in place of a dead one (while replacements remain) and give it the current job."""
        if self.replacements <= 0:
            return
        self.replacements -= 1
        slot = _Slot(self._new_actor(spec))
        self._slots.append(slot)
        pending[slot.actor.prepare.remote(key, work_ref)] = (slot, None)
