"""`pathlens.patch`: activation patching and ablation sweeps → `Scores`.

Every cell is the batch-mean metric of one patched run:
- direction="denoise": the corrupted prompts with one site's clean activation patched in;
- direction="noise": the clean prompts with one site's corrupted activation patched in;
- ablation="zero" | "mean" | "resample": the clean prompts with one site ablated (mean / resample over the
  task's clean prompts).

Variants are grouped by where their causal cone starts, batched K at a time into K·N-row forwards chunked to
`max_batch_tokens` (a chunk never holds more), and run by `ConeRunner` from the cached block inputs. Sites
outside the blocks (embed, module paths) run the whole model, still batched. With `out=`, each finished chunk
is written to disk atomically and a re-run with the same arguments resumes where it stopped; chunking is fixed
by the plan, so resumed scores are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors.torch import load_file
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Ablate, Intervention, Op, Replace
from pathlens.model import Model
from pathlens.patching.cone import ConePatch, ConeRunner, cone_start
from pathlens.patching.plan import Plan, Variant, make_plan
from pathlens.results import Scores
from pathlens.results.io import write_bytes, write_safetensors
from pathlens.sites import Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import metric_name

DEFAULT_MAX_BATCH_TOKENS = 2048
PREFILTERS = ("atp*", "relp", "atp")
_NO_OP_LAYER = -1  # chunk layer of variants that patch nothing (see `executed_variant`); they start at P


@dataclass(frozen=True)
class Chunk:
    """Variants (indices into the plan) run together on task rows [row_start, row_stop) from a cone start."""

    variants: tuple[int, ...]
    row_start: int
    row_stop: int
    layer: int | None
    start: int


def _chunks(
    indices: Sequence[int], starts: list[tuple[int, int] | None], n: int, seq_len: int, max_batch_tokens: int
) -> list[Chunk]:
    """Deterministic chunking of the variants `indices`: group by cone start (`starts[i]`), then as many
    variants × rows as the token budget allows."""
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for i in indices:
        groups.setdefault(starts[i], []).append(i)
    chunks: list[Chunk] = []
    for key in sorted(groups, key=lambda s: (-1, -1) if s is None else s):
        members = groups[key]
        layer, start = (None, 0) if key is None else key
        tokens_per_row = max(1, seq_len - start)
        per_variant = n * tokens_per_row
        if per_variant <= max_batch_tokens:
            k = max_batch_tokens // per_variant
            for i in range(0, len(members), k):
                chunks.append(Chunk(tuple(members[i : i + k]), 0, n, layer, start))
        else:
            rows = max(1, max_batch_tokens // tokens_per_row)
            for m in members:
                for r in range(0, n, rows):
                    chunks.append(Chunk((m,), r, min(n, r + rows), layer, start))
    return chunks


def scored_view(task: Task, rows: Tensor, k: int) -> Task:
    """The task for logits of shape (k·R, 1, V) taken at the scored positions of `rows` (tiled k times)."""
    sub = task.rows(rows).tile(k)
    first = sub.clean_ids[:, :1]
    return replace(
        sub,
        clean_ids=first,
        corrupt_ids=first,
        attention_mask=torch.ones_like(first),
        answer_pos=torch.zeros_like(sub.answer_pos),
        roles={},
    )


class _Checkpoint:
    """Per-row metric values and finished chunks of a sweep, kept in `out/` with atomic writes."""

    def __init__(self, out: Path | None, fingerprint: dict[str, Any], n_variants: int, n_rows: int, n_chunks: int):
        self.out = out
        self.values = torch.full((n_variants, n_rows), float("nan"), dtype=torch.float64)
        self.done = torch.zeros(n_chunks, dtype=torch.uint8)
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        plan_file = out / "sweep.json"
        if plan_file.exists():
            saved = json.loads(plan_file.read_text())
            if saved != fingerprint:
                raise PathlensError(
                    f"{out} holds a different sweep (its sweep.json differs from this call); resume with the same "
                    "model, task and arguments, or pass another out= folder."
                )
            state = out / "progress.safetensors"
            if state.exists():
                tensors = load_file(state)
                self.values, self.done = tensors["values"], tensors["done"]
        else:
            write_bytes(plan_file, json.dumps(fingerprint, indent=1).encode())

    def record(self, chunk_index: int, variants: Sequence[int], rows: slice, values: Tensor) -> None:
        self.values[list(variants), rows] = values.double()
        self.done[chunk_index] = 1
        if self.out is not None:
            write_safetensors(self.out / "progress.safetensors", {"values": self.values, "done": self.done})


def _fingerprint(model: Model, task: Task, plan: Plan, settings: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for t in (task.clean_ids, task.corrupt_ids, task.answer_ids, task.wrong_ids, task.answer_pos, task.attention_mask):
        digest.update(t.numpy().tobytes())
    params = hashlib.sha256()
    for _, p in sorted(model.hf.named_parameters())[:4]:
        params.update(p.detach().float().flatten()[:64].numpy().tobytes())
    return {
        "model": model.name,
        "family": model.arch.family,
        "weights_probe": params.hexdigest(),
        "task": task.name,
        "task_sha256": digest.hexdigest(),
        "dims": list(plan.dims),
        "coords": {k: [str(x) for x in v] for k, v in plan.coords.items()},
        **settings,
    }


def patch(
    model: Model,
    task: Task,
    sites: "str | Sequence[Site | str]" = "heads",
    positions: "str | Sequence[int]" = "all",
    direction: str = "denoise",
    ablation: str | None = None,
    metric: Callable[[Tensor, Task], Tensor] | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    out: "str | os.PathLike[str] | None" = None,
    progress: bool = True,
    cone: bool = True,
    seed: int = 0,
    top_k: int | None = None,
    prefilter: str = "atp*",
) -> Scores:
    """Patch (or ablate) every site of `sites` at `positions`; return the patched metric per cell as Scores.

    sites: a family ("heads", "z", "q", "k", "v", "attn_out", "mlp_in", "mlp_out", "resid_pre", "resid_mid",
        "resid_post", "neurons" with `neurons={layer: [i, ...]}`) or a list of sites ("L3.H2", "module:a.b", ...).
    positions: "all" (one patch over every position), "each" (one per position, adds a `pos` dim) or a list.
    direction: "denoise" (corrupted run, clean activation patched in) or "noise" (the reverse).
    ablation: "zero" | "mean" | "resample" to ablate on the clean prompts instead of patching.
    metric: per-prompt metric (logits, task) -> (N,); it sees logits (N, 1, V) at the scored positions.
    layers: restrict a family to these layers. max_batch_tokens: the most tokens one patched forward holds.
    out: folder for resumable progress (a re-run with the same arguments resumes). cone=False runs every
        variant through the whole model (the slow path the tests compare against).
    top_k: exact answers at gradient cost — rank every cell with `prefilter` ("atp*": AtP with the QK fix,
        "relp", "atp"), then exact-patch cells in ranked order, K at a time, until no unverified cell can enter
        the exact top K by |patched − base| (see `_verify_in_order`). Unverified cells are NaN;
        meta["verified"] counts the verified ones.
    """
    if direction not in ("denoise", "noise"):
        raise PathlensError(f"direction must be 'denoise' or 'noise', got {direction!r}.")
    if ablation not in (None, "zero", "mean", "resample"):
        raise PathlensError(f"ablation must be None, 'zero', 'mean' or 'resample', got {ablation!r}.")
    if max_batch_tokens < 1:
        raise PathlensError("max_batch_tokens must be at least 1.")
    if top_k is not None and (ablation is not None or out is not None or top_k < 1):
        raise PathlensError(
            "top_k= needs top_k >= 1 and works for patching (not ablation) without out= (a verified top-k run is "
            "short, so it is not checkpointed)."
        )
    if prefilter not in PREFILTERS:
        raise PathlensError(f"prefilter must be one of {', '.join(PREFILTERS)}, got {prefilter!r}.")
    metric = metric or task.metric
    assert metric is not None
    task = task.with_metric(metric)
    n, seq_len = task.n, task.seq_len
    plan = make_plan(model, sites, positions, seq_len, layers=layers, neurons=neurons)
    if ablation is not None:
        base_ids, source_ids = task.clean_ids, task.clean_ids
    elif direction == "denoise":
        base_ids, source_ids = task.corrupt_ids, task.clean_ids
    else:
        base_ids, source_ids = task.clean_ids, task.corrupt_ids
    runner = ConeRunner(model, base_ids, task.attention_mask, task.answer_pos) if cone else None
    position_cone = runner is not None and runner.supports_position_cone
    shared = shared_prefix(base_ids, source_ids) if position_cone and ablation is None else 0
    executed = [executed_variant(v, shared, seq_len) for v in plan.variants]
    families = sorted({v.site.family for v in executed}, key=str)
    scored = torch.unique(task.answer_pos)
    source = model.run(source_ids, attention_mask=task.attention_mask, cache=families, logits_at=scored)
    starts = [
        (_NO_OP_LAYER, seq_len)
        if v.positions == ()
        else cone_start(v.site, v.positions, position_cone)
        if runner
        else None
        for v in executed
    ]
    chunks = _chunks(range(len(executed)), starts, n, seq_len, max_batch_tokens)
    settings = {
        "direction": direction,
        "ablation": ablation,
        "metric": metric_name(metric),
        "max_batch_tokens": max_batch_tokens,
        "cone": cone,
        "seed": seed,
        "positions": positions if isinstance(positions, str) else [int(p) for p in positions],
    }
    state = _Checkpoint(
        Path(out) if out is not None else None,
        _fingerprint(model, task, plan, settings),
        len(plan.variants),
        n,
        len(chunks),
    )

    def op_for(variant: Variant) -> Op:
        value = source.cache[variant.site.family]
        if variant.site.index is not None:
            value = value.select(2, variant.site.index)
        if ablation is None:
            return Replace(value)
        return Ablate(ablation, reference=value, seed=seed)  # type: ignore[arg-type]

    def run_chunk(chunk: Chunk) -> Tensor:
        """Per-row metric values (variants, rows) of one chunk."""
        rows = torch.arange(chunk.row_start, chunk.row_stop)
        variants = [executed[i] for i in chunk.variants]
        if chunk.start == seq_len:
            assert runner is not None
            values = metric(runner.answer_logits[rows][:, None], scored_view(task, rows, 1)).repeat(len(variants))
        elif runner is not None and chunk.layer is not None:
            patches = [ConePatch(v.site, op_for(v), v.positions) for v in variants]
            logits = runner.run(chunk.layer, chunk.start, patches, rows)
            values = metric(logits[:, None], scored_view(task, rows, len(variants)))
        else:
            values = _full_run(model, task, base_ids, variants, op_for, rows)
        return values.reshape(len(variants), -1)

    verified: list[int] | None = None
    if top_k is not None:
        estimate = _prefilter(prefilter)(
            model,
            task,
            sites=sites,
            positions=positions,
            direction=direction,
            metric=metric,
            layers=layers,
            neurons=neurons,
        )
        verified = _verify_in_order(
            estimate.values.flatten() - estimate.meta["base_metric"],
            top_k,
            lambda indices: _chunks(indices, starts, n, seq_len, max_batch_tokens),
            run_chunk,
            state.values,
            estimate.meta["base_metric"],
            progress,
        )
    else:
        todo = [i for i, _ in enumerate(chunks) if not state.done[i]]
        with Progress(disable=not progress, transient=True) as bar:
            job = bar.add_task(
                f"patching {len(plan.variants)} variants", total=len(chunks), completed=len(chunks) - len(todo)
            )
            for index in todo:
                chunk = chunks[index]
                state.record(index, chunk.variants, slice(chunk.row_start, chunk.row_stop), run_chunk(chunk))
                bar.advance(job)
    base_metric = (
        float(metric(runner.answer_logits[:, None], scored_view(task, torch.arange(n), 1)).mean()) if runner else None
    )
    at_answer = source.logits[torch.arange(n), torch.searchsorted(scored, task.answer_pos)]
    source_metric = float(metric(at_answer[:, None], scored_view(task, torch.arange(n), 1)).mean())
    clean_m, corrupt_m = (
        (source_metric, base_metric) if direction == "denoise" and ablation is None else (base_metric, source_metric)
    )
    pos_labels = None
    if "pos" in plan.dims:
        pos_labels = [model.to_str_tokens(task.clean_ids[0, p : p + 1])[0] for p in plan.coords["pos"]]
    return Scores(
        values=state.values.mean(dim=1).reshape(plan.shape).float(),
        dims=plan.dims,
        coords=plan.coords,
        metric=metric_name(metric),
        method=f"ablate:{ablation}" if ablation else f"patch:{direction}" + ("" if top_k is None else ":verified-topk"),
        meta={
            "model": model.name,
            "task": task.name,
            "n_prompts": n,
            "sites": sites if isinstance(sites, str) else [str(s) for s in sites],
            "positions": settings["positions"],
            "clean_metric": clean_m,
            "corrupt_metric": corrupt_m,
            "base_metric": base_metric,
            "cone": cone,
            "max_batch_tokens": max_batch_tokens,
            **({} if verified is None else {"top_k": top_k, "prefilter": prefilter, "verified": len(verified)}),
        },
        pos_labels=pos_labels,
    )


def _prefilter(name: str) -> Callable[..., Scores]:
    """The estimator behind a prefilter name (imported here: pathlens.attribution builds on this package)."""
    from pathlens.attribution import atp, atp_star, relp

    return {"atp*": atp_star, "relp": relp, "atp": atp}[name]


def _verify_in_order(
    estimate: Tensor,
    top_k: int,
    chunks_for: Callable[[Sequence[int]], list[Chunk]],
    run_chunk: Callable[[Chunk], Tensor],
    values: Tensor,
    base_metric: float,
    progress: bool,
) -> list[int]:
    """Exact-patch variants in order of |estimated effect| (`estimate`, per variant), `top_k` per round, writing
    per-row values into `values`. Stop when no unverified variant can enter the exact top K: when the K-th
    largest exact |effect| exceeds every unverified |estimate| plus the largest estimation error seen so far
    (errors are calibrated on the verified variants, which the ranking puts first). Returns the verified ones."""
    order = [int(i) for i in torch.argsort(estimate.abs(), descending=True, stable=True)]
    verified: list[int] = []
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task(f"verifying the top {top_k}", total=len(order))
        for first in range(0, len(order), top_k):
            batch = order[first : first + top_k]
            for chunk in chunks_for(batch):
                values[list(chunk.variants), chunk.row_start : chunk.row_stop] = run_chunk(chunk).double()
            bar.advance(job, len(batch))
            verified += batch
            exact = values[verified].mean(dim=1) - base_metric
            error = float((exact - estimate[verified].double()).abs().max())
            rest = order[first + top_k :]
            if len(verified) >= top_k and rest:
                kth = float(torch.topk(exact.abs(), top_k).values[-1])
                if kth > float(estimate[rest[0]].abs()) + error:
                    break
    return verified


def shared_prefix(base_ids: Tensor, source_ids: Tensor) -> int:
    """How many leading positions hold the same token in every base and source row (P if they are equal).

    In a causal model the source and base activations at those positions are the same numbers, so patching
    them changes nothing: a patch's cone can start at the first position where the prompts differ."""
    differs = (base_ids != source_ids).any(dim=0).nonzero()
    return int(differs[0]) if differs.numel() else int(base_ids.shape[1])


