"""Scale benchmark: patching sweeps on a local Ray cluster against one local process, bit for bit.

Parts:
- ray: the GPT-2-shape head sweep (`benchmarks.patching`'s gpt2-heads: every head's output over all positions,
  denoising, 8 IOI-shaped prompts of 15 tokens) run by one single-threaded local process (`patch(...)`, the
  floor: the same engine with no distribution) and by `RayExecutor(workers=W, threads=1)` on a local Ray cluster
  of W CPUs (workers at the driver's priority, as `RayExecutor` starts its own clusters), for W = 1 and 2. The
  timed region is one `patch(...)` call with the executor open (what a user who keeps one open waits per sweep:
  the driver's base runs, the workers' rebuilding of the sweep, the chunks, the results back); the first call,
  which also starts the actors and builds their models, is `startup_seconds`. Runs are interleaved round by
  round; `speedup_min`/`speedup_max` are the extremes over the rounds; `identical` says whether the scores equal
  the local ones bit for bit. The workers keep the memory they free (`pathlens.distributed.allocator`);
  `--driver-keeps-freed-memory` gives the local run the same malloc setting. Targets: speedup ≥ 1.6 with 2
  workers, ≤ 1.10× the local time with 1.
- half: SmolLM2 loaded in fp32 and in bf16 (`pathlens.load("smollm2", dtype=...)`), 8 IOI prompts: the head
  sweep (`patch`, every head, all positions) and AtP over heads; each row gives the Pearson correlation of the
  bf16 scores with the fp32 ones (target ≥ 0.99), the largest difference and both run times.
- memory: the GPT-2-shape head sweep (as in the ray part) under three `max_memory` budgets: 2, 4 and 8 times
  the least that runs it. `peak_mb` is measured by `pathlens.memory.TensorPeak`: every tensor storage the call
  creates, counted while alive (a torch dispatch mode; weights and the allocator's cache not counted), the CPU
  counterpart of CUDA's max_memory_allocated; `estimate_mb` is the cost model's bound, `met` says peak ≤ budget.
- ray-curve: a faithfulness curve of 20 circuit sizes (`faithfulness_curve`, the top-k edges of an EAP graph of
  the GPT-2-shape model, same 8 prompts) by one single-threaded local process and by `RayExecutor(workers=W,
  threads=1)` for W = 1 and 2; the patcher forwards one circuit (8 rows of 15 tokens) at a time, 20 chunks. The
  Ray time includes each worker rebuilding the patcher's source run for the call (what every call pays);
  `identical` compares the whole curve bit for bit. Same targets as the ray part.
- edge-memory: `edge_effects` (the 24 strongest EAP edges of the GPT-2-shape model, scored exactly) and
  `discover` (EAP, ranked by |score|, 8 curve sizes, no refinement) under three `max_memory` budgets: 2, 4 and 8
  times the least that runs both engines (edge attribution, edge patching); `peak_mb` by `TensorPeak` as in the
  memory part, `met` says peak ≤ budget; `max_batch_tokens` is what the budget gives the edge patcher.
- ray-store: collecting one SmolLM2 site (L6.mlp_post) into an activation store: 64 windows of 128 tokens of
  random ids, 4 windows per forward and per shard (16 shards), by one single-threaded local process (`collect`,
  the floor: the same shards computed with no distribution) and by `RayExecutor(workers=W, threads=1)`, for
  W = 1 and 2; every timed run writes a fresh folder; `identical` says whether every file of the Ray store
  (shards, windows, manifest) equals the local one byte for byte. Then the store under three `max_memory`
  budgets (2, 4 and 8 times the least that collects one window; 16 windows): `peak_mb` is TensorPeak's peak
  plus the largest shard file (its serialized bytes are not a tensor), `estimate_mb` the cost model's bound.
- ray-attribution: AtP over every head (`pathlens.atp`, denoising) of 256 IOI-shaped prompts of 15 tokens on the
  GPT-2-shape model, in 16 chunks of 16 prompts (`max_batch_tokens` = 240), by one single-threaded local process
  (the floor: the same chunks in this process; no peer spreads attribution over workers) and by
  `RayExecutor(workers=W, threads=1)` for W = 1 and 2; `identical` compares the scores bit for bit. Same targets
  as the ray part. Then its memory rows: AtP of 32 of those prompts under three `max_memory` budgets (2, 4 and 8
  times the least, `patching.budget.first_order_cost`), `peak_mb` by `TensorPeak` as in the memory part.

Run `python benchmarks/scale.py --json` for one JSON line per row (keys `workload`, `workers`, `seconds`,
`local_seconds`, `speedup_vs_local`, `identical`, ...).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/scale.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import pathlens
from benchmarks.common import (
    SEED,
    SEQ_LEN,
    Emitter,
    add_device_argument,
    build_gpt2,
    check_parts,
    check_repeats_and_threads,
    round_robin,
    set_threads,
    synthetic_ioi_task,
    versions,
)
from pathlens.circuits.discover import discover
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.circuits.edge_effects import edge_effects
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import default_sizes, faithfulness_curve
from pathlens.circuits.layout import graph_layout
from pathlens.distributed import ModelSpec, RayExecutor
from pathlens.distributed.allocator import keep_freed_memory
from pathlens.distributed.connect import LOCAL_SYSTEM_CONFIG
from pathlens.patching.budget import edge_attribution_cost, edge_patch_cost
from pathlens.tasks import Task

PARTS = ("ray", "half", "memory", "ray-curve", "edge-memory", "ray-store", "ray-attribution")
BUDGET_FACTORS = (2.0, 4.0, 8.0)
CORRELATION_TARGET = 0.99
RAY_WORKLOAD = "gpt2-heads"
SPEEDUP_TARGET = 1.6
ONE_WORKER_TARGET = 1.10
SWEEP: dict[str, Any] = {"sites": "heads", "positions": "all", "direction": "denoise", "progress": False}
ATTRIBUTION_PROMPTS = 256
ATTRIBUTION_CHUNK = 16  # prompts per chunk: 16 chunks of 16 prompts x 15 tokens
ATTRIBUTION_MEMORY_PROMPTS = 32
ATTRIBUTION: dict[str, Any] = {"sites": "heads", "positions": "all", "direction": "denoise"}
CURVE_WORKLOAD = "gpt2-curve20"
CURVE_BATCH_TOKENS = 120  # one circuit of the 8 prompts x 15 tokens per forward: a chunk per curve point
EDGE_SUBSET = 24  # edges edge_effects scores in the edge-memory part
DISCOVER_SIZES = 8  # curve sizes of discover in the edge-memory part


def gpt2_model(device: str = "cpu") -> pathlens.Model:
    """The benchmark's GPT-2-shape model (seeded random weights) on `device`, wrapped: the builder Ray workers
    call."""
    return pathlens.Model(build_gpt2(device), name="gpt2-shape")


def ray_versus_local(
    args: argparse.Namespace,
    emit: Emitter,
    part: str,
    workload: str,
    run: Callable[[Any], Any],
    same: Callable[[Any, Any], bool],
    spec: ModelSpec | None,
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Time `run(None)` (one single-threaded local process, the floor) against `run(executor)` on a local Ray
    cluster of 1 and 2 single-threaded workers at the driver's priority (as RayExecutor starts one), in alternating
    rounds; one row per worker count; returns the missed targets. The first Ray call (actors start and build the
    model) is `startup_seconds`, outside the timed region."""
    import ray

    gpus = 1.0 if args.device.type == "cuda" else 0.0
    missed: list[str] = []
    ray.init(
        num_cpus=max(args.workers),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        _system_config=dict(LOCAL_SYSTEM_CONFIG),
    )
    try:
        for workers in args.workers:
            with RayExecutor(workers=workers, threads=1, model=spec, gpus_per_worker=gpus) as executor:
                start = time.perf_counter()
                run(executor)
                startup = time.perf_counter() - start
                timed = round_robin(
                    {"local": lambda: run(None), "ray": lambda executor=executor: run(executor)},
                    args.repeats,
                    warm_up=["local"],
                )
            local, remote = timed["local"], timed["ray"]
            speedup = local.median / remote.median
            per_round = [a / b for a, b in zip(local.seconds, remote.seconds, strict=True)]
            identical = same(local.result, remote.result)
            target = SPEEDUP_TARGET if workers > 1 else 1 / ONE_WORKER_TARGET
            met = identical and speedup >= target
            emit(
                {
                    "part": part,
                    "workload": workload,
                    "workers": workers,
                    "threads_per_worker": 1,
                    "seconds": round(remote.median, 3),
                    "local_seconds": round(local.median, 3),
                    "speedup_vs_local": round(speedup, 3),
                    "speedup_min": round(min(per_round), 3),
                    "speedup_max": round(max(per_round), 3),
                    "target_speedup": round(target, 3),
                    "identical": identical,
                    "met": met,
                    "startup_seconds": round(startup, 2),
                    "repeats": args.repeats,
                    **(extra or {}),
                }
            )
            if not met:
                missed.append(f"{part} {workers} workers: x{speedup:.2f} (target {target:.2f}), identical {identical}")
    finally:
        ray.shutdown()
    return missed


