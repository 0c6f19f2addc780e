"""What the benchmark scripts share: the GPT-2 workload, timing, peak memory, argument checks and output.

- workload: `build_gpt2` (GPT-2-small shape, seeded random weights), `synthetic_ioi_task` (8 IOI-shaped pairs of
  15 random tokens), `task_on` (a task's tensors on a device), `mean_logit_diff` (the metric every library
  computes), `tl_bridge` (TransformerLens' wrapper of an HF model, for the scripts that time it);
- timing: `round_robin`, the one timing loop (runners interleaved round by round, optional warm-up), with
  `time_once` for a runner too slow to repeat and `plain_forward`, the unit floors and costs are measured in;
- memory: `peak_rss_growth_mb` of a call, `in_fresh_process` to measure it where earlier runs cannot hide it;
- arguments: `check_repeats_and_threads` (--quick, --repeats, --threads, and --device when a script adds it with
  `add_device_argument`) and `check_parts` (--parts);
- output: `Emitter` (rows kept for the closing table, each printed at once as a JSON line with --json),
  `versions` of the libraries measured, `max_abs_diff` and `ratio`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from multiprocessing import get_context
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from pathlens.tasks import Task

SEED = 0
N_PROMPTS = 8
SEQ_LEN = 15
N_CORRUPTED = 3
ANSWER_POS = SEQ_LEN - 1
RSS_POLL_S = 0.002

Runner = Callable[[], Any]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------------ workload


def build_gpt2(device: str | torch.device = "cpu") -> GPT2LMHeadModel:
    """GPT-2-small shape with seeded random weights (drawn on the CPU, so every device gets the same ones), fp32,
    eval mode (the default attention implementation), on `device`."""
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(GPT2Config()).eval().to(device)


def synthetic_ioi_task(vocab_size: int) -> Task:
    """IOI-shaped random-token task: 8 pairs of 15 tokens, clean and corrupted differ at 3 fixed positions.

    The answer and wrong token of each row are fixed random ids; the score is read at the last position."""
    gen = torch.Generator().manual_seed(SEED)
    clean = torch.randint(0, vocab_size, (N_PROMPTS, SEQ_LEN), generator=gen)  # (N, P)
    slots = torch.randperm(ANSWER_POS, generator=gen)[:N_CORRUPTED].sort().values  # (N_CORRUPTED,)
    corrupt = clean.clone()
    shift = torch.randint(1, vocab_size, (N_PROMPTS, N_CORRUPTED), generator=gen)
    corrupt[:, slots] = (clean[:, slots] + shift) % vocab_size
    answers = torch.randint(0, vocab_size, (N_PROMPTS,), generator=gen)  # (N,)
    wrong = (answers + torch.randint(1, vocab_size, (N_PROMPTS,), generator=gen)) % vocab_size  # (N,)
    return Task(
        name="synthetic-ioi",
        clean_ids=clean,
        corrupt_ids=corrupt,
        answer_ids=answers,
        wrong_ids=wrong,
        answer_pos=torch.full((N_PROMPTS,), ANSWER_POS),
        attention_mask=torch.ones_like(clean),
        meta={"seed": SEED, "corrupted_positions": slots.tolist()},
    )


def mean_logit_diff(logits: Tensor, task: Task) -> Tensor:
    """Batch-mean logit(answer) - logit(wrong) at each row's answer position; logits (N, P, V) -> scalar."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    final = logits[rows, task.answer_pos.to(logits.device)]  # (N, V)
    answers, wrong = task.answer_ids.to(logits.device), task.wrong_ids.to(logits.device)
    return (final[rows, answers] - final[rows, wrong]).mean()


def task_on(task: Task, device: str | torch.device) -> Task:
    """`task` with its token tensors on `device`, for the runs that feed a model by hand (floors, peers); pathlens
    moves a task's inputs to `Model.device` itself."""
    tensors = ("clean_ids", "corrupt_ids", "answer_ids", "wrong_ids", "answer_pos", "attention_mask")
    return dataclasses.replace(task, **{name: getattr(task, name).to(device) for name in tensors})


def tl_bridge(hf: PreTrainedModel, own_copy: bool = True) -> Any:
    """A TransformerLens TransformerBridge around `hf`, in eval mode.

    The bridge replaces the model's submodules in place, so with `own_copy` it wraps a deep copy and `hf` stays
    usable by the other libraries timed next to it."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    model = copy.deepcopy(hf) if own_copy else hf
    bridge = build_bridge_from_module(model, type(model).__name__, hf_config=model.config)
    bridge.eval()
    return bridge


# -------------------------------------------------------------------------------------------------------- timing


@dataclass
class Timed:
    """One runner's result and the wall times of its timed runs.

    The result is the warm-up run's when the runner had one (so what is checked is the first run's output), else
    the last timed run's."""

    result: Any
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def round_robin(
    runners: Mapping[str, Runner],
    repeats: int,
    warm_up: bool | Collection[str] = True,
    runs_per_round: Mapping[str, int] | None = None,
) -> dict[str, Timed]:
    """Time `repeats` rounds, each round running every runner in turn (`runs_per_round[name]` times, default 1).

    Interleaving spreads a shared machine's load changes over all runners alike. Runners named by `warm_up`
    (True: all) first run once untimed, in order. Garbage is collected before each timed run, outside the
    timed span."""
    warm = set(runners) if warm_up is True else set(warm_up or ())
    per_round = runs_per_round or {}
    results = {name: Timed(result=run()) for name, run in runners.items() if name in warm}
    for _ in range(repeats):
        for name, run in runners.items():
            for _ in range(per_round.get(name, 1)):
                gc.collect()
                start = time.perf_counter()
                result = run()
                seconds = time.perf_counter() - start
                timed = results.setdefault(name, Timed(result=result))
                if name not in warm:
                    timed.result = result
                timed.seconds.append(seconds)
    return results


