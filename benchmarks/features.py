"""Features benchmark on the embedded SmolLM2: the activation store, its loader and semi-NMF, each against its floor.

Parts (`--parts`, comma list; each is a function of `PARTS` yielding JSON rows, so other feature workloads add
theirs there):
- store: collect one site (`--site`, default L6.mlp_post) over `--tokens` tokens of the default corpus into a
  fresh store (safetensors shards, checksums, manifest), against the floor: a plain forward of the whole model
  (`model.hf(ids, use_cache=False)` under no_grad, no hooks, no key/value cache built) over the same windows in
  the same batches, timed in the same run,
  interleaved. Two rows: `store` (the default, which stops the forward after the site's block) and
  `store-full-forward` (stop_early=False: the whole model runs, so the ratio is the cost of reading, copying
  and writing). Target: ratio_vs_floor ≥ 0.85.
- loader: one shuffled epoch of that store's rows (`ActivationStore.dataset`, 4096-row batches, checksums
  checked), against the floor of reading every shard file and loading it with safetensors in order (no checksum,
  no shuffle). `vs_forward` says how many times faster than the model's forward the loader delivers rows.
- snmf: `--snmf-iters` iterations of semi-NMF (rank 50, sparsity 0.01) on `--snmf-rows` rows of the store,
  against the naive whole-matrix loop of METHODS §20 (explicit inverse, full P and reconstruction), same
  iterations; tokens_per_s counts rows × iterations per second.

Every row has `workload`, `tokens_per_s`, `floor_tokens_per_s`, `ratio_vs_floor`. Run
`python benchmarks/features.py --json --threads 2`.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/features.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Emitter,
    add_device_argument,
    check_parts,
    check_repeats_and_threads,
    ratio,
    round_robin,
    set_threads,
)
from pathlens import Model, load
from pathlens.features import ActivationStore, Windows, collect, default_corpus, snmf, windows

STORE_TARGET = 0.85
Row = dict[str, Any]


class Workload:
    """What the parts share: the model, the windows, and a store collected once (for loader and snmf)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model: Model = load(args.model, device=args.device)
        self.windows: Windows = windows(default_corpus(), self.model.tokenizer, args.context, args.tokens, seed=0)
        self.scratch = Path(tempfile.mkdtemp(prefix="pathlens-bench-features-"))
        self._store: ActivationStore | None = None

    @property
    def tokens(self) -> int:
        return self.windows.n_tokens

    def collect(self, folder: Path, stop_early: bool = True) -> ActivationStore:
        return collect(
            self.model, [self.args.site], self.windows, folder, batch_size=self.args.batch_size,
            max_bytes=self.args.max_mb * 2**20, stop_early=stop_early,
        )  # fmt: skip

    def store(self) -> ActivationStore:
        if self._store is None:
            self._store = self.collect(self.scratch / "kept")
        return self._store

    def plain_forward(self) -> None:
        """The floor: the model's own forward over the same windows in the same batches, no hooks."""
        ids, size = self.windows.ids.to(self.model.device), self.args.batch_size
        with torch.no_grad():
            for first in range(0, len(ids), size):
                self.model.hf(input_ids=ids[first : first + size], use_cache=False)


def store_rows(work: Workload) -> Iterator[Row]:
    runs = [0]

    def fresh(stop_early: bool) -> Callable[[], None]:
        def run() -> None:
            runs[0] += 1
            folder = work.scratch / f"run-{runs[0]}"
            work.collect(folder, stop_early=stop_early)
            shutil.rmtree(folder)

        return run

    timed = round_robin(
        {"floor": work.plain_forward, "store": fresh(True), "store-full-forward": fresh(False)},
        work.args.repeats,
        warm_up=["floor"],
    )
    floor = work.tokens / timed["floor"].median
    for name in ("store", "store-full-forward"):
        speed = work.tokens / timed[name].median
        yield {
            "workload": name,
            "site": work.args.site,
            "tokens": work.tokens,
            "tokens_per_s": speed,
            "floor_tokens_per_s": floor,
            "ratio_vs_floor": ratio(speed, floor),
            "met": speed / floor >= STORE_TARGET,
            "seconds": timed[name].median,
            "floor_seconds": timed["floor"].median,
        }


def loader_rows(work: Workload) -> Iterator[Row]:
    store = work.store()
    files = [store.path / entry["file"] for entry in store.manifest["shards"]]

    def loader() -> int:
        return sum(int(batch.shape[0]) for batch in store.dataset(work.args.site, batch_size=4096, seed=0))

    def floor() -> int:
        import safetensors.torch

        return sum(int(safetensors.torch.load(f.read_bytes())[work.args.site].shape[0]) for f in files)

    timed = round_robin({"floor": floor, "loader": loader}, work.args.repeats)
    rows = store.n_rows
    assert timed["loader"].result == timed["floor"].result == rows
    speed, floor_speed = rows / timed["loader"].median, rows / timed["floor"].median
    forward = work.tokens / _time(work.plain_forward)
    yield {
        "workload": "loader",
        "site": work.args.site,
        "tokens": rows,
        "shards": len(files),
        "tokens_per_s": speed,
        "floor_tokens_per_s": floor_speed,
        "ratio_vs_floor": ratio(speed, floor_speed),
        "vs_forward": speed / forward,
    }


