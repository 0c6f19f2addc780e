"""The Ray executor against the local run it must reproduce bit for bit (the reference: `patch` in this process,
same chunking, one torch thread here and in every worker), on a local Ray cluster this module starts and stops.

The cluster gets 3 logical CPUs so that a second executor (one worker, another model spec) can start while the
shared two-worker one keeps its actors; it is shut down after the module, which stays under a minute.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import pathlens
from pathlens.distributed import ModelSpec, RayExecutor
from pathlens.distributed.connect import connect
from pathlens.model import Model
from pathlens.patching.checkpoint import Checkpoint
from pathlens.patching.executor import ChunkWork
from pathlens.tasks.base import Task, logit_diff
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model

ray = pytest.importorskip("ray")

SWEEP: dict[str, Any] = {"sites": "heads", "positions": "each", "max_batch_tokens": 30, "progress": False}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a local folder: the spec workers load it from (`pathlens.load(folder)`)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", weight_scale=4.0).hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def executor(cluster: None) -> Iterator[RayExecutor]:
    with RayExecutor(workers=2, threads=1) as ex:
        yield ex


def recorded(monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> list[int]:
    """The chunk indices the sweep records, in order; with `stop_after`, interrupt it after that many."""
    original = Checkpoint.record
    seen: list[int] = []

    def record(self: Checkpoint, index: int, values: torch.Tensor) -> None:
        if len(seen) == stop_after:
            raise KeyboardInterrupt
        seen.append(index)
        original(self, index, values)

    monkeypatch.setattr(Checkpoint, "record", record)
    return seen


def test_ray_sweeps_equal_local_ones_bit_for_bit(folder: Path, executor: RayExecutor) -> None:
    model, task = pathlens.load(folder), padded_task()
    before = snapshot(model)
    for options in (
        SWEEP,
        {**SWEEP, "sites": "resid_pre", "direction": "denoise"},
        {**SWEEP, "sites": "mlp_out", "positions": "all", "ablation": "resample", "seed": 3},
    ):
        local = pathlens.patch(model, task, **options)
        remote = pathlens.patch(model, task, executor=executor, **options)
        assert torch.equal(remote.values, local.values), options
        assert remote.meta == local.meta
    assert len(executor.actors) == 2
    assert_untouched(model, before)


def test_a_sweep_resumes_across_local_and_ray(folder: Path, executor: RayExecutor, tmp_path: Path) -> None:
    model, task = pathlens.load(folder), padded_task()
    with pytest.MonkeyPatch.context() as counting:
        seen = recorded(counting)
        plain = pathlens.patch(model, task, **SWEEP)
    total = len(seen)
    for first, second in ((None, executor), (executor, None)):
        out = tmp_path / f"from-{'local' if first is None else 'ray'}"
        with pytest.MonkeyPatch.context() as stopping:
            recorded(stopping, stop_after=4)
            with pytest.raises(KeyboardInterrupt):
                pathlens.patch(model, task, out=out, executor=first, **SWEEP)
        with pytest.MonkeyPatch.context() as counting:
            seen = recorded(counting)
            resumed = pathlens.patch(model, task, out=out, executor=second, **SWEEP)
        assert len(seen) == total - 4 and len(set(seen)) == len(seen)
        assert torch.equal(resumed.values, plain.values)
        assert not (out / "progress.log").exists()


def slow_logit_diff(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """The task's logit difference, taking 50 ms per call: a chunk is still running when its worker is killed."""
    time.sleep(0.05)
    return logit_diff(logits, task)


