"""Activation-patching benchmark: pathlens against TransformerLens, nnsight and a plain-torch loop.

Every library computes the same denoising patching grid on the same weights in one process: for each site, the
batch-mean logit difference (answer - wrong, at the answer position) of the corrupted run with that one site's
clean activation patched in. Workloads:

- gpt2-heads: GPT-2-small shape (random init), every head's output over all positions, grid (layer, head).
- gpt2-resid-pre: the same model, the residual stream entering every block at every position, grid (layer, pos).
- smollm2-heads / smollm2-resid-pre: the embedded SmolLM2 model on an IOI task, pathlens alone.
- checkpoint-overhead: the cost of `patch(out=...)`: one pathlens sweep timed without and with a checkpoint folder.

Run `python benchmarks/patching.py --json` for one JSON line per workload; see benchmarks/README.md for what
each number means, how peak memory and the FLOP floor are computed, and which peer variants are used.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/patching.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import copy
import functools
import itertools
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import GPT2LMHeadModel

from benchmarks.common import (
    N_PROMPTS,
    SEED,
    Emitter,
    Timed,
    add_device_argument,
    build_gpt2,
    check_repeats_and_threads,
    in_fresh_process,
    max_abs_diff,
    mean_logit_diff,
    peak_rss_growth_mb,
    plain_forward,
    ratio,
    round_robin,
    set_threads,
    synthetic_ioi_task,
    task_on,
    tl_bridge,
    versions,
)
from pathlens.tasks import Task

GPT2_WORKLOADS = ("gpt2-heads", "gpt2-resid-pre")
SMOLLM2_WORKLOADS = ("smollm2-heads", "smollm2-resid-pre")
CHECKPOINT_WORKLOAD = "checkpoint-overhead"
CHECKPOINT_TARGET = 1.10
"""Largest allowed (sweep with out=) / (same sweep without) time."""
PATHLENS_ONLY = (*SMOLLM2_WORKLOADS, CHECKPOINT_WORKLOAD)
PEERS = ("tl", "nnsight")
LIBRARIES = ("pathlens", *PEERS)
TL_VARIANT = (
    "TransformerBridge built by transformer_lens.model_bridge.sources.build_bridge_from_module around a deep copy "
    "of the benchmark's HF GPT2LMHeadModel (same weights; the bridge replaces the model's submodules in place, so "
    "it gets its own copy); clean cache from bridge.run_with_cache, grids from transformer_lens.patching"
)
NNSIGHT_VARIANT = "nnsight.NNsight around a deep copy of the HF model (NNsight wraps module forwards in place)"
PEER_DISTS = {"tl": "transformer-lens", "nnsight": "nnsight"}
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
FORWARD = "plain forward"
FORWARDS_PER_ROUND = 3

Grid = Tensor
Runner = Callable[[Task], Grid]


# ----------------------------------------------------------------------------------------------- workload set-up


def family_of(workload: str) -> str:
    """The site family a workload patches: "heads" or "resid_pre"."""
    return "heads" if workload.endswith("-heads") else "resid_pre"


# ------------------------------------------------------------------------------------ plain-torch reference loop


def _save_input_hook(store: dict[int, Tensor], layer: int) -> Callable[..., None]:
    """A forward pre-hook that keeps a copy of the module's first input in `store[layer]`."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        store[layer] = args[0].clone()

    return hook