def snmf_rows(work: Workload) -> Iterator[Row]:
    store, args = work.store(), work.args
    rows = min(args.snmf_rows, store.n_rows)
    data = store.rows(args.site, 0, rows)  # (rows, d)
    settings = {"rank": 50, "sparsity": 0.01, "max_iter": args.snmf_iters, "patience": args.snmf_iters, "tol": 0.0}

    def batched() -> float:
        return snmf(data, **settings).losses[-1]  # type: ignore[arg-type]

    def naive() -> float:
        return _naive_snmf(data.T, 50, 0.01, args.snmf_iters)

    timed = round_robin({"floor": naive, "snmf": batched}, args.repeats, warm_up=False)
    work_units = rows * args.snmf_iters
    speed, floor_speed = work_units / timed["snmf"].median, work_units / timed["floor"].median
    yield {
        "workload": "snmf",
        "site": args.site,
        "tokens": rows,
        "iterations": args.snmf_iters,
        "tokens_per_s": speed,
        "floor_tokens_per_s": floor_speed,
        "ratio_vs_floor": ratio(speed, floor_speed),
        "loss": timed["snmf"].result,
        "floor_loss": timed["floor"].result,
    }


def _naive_snmf(A: torch.Tensor, k: int, sparsity: float, iters: int) -> float:
    """METHODS §20 on whole matrices (A: d × n), random init; returns the last loss."""
    d, n = A.shape
    G = torch.rand(n, k, generator=torch.Generator().manual_seed(0)).clamp_min(1e-6)
    keep = max(1, math.ceil(sparsity * d))
    loss = math.inf
    for _ in range(iters):
        F = A @ G @ torch.linalg.inv(G.T @ G + 1e-6 * torch.eye(k))
        F = F * (F.abs() >= F.abs().topk(keep, dim=0).values[-1])
        norms = G.norm(dim=0).clamp_min(1e-8)
        G, F = G / norms, F * norms
        P, Q = A.T @ F, F.T @ F
        G = G * torch.sqrt(
            ((P.abs() + P) / 2 + G @ ((Q.abs() - Q) / 2)) / ((P.abs() - P) / 2 + G @ ((Q.abs() + Q) / 2) + 1e-6)
        )
        loss = float(((A - F @ G.T) ** 2).sum())
    return loss


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sae_rows(work: Workload) -> Iterator[Row]:
    """The TopK SAE training workload of benchmarks/features_sae.py with its defaults (run that script directly to
    change them, or to time SAELens in its own virtualenv)."""
    from benchmarks import features_sae

    argv = ["--threads", str(work.args.threads or 0), "--device", str(work.args.device)]
    if work.args.saelens_python:
        argv += ["--saelens-python", work.args.saelens_python]
    yield from features_sae.rows(features_sae.parse(argv))


PARTS: dict[str, Callable[[Workload], Iterator[Row]]] = {
    "store": store_rows,
    "loader": loader_rows,
    "snmf": snmf_rows,
    "sae-topk": sae_rows,
}
"""Each part yields rows; a new feature workload adds its function here."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--site", default="L6.mlp_post")
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens collected per store run")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--max-mb", type=int, default=64, help="store memory budget (sets the shard size)")
    parser.add_argument("--snmf-rows", type=int, default=8192)
    parser.add_argument("--snmf-iters", type=int, default=20)
    parser.add_argument(
        "--saelens-python",
        default=os.environ.get("PATHLENS_SAELENS_PYTHON"),
        help="python of a virtualenv with SAELens, which pins transformer-lens 3.x and so needs its own (sae-topk's "
        "saelens_ratio; default: $PATHLENS_SAELENS_PYTHON; null without one)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    check_repeats_and_threads(parser, args)
    check_parts(parser, args, tuple(PARTS))
    if args.device.type != "cpu" and "snmf" in args.parts:
        parser.error(
            "--device: the snmf part runs on the CPU (pathlens.features.snmf has no device); drop it from --parts"
        )
    set_threads(args.threads)
    work = Workload(args)
    emit = Emitter(json=args.json, extra={"model": args.model, "threads": torch.get_num_threads()})
    try:
        for part in args.parts:
            for row in PARTS[part](work):
                emit(row)
    finally:
        shutil.rmtree(work.scratch, ignore_errors=True)
    emit.finish()


if __name__ == "__main__":
    main()