def time_once(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()`'s result and its wall time, for a run too slow to repeat (`round_robin` of one run, no warm-up)."""
    timed = round_robin({"run": fn}, 1, warm_up=False)["run"]
    return timed.result, timed.seconds[0]


def plain_forward(hf: nn.Module, task: Task) -> Runner:
    """A runner doing one plain forward of the corrupted batch (no hooks, under no_grad), the unit of the floors."""

    def run() -> None:
        with torch.no_grad():
            hf(task.corrupt_ids, attention_mask=task.attention_mask)

    return run


# -------------------------------------------------------------------------------------------------------- memory


def current_rss() -> int:
    """Resident set size of this process in bytes, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth_mb(fn: Runner) -> float:
    """Peak RSS growth while `fn()` runs, in MiB, over the RSS just before it.

    A thread samples /proc/self/statm every 2 ms; the kernel's high-water mark (ru_maxrss) also counts when `fn`
    raised it above its value before the call, which catches spikes shorter than the sampling period."""
    gc.collect()
    start = current_rss()
    hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, current_rss())
            time.sleep(RSS_POLL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    hwm_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if hwm_after > hwm_before:
        peak = max(peak, hwm_after)
    return (max(peak, current_rss()) - start) / 2**20


def in_fresh_process(fn: Callable[..., T], *args: Any, env: Mapping[str, str | None] | None = None) -> T:
    """`fn(*args)` in a newly spawned interpreter, so that earlier runs' allocations cannot hide this one's.

    `env` is set for the child (a None value removes the variable), which inherits it at start-up; this
    process's environment is restored afterwards. `fn` must be importable by name (a module-level function)."""

    def apply(values: Mapping[str, str | None]) -> None:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    changes = dict(env or {})
    saved = {name: os.environ.get(name) for name in changes}
    apply(changes)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        apply(saved)


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads; None keeps torch's default (one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------- arguments


def check_repeats_and_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--quick` means one repeat, `--repeats` ≥ 1, `--threads` ≥ 0 (every benchmark script).

    `args.threads` becomes None for 0 (keep torch's default), the value `set_threads` takes."""
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's default) or more")
    args.threads = args.threads or None
    if hasattr(args, "device"):
        check_device(parser, args)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device` (default cpu): where a script builds its models, so the same script measures a GPU."""
    parser.add_argument("--device", default="cpu", help="torch device of the models: cpu, cuda, cuda:1, mps")


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--device` names a device this machine has (checked by `check_repeats_and_threads` when the script has it)."""
    from pathlens.errors import PathlensError
    from pathlens.loading import as_device

    try:
        args.device = as_device(args.device)
    except PathlensError as err:
        parser.error(f"--device: {err}")


def check_parts(parser: argparse.ArgumentParser, args: argparse.Namespace, parts: tuple[str, ...]) -> None:
    """`--parts` (a comma list, split in place into a list) names only known parts."""
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in args.parts if p not in parts]
    if unknown:
        parser.error(f"unknown part: {', '.join(unknown)}")


# -------------------------------------------------------------------------------------------------------- output


@dataclass
class Emitter:
    """Collects a benchmark's rows, each with the `extra` fields added; with `json`, prints each row at once as
    one JSON line (a long run shows its rows as they come)."""

    json: bool
    extra: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, row: dict[str, Any]) -> None:
        row = {**row, **self.extra}
        self.rows.append(row)
        if self.json:
            print(json.dumps(row), flush=True)

    def finish(self) -> None:
        """Without `json`, print every row collected (with it, each was printed as it came)."""
        if not self.json:
            for row in self.rows:
                print(row)


def emit_rows(rows: Iterable[dict[str, Any]], json: bool, model: str = "smollm2") -> None:
    """Emit every row of `rows` as they come, each with the model's name and this process's torch threads, then
    finish (the main loop of a benchmark whose rows come from one generator)."""
    emit = Emitter(json=json, extra={"model": model, "threads": torch.get_num_threads()})
    for row in rows:
        emit(row)
    emit.finish()


def versions(dists: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution, by its name on PyPI."""
    return {name: version(name) for name in dists}


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """Largest |a - b| of two same-shape grids."""
    if a.shape != b.shape:
        raise ValueError(f"grids differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing."""
    if numerator is None or denominator is None:
        return None
    return numerator / denominator