def reference_runner(hf: GPT2LMHeadModel, family: str) -> Runner:
    """One full forward per patch, patched by a forward pre-hook: the correctness reference.

    heads: the head's slice of the input to `attn.c_proj` (the per-head outputs z, concatenated) at all
    positions; resid_pre: the input hidden state of block L at one position."""
    blocks = hf.transformer.h
    n_heads, d_head = hf.config.n_head, hf.config.n_embd // hf.config.n_head

    def module_for(layer: int) -> nn.Module:
        return hf.get_submodule(f"transformer.h.{layer}.attn.c_proj" if family == "heads" else f"transformer.h.{layer}")

    def run(task: Task) -> Grid:
        clean: dict[int, Tensor] = {}
        handles = [
            module_for(layer).register_forward_pre_hook(_save_input_hook(clean, layer)) for layer in range(len(blocks))
        ]
        try:
            hf(task.clean_ids)
        finally:
            for handle in handles:
                handle.remove()
        width = n_heads if family == "heads" else task.seq_len
        grid = torch.empty(len(blocks), width)
        for layer in range(len(blocks)):
            for index in range(width):
                cols = slice(index * d_head, (index + 1) * d_head) if family == "heads" else None

                def patch(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    layer: int = layer,
                    index: int = index,
                    cols: slice | None = cols,
                ) -> tuple[Any, ...]:
                    value = args[0].clone()
                    if cols is not None:
                        value[:, :, cols] = clean[layer][:, :, cols]
                    else:
                        value[:, index] = clean[layer][:, index]
                    return (value, *args[1:])

                handle = module_for(layer).register_forward_pre_hook(patch)
                try:
                    grid[layer, index] = mean_logit_diff(hf(task.corrupt_ids).logits, task)
                finally:
                    handle.remove()
        return grid

    return run


# ------------------------------------------------------------------------------------------------------ peers


def tl_runner(hf: GPT2LMHeadModel, family: str, own_copy: bool) -> Runner:
    """TransformerLens: a TransformerBridge around the HF model, then `patching.get_act_patch_*`."""
    from transformer_lens import patching

    bridge = tl_bridge(hf, own_copy)
    sweep = patching.get_act_patch_attn_head_out_all_pos if family == "heads" else patching.get_act_patch_resid_pre

    def run(task: Task) -> Grid:
        _, cache = bridge.run_with_cache(task.clean_ids)
        return sweep(bridge, task.corrupt_ids, cache, lambda logits: mean_logit_diff(logits, task)).float().cpu()

    return run


def nnsight_runner(hf: GPT2LMHeadModel, family: str, own_copy: bool) -> Runner:
    """nnsight, idiomatic: one trace to save the clean activations, then one trace per patch."""
    import nnsight

    model = nnsight.NNsight(copy.deepcopy(hf) if own_copy else hf)
    n_layers, n_heads = hf.config.n_layer, hf.config.n_head
    d_head = hf.config.n_embd // n_heads

    def run(task: Task) -> Grid:
        clean = []
        with model.trace(task.clean_ids):
            for layer in range(n_layers):
                block = model.transformer.h[layer]
                site = block.attn.c_proj.input if family == "heads" else block.input
                clean.append(site.save())
        width = n_heads if family == "heads" else task.seq_len
        grid = torch.empty(n_layers, width)
        for layer in range(n_layers):
            for index in range(width):
                with model.trace(task.corrupt_ids):
                    block = model.transformer.h[layer]
                    if family == "heads":
                        cols = slice(index * d_head, (index + 1) * d_head)
                        block.attn.c_proj.input[:, :, cols] = clean[layer][:, :, cols]
                    else:
                        block.input[:, index] = clean[layer][:, index]
                    value = nnsight.save(mean_logit_diff(model.lm_head.output, task))
                grid[layer, index] = value
        return grid

    return run


def pathlens_runner(hf: nn.Module, family: str, tokenizer: Any = None) -> Runner:
    """pathlens.patch on `Model(hf)`; raises at once if pathlens has no `patch` yet."""
    import pathlens

    if not hasattr(pathlens, "patch"):
        raise RuntimeError(
            "pathlens.patch does not exist in this checkout, so pathlens cannot be benchmarked; "
            "run with --libs tl,nnsight to time the peers alone."
        )
    model = pathlens.Model(hf, tokenizer=tokenizer)
    positions: Literal["all", "each"] = "all" if family == "heads" else "each"

    def run(task: Task) -> Grid:
        user_task = task_on(task, "cpu")  # as a user holds it: pathlens moves inputs to the model's device
        scores = pathlens.patch(
            model, user_task, sites=family, positions=positions, direction="denoise", progress=False
        )
        return scores.values.float()

    return run


