"""The Ray executor against the local run it must reproduce bit for bit (the reference: `patch` in this process,
same chunking, one torch thread here and in every worker), on a local Ray cluster this module starts and stops.

The cluster gets 3 logical CPUs so that a second executor (one worker, another model spec) can start while the
shared two-worker one keeps its actors; it is shut down after the module, which stays under a minute.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import pathlens
from pathlens.distributed import ModelSpec, RayExecutor
from pathlens.patching.checkpoint import Checkpoint
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
