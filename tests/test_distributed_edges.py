"""Edge patching on the Ray executor against the local run it must reproduce bit for bit (the reference: the same
call in this process, same chunking, one torch thread here and in every worker): faithfulness curves, exact edge
effects and discovery's evaluations, including a worker killed mid-curve.

The local cluster, the tiny Llama folder the workers load and the two-worker executor are
`tests/test_distributed.py`'s module fixtures, shared here (one cluster for this module, stopped after it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import pathlens
from pathlens.circuits.discover import discover
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.circuits.edge_effects import edge_effects
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import faithfulness_curve
from pathlens.distributed import RayExecutor
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.model import Model
from pathlens.patching.executor import ChunkWork
from tests import test_distributed as shared
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model

ray = pytest.importorskip("ray")

cluster, folder, executor = shared.cluster, shared.folder, shared.executor


def same(a: Tensor, b: Tensor) -> bool:
    """Bit-equal, NaN where the other has NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_curves_and_edge_effects_on_ray_equal_local_ones_bit_for_bit(folder: Path, executor: Any) -> None:
    model, task = pathlens.load(folder), padded_task()
    before = snapshot(model)
    graph = edge_attribution(model, task, "eap")
    for options, all_sizes in (
        ({"max_batch_tokens": 36}, (None, "mib")),
        ({"max_batch_tokens": 18, "ablation": "mean", "direction": "denoise"}, (None,)),
    ):
        patcher = EdgePatcher(model, task, **options)  # 36 tokens: 4 rows per forward, crossing circuits
        assert len(patcher.row_chunks(20)) > 10
        for sizes in all_sizes:
            local = faithfulness_curve(patcher, graph, sizes)  # type: ignore[arg-type]
            remote = faithfulness_curve(patcher, graph, sizes, executor=executor)  # type: ignore[arg-type]
            assert remote.as_dict() == local.as_dict(), (options, sizes)
        edges = torch.rand(graph.scores.shape, generator=torch.Generator().manual_seed(0)) < 0.5
        local_effects = edge_effects(patcher, edges=edges)
        remote_effects = edge_effects(patcher, edges=edges, executor=executor)
        assert same(remote_effects.scores, local_effects.scores) and remote_effects.meta == local_effects.meta
    built = edge_effects(model, task, max_memory="50MB", executor=executor)
    assert same(built.scores, edge_effects(model, task, max_memory="50MB").scores)
    assert len(executor.actors) == 2
    assert_untouched(model, before)


def test_discover_on_ray_equals_discover_here(folder: Path, executor: Any) -> None:
    model, task = pathlens.load(folder), padded_task()
    for method in ("patching", "eap"):
        watching = Watching(executor)
        local = discover(model, task, method=method, max_batch_tokens=36)  # type: ignore[arg-type]
        remote = discover(model, task, method=method, max_batch_tokens=36, executor=watching)  # type: ignore[arg-type]
        assert same(remote.scores, local.scores) and torch.equal(remote.in_circuit, local.in_circuit)
        assert remote.meta == local.meta
        # the edge scores (patching), the curves of both rankings and (when one runs) the sizes between, remotely
        assert len(watching.jobs) >= 2 + (method == "patching"), watching.jobs


class Watching:
    """An executor around a `RayExecutor` that records the jobs and the chunks it runs; with `kill`, it kills one
    of the actors when the first chunk comes back (that actor still holds queued chunks: in_flight=2, each chunk
    sleeps in the metric)."""

    def __init__(self, inner: Any, kill: bool = False):
        self.inner, self.kill = inner, kill
        self.victims: list[Any] = []
        self.seen: list[int] = []
        self.jobs: list[str] = []

    def run(
        self, model: Model, work: ChunkWork, fingerprint: str, todo: Sequence[int], done: Callable[[int, Tensor], None]
    ) -> None:
        self.jobs.append(work.description)

        def record(index: int, values: Tensor) -> None:
            if self.kill and not self.victims:
                self.victims.append(self.inner.actors[0])
                ray.kill(self.victims[0])
            self.seen.append(index)
            done(index, values)

        self.inner.run(model, work, fingerprint, todo, record)


def test_a_worker_killed_mid_curve_changes_no_value(
    folder: Path, executor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, task = pathlens.load(folder), padded_task()
    patcher = EdgePatcher(model, task, metric=shared.slow_logit_diff, max_batch_tokens=36)
    graph = edge_attribution(model, task, "eap")
    local = faithfulness_curve(patcher, graph)
    replace = RayExecutor._replace
    failed: list[int] = []

    def count_failures(self: Any, *args: Any) -> None:
        failed.append(1)
        replace(self, *args)

    monkeypatch.setattr(RayExecutor, "_replace", count_failures)
    killing = Watching(executor, kill=True)
    remote = faithfulness_curve(patcher, graph, executor=killing)
    assert remote.as_dict() == local.as_dict()
    circuits = 1 + len({size for size in local.sizes if size < local.edges_total})  # the full graph, then each size
    chunks = len(patcher.row_chunks(circuits))
    assert sorted(killing.seen) == list(range(chunks))  # every chunk once: nothing lost, nothing counted twice
    assert failed == [1]
    assert killing.victims[0] not in executor.actors and len(executor.actors) == 2  # replaced


def test_bad_executors_and_in_memory_models_raise(executor: Any) -> None:
    model, task = tiny_model("gpt2"), padded_task()
    patcher = EdgePatcher(model, task)
    graph = edge_attribution(model, task, "eap")
    with pytest.raises(pathlens.PathlensError, match="executor='spark'"):
        faithfulness_curve(patcher, graph, executor="spark")
    with pytest.raises(pathlens.PathlensError, match="has no run"):
        edge_effects(patcher, executor=object())  # type: ignore[arg-type]
    with pytest.raises(pathlens.PathlensError, match="cannot reach the Ray cluster"):
        faithfulness_curve(patcher, graph, executor=RayExecutor(address="ray://127.0.0.1:1", model="x"))
    with pytest.raises(pathlens.PathlensError, match="method='acdc' decides edge by edge"):
        discover(model, task, method="acdc", executor=executor)
    with pytest.raises(pathlens.PathlensError, match="in-memory module"):
        discover(model, task, method="patching", executor=executor)
    sae = Dictionary(DictionaryConfig("relu", model.arch.d_model, 8), seed=0)
    with model.splice(sae, "L0.mlp_out"):  # a worker would build the model without the dictionary: refused, early
        with pytest.raises(pathlens.PathlensError, match=r"spliced in \(L0\.sae\).*executor='local'"):
            pathlens.patch(model, task, sites="L0.sae", executor=RayExecutor(model="x"))
        with pytest.raises(pathlens.PathlensError, match="spliced in"):
            faithfulness_curve(EdgePatcher(model, task), edge_attribution(model, task), executor=RayExecutor(model="x"))