def make_runner(library: str, hf: GPT2LMHeadModel, family: str, own_copy: bool) -> Runner:
    """The runner of `library` ("pathlens", "tl", "nnsight" or "torch") on the GPT-2 model."""
    if library == "pathlens":
        return pathlens_runner(hf, family)
    if library == "tl":
        return tl_runner(hf, family, own_copy)
    if library == "nnsight":
        return nnsight_runner(hf, family, own_copy)
    return reference_runner(hf, family)


# ----------------------------------------------------------------------------------------------- FLOP floor


@dataclass(frozen=True)
class Shape:
    """The matmul-relevant sizes of a decoder-only transformer."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    mlp_matrices: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        """Read the sizes of a GPT-2 or Llama-family HF config."""
        if config.model_type == "gpt2":
            return cls(
                n_layers=config.n_layer,
                d_model=config.n_embd,
                n_heads=config.n_head,
                n_kv_heads=config.n_head,
                d_head=config.n_embd // config.n_head,
                d_mlp=config.n_inner or 4 * config.n_embd,
                mlp_matrices=2,
                vocab=config.vocab_size,
            )
        if config.model_type == "llama":
            d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            return cls(
                n_layers=config.num_hidden_layers,
                d_model=config.hidden_size,
                n_heads=config.num_attention_heads,
                n_kv_heads=config.num_key_value_heads,
                d_head=d_head,
                d_mlp=config.intermediate_size,
                mlp_matrices=3,
                vocab=config.vocab_size,
            )
        raise ValueError(f"no FLOP model for model_type {config.model_type!r}")

    def layer_row_flops(self, n_keys: int) -> int:
        """Matmul FLOPs of one block for one query row attending over `n_keys` keys.

        QKV projections, attention scores and mix, output projection and the MLP; 2 FLOPs per multiply-add."""
        q_width, kv_width = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        qkv = 2 * self.d_model * (q_width + 2 * kv_width)
        attention = 2 * 2 * n_keys * q_width
        out = 2 * q_width * self.d_model
        mlp = 2 * self.mlp_matrices * self.d_model * self.d_mlp
        return qkv + attention + out + mlp

    def unembed_row_flops(self) -> int:
        return 2 * self.d_model * self.vocab

    def cone_flops(self, batch: int, seq_len: int, layer: int, first_pos: int) -> int:
        """FLOPs of blocks layer..end for query rows first_pos..seq_len-1 (over all keys), plus their unembedding."""
        rows = seq_len - first_pos
        return batch * rows * ((self.n_layers - layer) * self.layer_row_flops(seq_len) + self.unembed_row_flops())

    def forward_flops(self, batch: int, seq_len: int) -> int:
        return self.cone_flops(batch, seq_len, 0, 0)

    def workload_cone_flops(self, family: str, batch: int, seq_len: int) -> int:
        """Sum of cone FLOPs over every patch of a workload (heads: all positions; resid_pre: one per position)."""
        if family == "heads":
            return sum(self.n_heads * self.cone_flops(batch, seq_len, layer, 0) for layer in range(self.n_layers))
        return sum(
            self.cone_flops(batch, seq_len, layer, pos) for layer in range(self.n_layers) for pos in range(seq_len)
        )

    def n_patches(self, family: str, seq_len: int) -> int:
        return self.n_layers * (self.n_heads if family == "heads" else seq_len)


# ---------------------------------------------------------------------------------------------- peak memory


def memory_child(library: str, workload: str, threads: int | None) -> float:
    """In a fresh process: build the model, task and library wrapper, then measure one run's peak RSS growth."""
    set_threads(threads)
    hf = build_gpt2()
    task = synthetic_ioi_task(hf.config.vocab_size)
    runner = make_runner(library, hf, family_of(workload), own_copy=False)
    with torch.no_grad():
        return peak_rss_growth_mb(lambda: runner(task))


def measure_memory(library: str, workload: str, threads: int | None, allocator: str) -> float:
    """`memory_child` in a new spawned interpreter (`in_fresh_process`).

    `allocator="live"` fixes glibc's mmap threshold at 128 KiB (MALLOC_MMAP_THRESHOLD_) in the child, so every
    tensor-sized block is mapped on allocation and unmapped on free and RSS follows the memory the run holds
    live; `"default"` keeps glibc's dynamic threshold, whose RSS also counts freed blocks the heap keeps and so
    depends on the order and sizes of past allocations."""
    threshold = str(128 * 1024) if allocator == "live" else None
    return in_fresh_process(memory_child, library, workload, threads, env={MMAP_THRESHOLD_ENV: threshold})


