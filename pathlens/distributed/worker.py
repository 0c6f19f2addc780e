"""The process a Ray actor runs: the model built once from its `ModelSpec`, then any number of jobs.

A job (`ChunkWork`) is rebuilt here into a `ChunkRunner` (the engine's base runs, on this worker's copy of the
model) by `prepare`, which answers with the runner's fingerprint so the driver can refuse a worker whose numbers
differ from its own; `run` then computes chunks of that job by index. Only one job is held at a time: preparing
the next one frees the previous one's activations first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pathlens.distributed.allocator import keep_freed_memory
from pathlens.distributed.spec import ModelSpec
from pathlens.errors import PathlensError
from pathlens.patching.executor import ChunkRunner, ChunkWork


class ChunkWorker:
    """One worker: `threads` torch threads and the model of `spec`, loaded once, in a process that keeps the memory
    it frees (`allocator.keep_freed_memory`: chunk after chunk reuses it instead of faulting it in again)."""

    def __init__(self, spec: ModelSpec, threads: int):
        self.keeps_freed_memory = keep_freed_memory()
        torch.set_num_threads(threads)
        self.model = spec.build()
        self.key: int | None = None
        self.runner: ChunkRunner | None = None

    def prepare(self, key: int, work: ChunkWork) -> tuple[str, int]:
        """Rebuild job `key` on this worker; returns (fingerprint, number of chunks) of its base runs and plan."""
        self.key, self.runner = None, None
        runner = work.build(self.model)
        self.key, self.runner = key, runner
        return runner.fingerprint(), runner.chunk_count()

    def run(self, key: int, index: int) -> tuple[int, Tensor]:
        """Chunk `index` of job `key`: (index, its values)."""
        if self.runner is None or self.key != key:
            raise PathlensError(f"this worker holds job {self.key}, not {key}; prepare it first.")
        with torch.no_grad():
            return index, self.runner.run(index).detach().cpu()