def executed_variant(variant: Variant, shared: int, seq_len: int) -> Variant:
    """The variant a sweep runs to realise `variant`.

    - A head's output is patched through its z: the output projection is linear, so replacing, zeroing,
      mean-ablating or resampling z_h does exactly that to z_h @ W_O[h], without materialising the
      (batch, pos, heads, d_model) head outputs.
    - Positions before `shared` (see `shared_prefix`) are dropped: there the patch writes the value already
      present. A variant left with no position is a no-op (`positions == ()`), whose metric is the base run's.
    """
    site = replace(variant.site, kind="head_z") if variant.site.kind == "head" else variant.site
    positions = variant.positions
    if shared:
        kept = range(shared, seq_len) if positions is None else (p for p in positions if p >= shared)
        positions = tuple(kept)
    return replace(variant, site=site, positions=positions)


def _full_run(
    model: Model, task: Task, base_ids: Tensor, variants: list[Variant], op_for: Callable[[Variant], Op], rows: Tensor
) -> Tensor:
    """Variants through the whole model in one batched forward: per-row metric values (K·R,)."""
    k, r = len(variants), int(rows.numel())
    interventions = []
    for i, v in enumerate(variants):
        op = op_for(v)
        if isinstance(op, Replace):
            op = Replace(op.source[rows])
        interventions.append(
            Intervention(
                v.site, op, positions=list(v.positions) if v.positions else None, rows=slice(i * r, (i + 1) * r)
            )
        )
    run = model.run(
        base_ids[rows].repeat(k, 1), attention_mask=task.attention_mask[rows].repeat(k, 1), interventions=interventions
    )
    return task.rows(rows).tile(k).score(run.logits)