# ------------------------------------------------------------------------------------------------ workloads


def time_grids(
    runners: dict[str, Runner], task: Task, repeats: int, hf: nn.Module
) -> tuple[dict[str, Timed], list[float]]:
    """`round_robin` of the runners on `task` under no_grad, each round opening with three plain forwards of `hf`
    (for the floor). Returns the timings (a runner's result is its warm-up grid) and the plain-forward times."""
    rounds: dict[str, Callable[[], Any]] = {FORWARD: plain_forward(hf, task)}
    rounds.update({name: functools.partial(run, task) for name, run in runners.items()})
    with torch.no_grad():
        timed = round_robin(rounds, repeats, runs_per_round={FORWARD: FORWARDS_PER_ROUND})
    return timed, timed.pop(FORWARD).seconds


def run_gpt2_workload(
    workload: str, libraries: list[str], repeats: int, threads: int | None, memory: bool, device: torch.device
) -> dict[str, Any]:
    """Time `libraries` and the reference loop on one GPT-2 workload on `device` (every library's model there, the
    task's tensors too); check their grids agree; measure memory."""
    family = family_of(workload)
    hf = build_gpt2(device)
    task = task_on(synthetic_ioi_task(hf.config.vocab_size), device)
    shape = Shape.of(hf.config)
    runners = {lib: make_runner(lib, hf, family, own_copy=True) for lib in libraries}
    runners["torch"] = make_runner("torch", hf, family, own_copy=False)
    timed, forwards = time_grids(runners, task, repeats, hf)
    reference = timed["torch"].result
    t_forward = statistics.median(forwards)
    flops = shape.workload_cone_flops(family, task.n, task.seq_len)
    floor = flops / shape.forward_flops(task.n, task.seq_len) * t_forward
    seconds = {lib: timed[lib].median if lib in timed else None for lib in (*LIBRARIES, "torch")}
    grids = {lib: t.result for lib, t in timed.items()}
    diff_ref = {lib: max_abs_diff(grid, reference) for lib, grid in grids.items() if lib != "torch"}
    diff_pathlens = {
        peer: max_abs_diff(grids["pathlens"], grids[peer]) if "pathlens" in grids and peer in grids else None
        for peer in PEERS
    }
    peer_diffs = [d for d in diff_pathlens.values() if d is not None]
    measured = (*libraries, "torch")
    peak = {lib: measure_memory(lib, workload, threads, "live") for lib in measured} if memory else None
    peak_default = {lib: measure_memory(lib, workload, threads, "default") for lib in measured} if memory else None
    return {
        "workload": workload,
        "pathlens_s": seconds["pathlens"],
        "tl_s": seconds["tl"],
        "nnsight_s": seconds["nnsight"],
        "torch_s": seconds["torch"],
        "floor_s": floor,
        "speedup_vs_tl": ratio(seconds["tl"], seconds["pathlens"]),
        "speedup_vs_nnsight": ratio(seconds["nnsight"], seconds["pathlens"]),
        "speedup_vs_torch": ratio(seconds["torch"], seconds["pathlens"]),
        "pathlens_over_floor": ratio(seconds["pathlens"], floor),
        "max_abs_diff": max(peer_diffs) if peer_diffs else None,
        "max_abs_diff_tl": diff_pathlens["tl"],
        "max_abs_diff_nnsight": diff_pathlens["nnsight"],
        "max_abs_diff_vs_torch": diff_ref,
        "grid_abs_max": float(reference.abs().max()),
        "peak_mb": peak,
        "peak_mb_default_malloc": peak_default,
        "n_patches": shape.n_patches(family, task.seq_len),
        "forward_s": t_forward,
        "cone_gflop": flops / 1e9,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "tl_variant": TL_VARIANT if "tl" in libraries else None,
        "nnsight_variant": NNSIGHT_VARIANT if "nnsight" in libraries else None,
        "versions": versions(["torch", "transformers", *(PEER_DISTS[lib] for lib in libraries if lib in PEERS)]),
    }