def test_a_worker_killed_mid_sweep_loses_and_repeats_nothing(
    folder: Path, executor: RayExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, task = pathlens.load(folder), padded_task()
    options = {**SWEEP, "metric": slow_logit_diff}
    local = pathlens.patch(model, task, **options)
    original = Checkpoint.record
    seen: list[int] = []
    victim: list[Any] = []

    def record(self: Checkpoint, index: int, values: torch.Tensor) -> None:
        if not seen:
            victim.append(executor.actors[0])
            ray.kill(victim[0])  # it holds queued chunks: in_flight=2, each chunk sleeps in the metric
        seen.append(index)
        original(self, index, values)

    replace = RayExecutor._replace
    failed: list[int] = []

    def count_failures(self: RayExecutor, *args: Any) -> None:
        failed.append(1)
        replace(self, *args)

    monkeypatch.setattr(Checkpoint, "record", record)
    monkeypatch.setattr(RayExecutor, "_replace", count_failures)
    remote = pathlens.patch(model, task, executor=executor, **options)
    assert torch.equal(remote.values, local.values)
    assert sorted(seen) == list(range(len(seen))) and len(seen) == len(set(seen))
    assert failed == [1]  # the victim's queued chunk came back failed (and ran elsewhere)
    assert victim[0] not in executor.actors and len(executor.actors) == 2  # replaced


def test_builder_specs_and_a_worker_with_other_weights(folder: Path, executor: RayExecutor, cluster: None) -> None:
    task = padded_task()
    built = tiny_model("llama", weight_scale=4.0)
    spec = ModelSpec(tiny_model, {"family": "llama", "weight_scale": 4.0})
    with RayExecutor(workers=1, model=spec) as one:
        remote = pathlens.patch(built, task, executor=one, **SWEEP)
    assert torch.equal(remote.values, pathlens.patch(built, task, **SWEEP).values)
    other = tiny_model("llama", seed=1, weight_scale=4.0)
    with pytest.raises(pathlens.PathlensError, match="other base-run logits"):
        with RayExecutor(workers=1, model=str(folder)) as wrong:
            pathlens.patch(other, task, executor=wrong, **SWEEP)
    with pytest.raises(pathlens.PathlensError, match="in-memory module"):
        pathlens.patch(other, task, executor=executor, **SWEEP)


def test_missing_ray_unreachable_address_and_bad_options(monkeypatch: pytest.MonkeyPatch) -> None:
    model, task = tiny_model("gpt2"), padded_task()
    with pytest.raises(pathlens.PathlensError, match="cannot reach the Ray cluster at address='ray://127.0.0.1:1'"):
        pathlens.patch(model, task, executor=RayExecutor(address="ray://127.0.0.1:1", model="x"), progress=False)
    with pytest.raises(pathlens.PathlensError, match="not a Ray cluster address"):
        pathlens.patch(model, task, executor=RayExecutor(address="nowhere", model="x"), progress=False)
    with pytest.raises(pathlens.PathlensError, match="workers=0"):
        RayExecutor(workers=0)
    with pytest.raises(pathlens.PathlensError, match="executor='spark'"):
        pathlens.patch(model, task, executor="spark", progress=False)  # type: ignore[arg-type]
    with pytest.raises(pathlens.PathlensError, match="top_k= runs in this process"):
        pathlens.patch(model, task, top_k=3, executor="ray", progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(pathlens.PathlensError, match=r"pip install 'pathlens\[ray\]'"):
        pathlens.patch(model, task, executor="ray", progress=False)
    with pytest.raises(pathlens.PathlensError, match=r"pip install 'pathlens\[ray\]'"):
        RayExecutor()


@dataclass(frozen=True)
class CountingWork:
    """A `ChunkWork` whose `build` appends the building process's id to the file `path`; chunk i is (i, i)."""

    path: str
    description: str = "counting"

    def build(self, model: Model) -> CountingRunner:
        with open(self.path, "a") as log:
            log.write(f"{os.getpid()}\n")
        return CountingRunner()


class CountingRunner:
    def fingerprint(self) -> str:
        return "counting"

    def chunk_count(self) -> int:
        return 4

    def run(self, index: int) -> torch.Tensor:
        return torch.full((2,), float(index))


def test_work_prepared_early_is_built_once_per_worker(folder: Path, executor: RayExecutor, tmp_path: Path) -> None:
    """`prepare` hands the work to every actor at once; `run` of the same work then waits for those builds instead of
    asking again, so each actor builds it once (counted in a file the workers append to); another work object is
    built afresh."""
    model = pathlens.load(folder)
    for early in (True, False):
        work = CountingWork(str(tmp_path / f"builds-{early}.txt"))
        if early:
            executor.prepare(model, work)
        got: dict[int, torch.Tensor] = {}
        executor.run(model, work, "counting", range(4), got.setdefault)
        assert sorted(got) == [0, 1, 2, 3] and all(torch.equal(v, torch.full((2,), float(i))) for i, v in got.items())
        builders = Path(work.path).read_text().split()
        assert len(builders) == len(set(builders)) == len(executor.actors) == 2


class RecordingExecutor:
    """A local executor with `prepare`: records how many forwards the engine had run at each of its calls."""

    def __init__(self, forwards: list[int]):
        self.forwards = forwards
        self.seen: list[int] = []

    def prepare(self, model: Model, work: ChunkWork) -> None:
        self.seen.append(len(self.forwards))

    def run(
        self,
        model: Model,
        work: ChunkWork,
        fingerprint: str,
        todo: Sequence[int],
        done: Callable[[int, torch.Tensor], None],
    ) -> None:
        self.seen.append(len(self.forwards))
        runner = work.build(model)
        assert runner.fingerprint() == fingerprint
        for index in todo:
            done(index, runner.run(index))


def test_patch_announces_its_work_before_its_base_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """An executor with `prepare` gets the sweep's work before the engine's first forward (its base runs, counted
    at the model's forward) and `run` after both base runs; the sweep equals the local one bit for bit."""
    model, task = tiny_model("llama", weight_scale=4.0), padded_task()
    local = pathlens.patch(model, task, **SWEEP)
    forwards: list[int] = []
    original = model.hf.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        forwards.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.hf, "forward", forward)
    recorder = RecordingExecutor(forwards)
    remote = pathlens.patch(model, task, executor=recorder, **SWEEP)
    assert recorder.seen == [0, 2] and torch.equal(remote.values, local.values)


def test_a_local_cluster_runs_its_workers_at_the_drivers_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster the executor starts gets Ray's worker niceness 0 (Ray's default is 15), unless `init` says
    otherwise; checked on the options `ray.init` receives (Ray applying it was checked by hand: `os.nice(0)` in an
    actor of such a cluster gives 0, in a default one 15)."""
    calls: list[dict[str, Any]] = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **options: calls.append(options))
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert connect(None, {"num_cpus": 2})
    assert calls[-1]["_system_config"] == {"worker_niceness": 0} and calls[-1]["num_cpus"] == 2
    connect(None, {"_system_config": {"worker_niceness": 5, "other": 1}})
    assert calls[-1]["_system_config"] == {"worker_niceness": 5, "other": 1}


FAULTS = """
import resource, sys, torch
from pathlens.distributed.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.ones(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    alive = [torch.ones(2**22) for _ in range(10)]  # ten 16 MB tensors alive at once, every page written
    del alive
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_workers_keep_the_memory_they_free(executor: RayExecutor, folder: Path) -> None:
    """The reference is the OS's count of minor page faults: five rounds of 160 MB of activations fault their pages
    in about once with `keep_freed_memory` (44,922; one round's pages are 40,960), more often by default (204,579
    measured here, 85,888 on a fresh CI machine, where glibc's own dynamic mmap threshold rose sooner). Every actor
    of the executor runs with it."""
    counts = {}
    for mode in ("plain", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        counts[mode] = int(faults)
        assert kept == str(mode == "keep")
    pages = 10 * 2**22 * 4 // resource.getpagesize()
    assert counts["keep"] <= 1.5 * pages and counts["plain"] >= 1.5 * counts["keep"], counts
    pathlens.patch(pathlens.load(folder), padded_task(), executor=executor, **SWEEP)  # the actors exist
    flags = ray.get([a.__ray_call__.remote(lambda worker: worker.keeps_freed_memory) for a in executor.actors])
    assert flags == [True] * len(executor.actors) == [True, True]