def same_scores(a: Any, b: Any) -> bool:
    """Whether two Scores hold the same values bit for bit."""
    return bool(torch.equal(a.values, b.values))


def run_ray(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The ray part: the head sweep on 1 and 2 workers against the local run; returns the missed targets."""
    set_threads(1)  # the local floor is single-threaded, like each worker
    if args.driver_keeps_freed_memory and not keep_freed_memory():
        raise SystemExit("--driver-keeps-freed-memory needs glibc's malloc")
    model = gpt2_model(str(args.device))
    task = synthetic_ioi_task(model.vocab_size)
    return ray_versus_local(
        args,
        emit,
        "ray",
        RAY_WORKLOAD,
        lambda executor: pathlens.patch(model, task, executor=executor, **SWEEP),
        same_scores,
        ModelSpec(gpt2_model, {"device": str(args.device)}),
        {"driver_keeps_freed_memory": args.driver_keeps_freed_memory},
    )


def run_half(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The half part: bf16 SmolLM2 against fp32 for patching and AtP; returns the missed targets."""
    from pathlens.tasks import ioi

    set_threads(args.threads)
    models = {dtype: pathlens.load("smollm2", dtype=dtype, device=args.device) for dtype in ("float32", "bfloat16")}
    task = ioi(models["float32"].tokenizer, n=8, seed=0)
    engines = {
        "patch": lambda m: pathlens.patch(m, task, sites="heads", progress=False),
        "atp": lambda m: pathlens.atp(m, task, sites="heads"),
    }
    missed = []
    for engine, run in engines.items():
        scores, seconds = {}, {}
        for dtype, model in models.items():
            start = time.perf_counter()
            scores[dtype] = run(model).values.flatten().double()
            seconds[dtype] = time.perf_counter() - start
        pair = torch.stack([scores["float32"], scores["bfloat16"]])
        corr = float(torch.corrcoef(pair)[0, 1])
        met = corr >= CORRELATION_TARGET
        emit(
            {
                "part": "half",
                "workload": "smollm2-ioi8-heads",
                "engine": engine,
                "dtype": "bfloat16",
                "correlation_vs_fp32": round(corr, 5),
                "max_abs_diff": round(float((pair[0] - pair[1]).abs().max()), 5),
                "fp32_scale": round(float(pair[0].abs().max()), 5),
                "seconds": round(seconds["bfloat16"], 2),
                "fp32_seconds": round(seconds["float32"], 2),
                "met": met,
            }
        )
        if not met:
            missed.append(f"half {engine}: correlation {corr:.4f} (target {CORRELATION_TARGET})")
    return missed


def run_memory(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The memory part: peak tensor memory of the head sweep under three budgets; returns the missed targets."""
    from pathlens.memory import TensorPeak, megabytes
    from pathlens.patching.estimate import estimate_patch

    set_threads(args.threads)
    model = pathlens.Model(build_gpt2(args.device), name="gpt2-shape")
    task = synthetic_ioi_task(model.vocab_size)
    options: dict[str, Any] = {"sites": "heads", "positions": "all", "direction": "denoise"}
    least = estimate_patch(model, task, max_memory="1TB", **options).least_bytes
    missed = []
    for factor in BUDGET_FACTORS:
        budget = int(least * factor)
        found = estimate_patch(model, task, max_memory=budget, **options)
        start = time.perf_counter()
        with TensorPeak() as peak:
            pathlens.patch(model, task, max_memory=budget, progress=False, **options)
        seconds = time.perf_counter() - start
        met = peak.peak <= budget
        emit(
            {
                "part": "memory",
                "workload": "gpt2-heads",
                "engine": "patch",
                "budget_mb": megabytes(budget),
                "peak_mb": megabytes(peak.peak),
                "estimate_mb": megabytes(found.peak_bytes),
                "max_batch_tokens": found.max_batch_tokens,
                "forwards": found.forwards,
                "seconds": round(seconds, 2),
                "estimated_seconds": round(found.seconds, 2),
                "peak_method": "TensorPeak (live tensor storages created by the call)",
                "met": met,
            }
        )
        if not met:
            missed.append(f"memory: peak {megabytes(peak.peak)} MB over the {megabytes(budget)} MB budget")
    return missed


def run_ray_curve(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The ray-curve part: a 20-size faithfulness curve on 1 and 2 Ray workers against the local run; returns the
    missed targets."""
    set_threads(1)  # the local floor is single-threaded, like each worker
    model = gpt2_model(str(args.device))
    task = synthetic_ioi_task(model.vocab_size)
    graph = edge_attribution(model, task, "eap")
    patcher = EdgePatcher(model, task, max_batch_tokens=CURVE_BATCH_TOKENS)
    sizes = default_sizes(graph.edges_total)
    chunks = len(patcher.row_chunks(1 + len({k for k in sizes if k < graph.edges_total})))
    return ray_versus_local(
        args,
        emit,
        "ray-curve",
        CURVE_WORKLOAD,
        lambda executor: faithfulness_curve(patcher, graph, executor=executor),
        lambda a, b: bool(a.as_dict() == b.as_dict()),
        ModelSpec(gpt2_model, {"device": str(args.device)}),
        {"chunks": chunks, "edges_total": graph.edges_total},
    )


def run_edge_memory(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The edge-memory part: peak tensor memory of edge_effects and discover under three budgets; returns the
    missed targets."""
    from pathlens.memory import TensorPeak, megabytes

    set_threads(args.threads)
    model = gpt2_model(str(args.device))
    task = synthetic_ioi_task(model.vocab_size)
    senders = len(graph_layout(model).senders)
    patching = edge_patch_cost(model, task.n, task.seq_len, senders, False)
    attribution = edge_attribution_cost(model, task.n, task.seq_len, senders, False)
    least = max(patching.least, attribution.least)
    graph = edge_attribution(model, task, "eap")
    edges = graph.prune(top_k=EDGE_SUBSET, by="abs").in_circuit
    sizes = default_sizes(graph.edges_total, DISCOVER_SIZES)
    engines = {
        "edge_effects": lambda budget: edge_effects(model, task, edges=edges, max_memory=budget),
        "discover": lambda budget: discover(model, task, "eap", sizes=sizes, by="abs", refine=0, max_memory=budget),
    }
    missed = []
    for engine, run in engines.items():
        for factor in BUDGET_FACTORS:
            budget = int(least * factor)
            start = time.perf_counter()
            with TensorPeak() as peak:
                run(budget)
            seconds = time.perf_counter() - start
            met = peak.peak <= budget
            emit(
                {
                    "part": "edge-memory",
                    "workload": "gpt2-edges",
                    "engine": engine,
                    "budget_mb": megabytes(budget),
                    "peak_mb": megabytes(peak.peak),
                    "least_mb": megabytes(least),
                    "max_batch_tokens": patching.rows_for(budget) * task.seq_len,
                    "seconds": round(seconds, 2),
                    "peak_method": "TensorPeak (live tensor storages created by the call)",
                    "met": met,
                }
            )
            if not met:
                missed.append(f"edge-memory {engine}: peak {megabytes(peak.peak)} MB over {megabytes(budget)} MB")
    return missed


STORE_SITE = "L6.mlp_post"
STORE_WINDOWS, STORE_CONTEXT, STORE_BATCH = 64, 128, 4


def store_windows(n: int, vocab_size: int) -> torch.Tensor:
    """`n` seeded windows of random token ids, (n, STORE_CONTEXT)."""
    return torch.randint(3, vocab_size, (n, STORE_CONTEXT), generator=torch.Generator().manual_seed(0))


def run_ray_store(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The ray-store part: a SmolLM2 store collected on Ray workers against the local run, then the store
    under three memory budgets; returns the missed targets."""
    import shutil
    import tempfile
    from pathlib import Path

    from pathlens.features.store import collect
    from pathlens.features.store_budget import store_plan
    from pathlens.memory import TensorPeak, megabytes

    set_threads(1)  # the local floor is single-threaded, like each worker
    model = pathlens.load("smollm2", device=args.device)
    ids = store_windows(STORE_WINDOWS, model.vocab_size)
    window_bytes = model.arch.d_mlp * 4 * STORE_CONTEXT  # L6.mlp_post rows of one window, fp32
    sizes: dict[str, Any] = {"batch_size": STORE_BATCH, "max_bytes": 3 * STORE_BATCH * window_bytes}  # 1 batch/shard
    root = Path(tempfile.mkdtemp(prefix="pathlens-ray-store-"))
    runs = iter(range(10**6))

    def fresh(executor: Any = None) -> Path:
        folder = root / f"run-{next(runs)}"
        collect(model, STORE_SITE, ids, folder, executor=executor, **sizes)
        return folder

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    missed = ray_versus_local(
        args,
        emit,
        "ray-store",
        f"smollm2-store-{STORE_SITE}-{STORE_WINDOWS}x{STORE_CONTEXT}",
        fresh,
        lambda a, b: files(a) == files(b),
        None,
    )
    set_threads(args.threads)
    budget_ids = store_windows(16, model.vocab_size)
    least = store_plan(model, STORE_SITE, budget_ids, "1TB").least_bytes
    for factor in BUDGET_FACTORS:
        budget = int(least * factor)
        plan = store_plan(model, STORE_SITE, budget_ids, budget)
        folder = root / f"budget-{factor}"
        start = time.perf_counter()
        with TensorPeak() as peak:
            store = collect(model, STORE_SITE, budget_ids, folder, max_memory=budget)
        seconds = time.perf_counter() - start
        largest = max((folder / entry["file"]).stat().st_size for entry in store.manifest["shards"])
        met = peak.peak + largest <= budget
        emit(
            {
                "part": "ray-store",
                "workload": f"smollm2-store-{STORE_SITE}-16x{STORE_CONTEXT}",
                "engine": "store",
                "budget_mb": megabytes(budget),
                "peak_mb": megabytes(peak.peak + largest),
                "tensor_peak_mb": megabytes(peak.peak),
                "estimate_mb": megabytes(plan.peak_bytes),
                "batch_windows": plan.batch_size,
                "shard_windows": plan.shard_windows,
                "forwards": plan.forwards,
                "seconds": round(seconds, 2),
                "peak_method": "TensorPeak (live tensor storages created by the call) + the largest shard file",
                "met": met,
            }
        )
        if not met:
            missed.append(f"ray-store memory: peak {megabytes(peak.peak + largest)} MB over {megabytes(budget)} MB")
    shutil.rmtree(root, ignore_errors=True)
    return missed


def ioi_prompt_set(vocab_size: int, n: int) -> Task:
    """`n` IOI-shaped pairs of random tokens (as `synthetic_ioi_task`, at any size): clean and corrupted differ at
    three fixed positions; fixed random answer and wrong ids, scored at the last position."""
    gen = torch.Generator().manual_seed(SEED)
    clean = torch.randint(0, vocab_size, (n, SEQ_LEN), generator=gen)  # (N, P)
    slots = torch.randperm(SEQ_LEN - 1, generator=gen)[:3]  # (3,)
    corrupt = clean.clone()
    corrupt[:, slots] = (clean[:, slots] + torch.randint(1, vocab_size, (n, 3), generator=gen)) % vocab_size
    answers = torch.randint(0, vocab_size, (n,), generator=gen)  # (N,)
    wrong = (answers + torch.randint(1, vocab_size, (n,), generator=gen)) % vocab_size  # (N,)
    return Task.from_ids(clean, corrupt, answers, wrong, name=f"synthetic-ioi-{n}")


def run_ray_attribution(args: argparse.Namespace, emit: Emitter) -> list[str]:
    """The ray-attribution part: AtP over a large prompt set on 1 and 2 Ray workers against the local run, then
    AtP's peak under three budgets; returns the missed targets."""
    set_threads(1)  # the local floor is single-threaded, like each worker
    model = gpt2_model(str(args.device))
    task = ioi_prompt_set(model.vocab_size, ATTRIBUTION_PROMPTS)
    options: dict[str, Any] = {**ATTRIBUTION, "max_batch_tokens": ATTRIBUTION_CHUNK * task.seq_len}
    missed = ray_versus_local(
        args,
        emit,
        "ray-attribution",
        f"gpt2-atp-heads-{task.n}",
        lambda executor: pathlens.atp(model, task, executor=executor, **options),
        same_scores,
        ModelSpec(gpt2_model, {"device": str(args.device)}),
        {"prompts": task.n, "chunks": -(-task.n // ATTRIBUTION_CHUNK)},
    )
    return missed + attribution_memory(args, emit, model)


def attribution_memory(args: argparse.Namespace, emit: Emitter, model: pathlens.Model) -> list[str]:
    """Memory rows of the ray-attribution part: AtP over heads of a smaller prompt set under three `max_memory`
    budgets (2, 4 and 8 times the least, `first_order_cost`), peak measured by `TensorPeak`."""
    from pathlens.memory import TensorPeak, megabytes
    from pathlens.patching.budget import first_order_cost
    from pathlens.sites import Site

    set_threads(args.threads)
    task = ioi_prompt_set(model.vocab_size, ATTRIBUTION_MEMORY_PROMPTS)
    heads = {Site("head", layer) for layer in range(model.n_layers)}
    least = first_order_cost(model, task.seq_len, heads, model.n_layers * model.arch.n_heads).least
    missed = []
    for factor in BUDGET_FACTORS:
        budget = int(least * factor)
        start = time.perf_counter()
        with TensorPeak() as peak:
            scores = pathlens.atp(model, task, max_memory=budget, **ATTRIBUTION)
        seconds = time.perf_counter() - start
        met = peak.peak <= budget
        emit(
            {
                "part": "ray-attribution",
                "workload": f"gpt2-atp-heads-{task.n}",
                "engine": "atp",
                "budget_mb": megabytes(budget),
                "peak_mb": megabytes(peak.peak),
                "prompts_per_chunk": scores.meta.get("prompts_per_chunk", task.n),
                "seconds": round(seconds, 2),
                "peak_method": "TensorPeak (live tensor storages created by the call)",
                "met": met,
            }
        )
        if not met:
            missed.append(
                f"ray-attribution memory: peak {megabytes(peak.peak)} MB over the {megabytes(budget)} MB budget"
            )
    return missed


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a plain table (without --json)."""
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--quick", action="store_true", help="one timed round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the non-Ray parts (0: default)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts: {', '.join(PARTS)}")
    parser.add_argument("--workers", default="1,2", help="comma list of Ray worker counts (ray parts)")
    parser.add_argument(
        "--driver-keeps-freed-memory",
        action="store_true",
        help="ray part: this process's malloc keeps freed memory as the Ray workers' does "
        "(pathlens.distributed.allocator), so the local run differs from a worker only in where it runs",
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_parts(parser, args, PARTS)
    check_repeats_and_threads(parser, args)
    args.workers = [int(w) for w in args.workers.split(",") if w]
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers needs counts of at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    emit = Emitter(args.json, {"versions": versions(["torch", "transformers", "ray"])})
    runs = {
        "ray": run_ray,
        "half": run_half,
        "memory": run_memory,
        "ray-curve": run_ray_curve,
        "edge-memory": run_edge_memory,
        "ray-store": run_ray_store,
        "ray-attribution": run_ray_attribution,
    }
    missed = [problem for part in PARTS if part in args.parts for problem in runs[part](args, emit)]
    if not args.json:
        print_table(emit.rows)
    for problem in missed:
        print(f"MISSED {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