def run_smollm2_workloads(workloads: list[str], repeats: int, device: torch.device) -> list[dict[str, Any]]:
    """pathlens alone on the embedded SmolLM2 (on `device`) with an IOI task (BABA templates), against the FLOP
    floor."""
    import pathlens
    from pathlens.tasks import ioi

    model = pathlens.load("smollm2", device=device)
    task = task_on(ioi(model.tokenizer, n=N_PROMPTS, seed=SEED, templates="BABA"), device)
    shape = Shape.of(model.hf.config)
    rows = []
    for workload in workloads:
        family = family_of(workload)
        runner = pathlens_runner(model.hf, family, tokenizer=model.tokenizer)
        timed, forwards = time_grids({"pathlens": runner}, task, repeats, model.hf)
        flops = shape.workload_cone_flops(family, task.n, task.seq_len)
        floor = flops / shape.forward_flops(task.n, task.seq_len) * statistics.median(forwards)
        rows.append(
            {
                "workload": workload,
                "pathlens_s": timed["pathlens"].median,
                "floor_s": floor,
                "pathlens_over_floor": timed["pathlens"].median / floor,
            }
        )
    return rows


def run_checkpoint_workload(repeats: int, device: torch.device) -> dict[str, Any]:
    """The same pathlens sweep timed without and with `out=` (a new folder each run, so nothing resumes),
    interleaved by `round_robin`: GPT-2-small shape, the residual stream entering every block at every position,
    one chunk per (layer, position) — the most checkpoint writes per second of compute of the patching workloads.
    `out=` adds the fingerprint (a SHA-256 over every weight) and one log append per chunk."""
    from safetensors.torch import load_file

    import pathlens

    hf = build_gpt2(device)
    model, task = pathlens.Model(hf), synthetic_ioi_task(hf.config.vocab_size)
    with tempfile.TemporaryDirectory() as root:
        folders = (os.path.join(root, str(i)) for i in itertools.count())

        def sweep(out: str | None) -> Grid:
            return pathlens.patch(model, task, sites="resid_pre", positions="each", out=out, progress=False).values

        timed = round_robin({"plain": lambda: sweep(None), "out": lambda: sweep(next(folders))}, repeats)
        chunks = load_file(os.path.join(root, "0", "progress.safetensors"))["done"].numel()
    seconds_plain, seconds_out = timed["plain"].median, timed["out"].median
    overhead = seconds_out / seconds_plain
    return {
        "workload": CHECKPOINT_WORKLOAD,
        "seconds_plain": seconds_plain,
        "seconds_out": seconds_out,
        "ratio": overhead,
        "met": overhead <= CHECKPOINT_TARGET,
        "target": CHECKPOINT_TARGET,
        "chunks": chunks,
        "identical": torch.equal(timed["plain"].result, timed["out"].result),
        "repeats": repeats,
    }


# ----------------------------------------------------------------------------------------------------- output


TABLE_COLUMNS = (
    ("pathlens", "pathlens_s", ".2f"),
    ("TL", "tl_s", ".2f"),
    ("nnsight", "nnsight_s", ".2f"),
    ("torch", "torch_s", ".2f"),
    ("floor", "floor_s", ".2f"),
    ("x TL", "speedup_vs_tl", ".1f"),
    ("x nns", "speedup_vs_nnsight", ".1f"),
    ("/floor", "pathlens_over_floor", ".2f"),
    ("max|d|", "max_abs_diff", ".1e"),
)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Readable summary: seconds per library, floor, ratios, agreement and peak memory."""
    grids = [row for row in rows if row["workload"] != CHECKPOINT_WORKLOAD]
    print(f"{'workload':<19}" + "".join(f"{title:>10}" for title, _, _ in TABLE_COLUMNS))
    print("-" * (19 + 10 * len(TABLE_COLUMNS)))
    for row in grids:
        cells = ("-" if row.get(key) is None else format(row[key], spec) for _, key, spec in TABLE_COLUMNS)
        print(f"{row['workload']:<19}" + "".join(f"{cell:>10}" for cell in cells))
    print("\nseconds = median wall time; x TL / x nns = peer time / pathlens time; /floor = pathlens time / floor.")
    for row in rows:
        if row["workload"] == CHECKPOINT_WORKLOAD:
            print(
                f"{CHECKPOINT_WORKLOAD}: {row['seconds_plain']:.2f} s without out=, {row['seconds_out']:.2f} s with "
                f"({row['chunks']} chunks): x{row['ratio']:.3f} (target <= {row['target']:.2f}: "
                f"{'met' if row['met'] else 'NOT met'}; scores identical: {row['identical']})"
            )
    for row in grids:
        if row.get("max_abs_diff_vs_torch"):
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in row["max_abs_diff_vs_torch"].items())
            scale = f"grid values up to {row['grid_abs_max']:.2f}"
            print(f"{row['workload']}: max |grid - plain-torch reference|: {diffs} ({scale})")
        for key, label in (("peak_mb", "live"), ("peak_mb_default_malloc", "glibc default")):
            if row.get(key):
                peaks = ", ".join(f"{k} {v:.0f} MiB" for k, v in row[key].items())
                print(f"{row['workload']}: peak RSS growth ({label} allocator): {peaks}")


def disagreements(rows: list[dict[str, Any]], tol: float) -> list[str]:
    """Every (workload, library) whose grid differs from the plain-torch reference by more than `tol`."""
    return [
        f"{row['workload']}: {lib} differs from the reference by {diff:.3g} (> {tol:g})"
        for row in rows
        for lib, diff in (row.get("max_abs_diff_vs_torch") or {}).items()
        if diff > tol
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line per workload")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library (median reported)")
    parser.add_argument("--quick", action="store_true", help="one timed run per library (same as --repeats 1)")
    parser.add_argument(
        "--libs", default=",".join(LIBRARIES), help="comma list of libraries to time next to the plain-torch loop"
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help="comma list of workloads (default: all; the smollm2 and checkpoint ones only when pathlens is in --libs)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads; 0 keeps torch's default (one per core)"
    )
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory (saves one run each)")
    parser.add_argument("--tol", type=float, default=1e-3, help="largest allowed |grid - reference| (exit 1 above)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    args.libs = [lib for lib in args.libs.split(",") if lib]
    if args.workloads is None:
        args.workloads = list(GPT2_WORKLOADS + (PATHLENS_ONLY if "pathlens" in args.libs else ()))
    else:
        args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [lib for lib in args.libs if lib not in LIBRARIES] + [
        w for w in args.workloads if w not in GPT2_WORKLOADS + PATHLENS_ONLY
    ]
    if unknown:
        parser.error(f"unknown library or workload: {', '.join(unknown)}")
    if any(w in PATHLENS_ONLY for w in args.workloads) and "pathlens" not in args.libs:
        parser.error("the smollm2 and checkpoint workloads time pathlens alone; keep pathlens in --libs or drop them")
    check_repeats_and_threads(parser, args)
    if args.device.type != "cpu" and not args.skip_memory:
        parser.error(
            "peak memory is measured as the CPU process's RSS: with --device other than cpu, add --skip-memory"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    emit = Emitter(json=args.json)
    for workload in (w for w in GPT2_WORKLOADS if w in args.workloads):
        emit(run_gpt2_workload(workload, args.libs, args.repeats, args.threads, not args.skip_memory, args.device))
    smollm2 = [w for w in SMOLLM2_WORKLOADS if w in args.workloads]
    if smollm2:
        for row in run_smollm2_workloads(smollm2, args.repeats, args.device):
            emit(row)
    if CHECKPOINT_WORKLOAD in args.workloads:
        emit(run_checkpoint_workload(args.repeats, args.device))
    if not args.json:
        print_table(emit.rows)
    problems = disagreements(emit.rows, args.tol)
    for problem in problems:
        print(f"DISAGREEMENT {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
