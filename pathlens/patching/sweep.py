"""`pathlens.patch`: activation patching and ablation sweeps → `Scores`.

Every cell is the batch-mean metric of one patched run:
- direction="noise" (the default, `pathlens.patching.spec.DEFAULT_DIRECTION`, shared by every method: what
  circuit discovery and faithfulness patch, so node and edge scores describe one experiment): the clean prompts
  with one site's corrupted activation patched in;
- direction="denoise": the corrupted prompts with one site's clean activation patched in;
- ablation="zero" | "mean" | "resample": the clean prompts with one site ablated (mean / resample over the
  task's clean prompts).

Variants are grouped by where their causal cone starts, batched K at a time into K·N-row forwards chunked to
`max_batch_tokens` (a chunk never holds more), and run by `ConeRunner` from the cached block inputs. Sites
outside the blocks (embed, module paths) run the whole model, still batched. With `out=`, each finished chunk
is appended to a progress log (`patching.checkpoint`) and a re-run with the same model, task, metric and
arguments resumes where it stopped; chunking is fixed by the plan, so resumed scores are bit-identical to an
uninterrupted run. With `executor=` ("ray" or an executor object, `patching.executor`) the same chunks run on
workers that rebuild the sweep from a `SweepJob` and their own copy of the model; the values come back here and
are recorded (and checkpointed) exactly as local ones, so a sweep can start in one place and finish in the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Literal, get_args

import torch
from rich.progress import Progress
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Ablate, Intervention, Op, Project, Replace
from pathlens.memory import parse_bytes
from pathlens.model import Model, Run
from pathlens.patching.budget import sweep_cost
from pathlens.patching.checkpoint import SWEEP_VERSION, Checkpoint, splice_records, task_digest, weights_digest
from pathlens.patching.cone import ConePatch, ConeRunner, cone_start, splice_entries
from pathlens.patching.executor import Executor, announce, resolved_executor, tensor_fingerprint
from pathlens.patching.plan import GROUP_ALIASES, SWEEP_GROUPS, Plan, Variant
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, PatchSpec, Positions, ResolvedSpec, Sites, check_option
from pathlens.results import Scores
from pathlens.results.io import writable_folder
from pathlens.sites import Site, parse_site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric

Ablation = Literal["zero", "mean", "resample"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)
Prefilter = Literal["atp*", "relp", "atp"]
"""The estimator that ranks cells for `patch(top_k=...)`: AtP with the QK fix, RelP, or plain AtP."""
PREFILTERS: tuple[str, ...] = get_args(Prefilter)
DEFAULT_MAX_BATCH_TOKENS = 2048
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


def _identity(model: Model, task: Task, plan: Plan, settings: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match besides the metric: the weights, the spliced dictionaries, the task's tensors
    and the settings."""
    return {
        "version": SWEEP_VERSION,
        "weights": {"model": model.name, "family": model.arch.family, "sha256": weights_digest(model.hf)},
        "splices": splice_records(model.splices),
        "task": {"name": task.name, "sha256": task_digest(task)},
        "settings": {
            **{k: v for k, v in settings.items() if k != "metric"},
            "dims": list(plan.dims),
            "coords": {k: [str(x) for x in v] for k, v in plan.coords.items()},
        },
    }


def patch(
    model: Model,
    task: Task,
    sites: Sites = "heads",
    positions: Positions = "all",
    direction: Direction = DEFAULT_DIRECTION,
    ablation: Ablation | None = None,
    metric: Metric | None = None,
    layers: Sequence[int] | None = None,
    neurons: dict[int, Sequence[int]] | None = None,
    max_batch_tokens: int | None = None,
    out: "str | os.PathLike[str] | None" = None,
    overwrite: bool = False,
    progress: bool = True,
    cone: bool = True,
    seed: int = 0,
    top_k: int | None = None,
    prefilter: Prefilter = "atp*",
    executor: "str | Executor | None" = None,
    subspace: "Tensor | None" = None,
    max_memory: int | str | None = None,
) -> Scores:
    """Patch (or ablate) every site of `sites` at `positions`; return the patched metric per cell as Scores.

    sites: a group ("heads", "z", "q", "k", "v", "attn_out", "mlp_in", "mlp_out", "resid_pre", "resid_mid",
        "resid_post", "neurons" with `neurons={layer: [i, ...]}`), a list of sites ("L3.H2", "module:a.b", ...), or
        a spliced dictionary's latent family ("L6.sae": every latent, one cell each; latents run in the causal cone
        from the layer their splice's target feeds, `patching.cone`).
    positions: "all" (one patch over every position), "each" (one per position, adds a `pos` dim) or a list.
    direction: "noise" (default, `DEFAULT_DIRECTION`: clean run, corrupted activation patched in — what circuit
        discovery and faithfulness patch) or "denoise" (corrupted run, clean activation patched in).
    ablation: "zero" | "mean" | "resample" to ablate on the clean prompts instead of patching.
    metric: per-prompt metric (logits, task) -> (N,); it sees logits (N, 1, V) at the scored positions.
    layers: restrict a group to these layers. max_batch_tokens: the most tokens one patched forward holds
        (default `DEFAULT_MAX_BATCH_TOKENS`). max_memory: instead, the bytes the sweep may hold (an int or a string
        such as "2GB"): its chunk size follows from the sweep's per-token cost (`patching.budget`); a budget that
        cannot hold one row raises, naming the least it needs.
    out: folder for resumable progress: a re-run with the same model weights, task, metric and arguments resumes;
        one that differs in any of them raises saying which (see `patching.checkpoint`). Checked to be a
        writable folder before any forward. overwrite: discard the progress saved in `out` and start over.
    cone=False runs every variant through the whole model (the slow path the tests compare against).
    top_k: exact answers at gradient cost — rank every cell with `prefilter` ("atp*": AtP with the QK fix,
        "relp", "atp"), then exact-patch cells in ranked order, K at a time, until no unverified cell can enter
        the exact top K by |patched − base| (see `_verify_in_order`). Unverified cells are NaN;
        meta["verified"] counts the verified ones.
    executor: where the chunks run: None / "local" (this process), "ray" (a local Ray cluster started for this
        call) or an executor object such as `pathlens.distributed.RayExecutor(address=...)`. Chunks are planned
        here as for a local run, so the scores are bit-identical to it (same torch threads per process), and
        `out=` checkpoints are shared: a sweep started locally can resume on Ray and vice versa.
    subspace: a (d, k) basis with orthonormal columns (or a `pathlens.subspace.Subspace`): each cell patches only
        the component of its site inside span(basis), h + (h_src − h)BBᵀ, at the engine's speed; d must be the
        last dim of every swept site (heads are then patched as their d_model writes, not through z).
    """
    sites = latent_family_sites(model, sites)
    setup = PatchSpec(sites, positions, direction, metric, layers, neurons, subspace).resolve(model, task)
    if setup.spec.subspace is not None and (ablation is not None or top_k is not None):
        raise PathlensError("subspace= patches toward the source run; it takes neither ablation= nor top_k=.")
    max_batch_tokens = token_budget(setup, max_batch_tokens, max_memory)
    _check_options(ablation, max_batch_tokens, top_k, out, prefilter)
    if top_k is not None and executor not in (None, "local"):
        raise PathlensError("top_k= runs in this process (a verified top-k run is short); drop executor=.")
    folder = writable_folder(out, "out=") if out is not None else None
    settings = {
        "direction": direction,
        "ablation": ablation,
        "metric": setup.metric_name,
        "max_batch_tokens": max_batch_tokens,
        "cone": cone,
        "seed": seed,
        "positions": positions if isinstance(positions, str) else [int(p) for p in positions],
        **({"max_memory": parse_bytes(max_memory)} if max_memory is not None else {}),
    }
    if setup.spec.subspace is not None:
        settings["subspace"] = tensor_fingerprint(setup.spec.subspace)
    state = Checkpoint.open(
        folder,
        _identity(model, setup.task, setup.plan, settings) if folder is not None else {},
        len(setup.plan.variants),
        setup.task.n,
        overwrite,
    )
    job = SweepJob(task, setup.spec, ablation, cone, seed, max_batch_tokens)
    with resolved_executor(executor) as runner:
        announce(runner, model, job)  # workers rebuild the sweep while this process runs its own base runs
        sweep = _Sweep.start(setup, ablation, cone, seed, max_batch_tokens)
        state.start(sweep.chunks, sweep.metric_rows() if folder is not None else {})
        if top_k is None:
            try:
                _run_chunks(sweep, state, progress, runner, job)
            finally:
                state.close()
            return _assemble(sweep, state.values, settings)
    estimate = _prefilter(prefilter)(
        model,
        setup.task,
        sites=sites,
        positions=positions,
        direction=direction,
        metric=setup.metric,
        layers=layers,
        neurons=neurons,
    )
    verified = _verify_in_order(
        estimate.values.flatten() - estimate.meta["base_metric"],
        top_k,
        sweep.chunks_of,
        sweep.run_chunk,
        state.values,
        estimate.meta["base_metric"],
        progress,
    )
    return _assemble(sweep, state.values, settings, {"top_k": top_k, "prefilter": prefilter, "verified": len(verified)})


def latent_family_sites(model: Model, sites: Sites) -> Sites:
    """`sites`, or the list of every latent when it names a spliced dictionary's latent family ("L6.sae" →
    ["L6.sae.F0", "L6.sae.F1", ...]: one cell per latent)."""
    if not isinstance(sites, str) or sites in (*SWEEP_GROUPS, *GROUP_ALIASES, "neurons"):
        return sites
    try:
        family = parse_site(sites)
    except PathlensError:
        return sites
    if family.kind != "latent" or family.index is not None:
        return sites
    family = model.resolve(family)
    width = next(sp.width for sp in model.splices if sp.latents == family)
    return [str(Site("latent", family.layer, i, family.path)) for i in range(width)]


def token_budget(setup: ResolvedSpec, max_batch_tokens: int | None, max_memory: int | str | None) -> int:
    """The chunk size in tokens: `max_batch_tokens`, or what `max_memory` allows (`patching.budget`)."""
    if max_memory is None:
        return DEFAULT_MAX_BATCH_TOKENS if max_batch_tokens is None else max_batch_tokens
    if max_batch_tokens is not None:
        raise PathlensError("pass max_memory= (bytes) or max_batch_tokens= (tokens per forward), not both.")
    task, variants = setup.task, setup.plan.variants
    through_z = setup.spec.subspace is None
    families = {executed_variant(v, 0, task.seq_len, through_z).site.family for v in variants}
    last_start = max(v.start_position for v in variants)
    cost = sweep_cost(setup.model, task.n, task.seq_len, families, len(variants), last_start)
    return cost.tokens_for(parse_bytes(max_memory))


def planned_chunks(setup: ResolvedSpec, ablation: Ablation | None, max_batch_tokens: int) -> list[Chunk]:
    """The chunks `patch` would run for `setup`, planned without its base runs, for estimates: as if the model
    keeps a key/value cache (the position cone; a model without one runs the same chunks from position 0)."""
    task = setup.task
    base_ids, source_ids = (task.clean_ids, task.clean_ids) if ablation is not None else setup.runs
    shared = shared_prefix(base_ids, source_ids) if ablation is None else 0
    through_z = setup.spec.subspace is None
    executed = [executed_variant(v, shared, task.seq_len, through_z) for v in setup.plan.variants]
    entries = splice_entries(setup.model)
    starts = [
        (_NO_OP_LAYER, task.seq_len) if v.positions == () else cone_start(v.site, v.positions, True, entries)
        for v in executed
    ]
    return _chunks(range(len(executed)), starts, task.n, task.seq_len, max_batch_tokens)


def _check_options(
    ablation: Ablation | None, max_batch_tokens: int, top_k: int | None, out: object, prefilter: Prefilter
) -> None:
    """Reject option values `patch` cannot run, before any forward."""
    check_option("ablation", ablation, (None, *ABLATIONS))
    if max_batch_tokens < 1:
        raise PathlensError("max_batch_tokens must be at least 1.")
    if top_k is not None and (ablation is not None or out is not None or top_k < 1):
        raise PathlensError(
            "top_k= needs top_k >= 1 and works for patching (not ablation) without out= (a verified top-k run is "
            "short, so it is not checkpointed)."
        )
    check_option("prefilter", prefilter, PREFILTERS)


@dataclass(frozen=True)
class SweepJob:
    """What a worker needs to rebuild a sweep from its own copy of the model (picklable: the task, the spec and
    the options; no weights, no activations): `build` runs the same base runs and plans the same chunks."""

    task: Task
    spec: PatchSpec
    ablation: Ablation | None
    cone: bool
    seed: int
    max_batch_tokens: int

    @property
    def description(self) -> str:
        sites = self.spec.sites
        return f"patching {sites if isinstance(sites, str) else f'{len(sites)} sites'}"

    def build(self, model: Model) -> _Sweep:
        """The sweep on `model`: its base runs and chunks (`run(index)` runs chunk `index`)."""
        setup = self.spec.resolve(model, self.task)
        return _Sweep.start(setup, self.ablation, self.cone, self.seed, self.max_batch_tokens)


@dataclass(frozen=True)
class _Sweep:
    """A planned sweep after its base runs: the variants as executed (`executed_variant`), where each one's
    cone starts, the source run whose activations are patched in, and the chunks of the whole sweep."""

    setup: ResolvedSpec
    ablation: Ablation | None
    seed: int
    max_batch_tokens: int
    base_ids: Tensor
    runner: ConeRunner | None  # None: every variant runs the whole model
    source: Run
    scored: Tensor  # the distinct answer positions, where `source` holds logits
    executed: list[Variant]
    starts: list[tuple[int, int] | None]  # (layer, position) each variant's cone starts at

    @classmethod
    def start(
        cls, setup: ResolvedSpec, ablation: Ablation | None, cone: bool, seed: int, max_batch_tokens: int
    ) -> _Sweep:
        """The base runs: the base prompts into a `ConeRunner` (with `cone`), the source prompts with the cache
        of every patched site family. Ablation runs the clean prompts and ablates with their activations."""
        model, task, seq_len = setup.model, setup.task, setup.task.seq_len
        base_ids, source_ids = (task.clean_ids, task.clean_ids) if ablation is not None else setup.runs
        runner = ConeRunner(model, base_ids, task.attention_mask, task.answer_pos) if cone else None
        position_cone = runner is not None and runner.supports_position_cone
        shared = shared_prefix(base_ids, source_ids) if position_cone and ablation is None else 0
        through_z = setup.spec.subspace is None
        executed = [executed_variant(v, shared, seq_len, through_z) for v in setup.plan.variants]
        families = sorted({v.site.family for v in executed}, key=str)
        scored = torch.unique(task.answer_pos)
        source = model.run(source_ids, attention_mask=task.attention_mask, cache=families, logits_at=scored)
        starts = [
            (_NO_OP_LAYER, seq_len)
            if v.positions == ()
            else cone_start(v.site, v.positions, position_cone, runner.entries)
            if runner
            else None
            for v in executed
        ]
        return cls(setup, ablation, seed, max_batch_tokens, base_ids, runner, source, scored, executed, starts)

    @cached_property
    def chunks(self) -> list[Chunk]:
        """Every variant's chunks, in the order an uninterrupted sweep runs (and a checkpoint counts) them."""
        return self.chunks_of(range(len(self.executed)))

    def chunk_count(self) -> int:
        return len(self.chunks)

    def run(self, index: int) -> Tensor:
        """Per-row metric values (variants, rows) of chunk `index` of `chunks` (what an executor's worker runs)."""
        return self.run_chunk(self.chunks[index])

    def fingerprint(self) -> str:
        """SHA-256 of the base and source runs' logits and of the chunk plan: equal on two processes exactly when
        their chunks compute the same numbers from the same starting point."""
        base = self.runner.answer_logits if self.runner is not None else torch.zeros(0)
        return tensor_fingerprint(base, self.source.logits, extra=repr(self.chunks))

    def chunks_of(self, indices: Sequence[int]) -> list[Chunk]:
        return _chunks(indices, self.starts, self.setup.task.n, self.setup.task.seq_len, self.max_batch_tokens)

    def op_for(self, variant: Variant) -> Op:
        """What a variant writes at its site: the source activation, or the ablation built on it."""
        value = self.source.cache[variant.site.family]
        if variant.site.index is not None:
            value = value.select(2, variant.site.index)
        if self.ablation is None:
            basis = self.setup.spec.subspace
            return Replace(value) if basis is None else Project(basis, value)
        return Ablate(self.ablation, reference=value, seed=self.seed)

    def run_chunk(self, chunk: Chunk) -> Tensor:
        """Per-row metric values (variants, rows) of one chunk."""
        task, metric = self.setup.task, self.setup.metric
        rows = torch.arange(chunk.row_start, chunk.row_stop)
        variants = [self.executed[i] for i in chunk.variants]
        if chunk.start == task.seq_len:
            assert self.runner is not None
            base = self.runner.answer_logits[rows][:, None]
            values = metric(base, scored_view(task, rows, 1)).repeat(len(variants))
        elif self.runner is not None and chunk.layer is not None:
            patches = [ConePatch(v.site, self.op_for(v), v.positions) for v in variants]
            logits = self.runner.run(chunk.layer, chunk.start, patches, rows)
            values = metric(logits[:, None], scored_view(task, rows, len(variants)))
        else:
            values = _full_run(self.setup.model, task, self.base_ids, variants, self.op_for, rows)
        return values.reshape(len(variants), -1)

    def base_metric(self) -> float | None:
        """Batch-mean metric of the unpatched base run (None without the cone runner, which holds its logits)."""
        if self.runner is None:
            return None
        task = self.setup.task
        return float(
            self.setup.metric(self.runner.answer_logits[:, None], scored_view(task, torch.arange(task.n), 1)).mean()
        )

    def metric_rows(self) -> dict[str, Any]:
        """The metric's name and per-row values on the base and source runs: what tells two metrics apart when a
        checkpoint resumes (without the cone runner the base prompts run once more for it)."""
        task, metric = self.setup.task, self.setup.metric
        everything = torch.arange(task.n)
        view = scored_view(task, everything, 1)
        if self.runner is not None:
            base_logits = self.runner.answer_logits
        else:
            run = self.setup.model.run(self.base_ids, attention_mask=task.attention_mask, logits_at=self.scored)
            base_logits = run.logits[everything, torch.searchsorted(self.scored, task.answer_pos)]
        source_logits = self.source.logits[everything, torch.searchsorted(self.scored, task.answer_pos)]
        return {
            "name": self.setup.metric_name,
            "base": metric(base_logits[:, None], view).double().tolist(),
            "source": metric(source_logits[:, None], view).double().tolist(),
        }

    def source_metric(self) -> float:
        """Batch-mean metric of the source run."""
        task = self.setup.task
        at_answer = self.source.logits[torch.arange(task.n), torch.searchsorted(self.scored, task.answer_pos)]
        return float(self.setup.metric(at_answer[:, None], scored_view(task, torch.arange(task.n), 1)).mean())


def _run_chunks(
    sweep: _Sweep, state: Checkpoint, progress: bool, executor: Executor | None = None, job: SweepJob | None = None
) -> None:
    """Run every chunk the checkpoint has not finished, here or on `executor`, recording each as it completes
    (once: a chunk an executor returns twice counts once), with one progress bar for all workers."""
    chunks = sweep.chunks
    todo = [i for i, _ in enumerate(chunks) if not state.done[i]]
    with Progress(disable=not progress, transient=True) as bar:
        task_bar = bar.add_task(
            f"patching {len(sweep.executed)} variants", total=len(chunks), completed=len(chunks) - len(todo)
        )

        def done(index: int, values: Tensor) -> None:
            if not state.done[index]:
                state.record(index, values)
                bar.advance(task_bar)

        if executor is None or job is None:
            for index in todo:
                done(index, sweep.run_chunk(chunks[index]))
            return
        executor.run(sweep.setup.model, job, sweep.fingerprint(), todo, done)
    missing = [i for i in todo if not state.done[i]]
    if missing:
        raise PathlensError(f"the executor returned without running chunks {missing[:10]} of this sweep.")


def _assemble(
    sweep: _Sweep, values: Tensor, settings: dict[str, Any], verification: dict[str, Any] | None = None
) -> Scores:
    """The Scores of a sweep from its per-variant, per-row metric values (n_variants, N): the batch mean per
    cell, with the clean / corrupted / base metrics and the settings in `meta`."""
    setup, ablation = sweep.setup, sweep.ablation
    model, task, plan = setup.model, setup.task, setup.plan
    base_metric, source_metric = sweep.base_metric(), sweep.source_metric()
    clean_m, corrupt_m = (
        (source_metric, base_metric)
        if setup.direction == "denoise" and ablation is None
        else (base_metric, source_metric)
    )
    pos_labels = None
    if "pos" in plan.dims:
        pos_labels = [model.to_str_tokens(task.clean_ids[0, p : p + 1])[0] for p in plan.coords["pos"]]
    sites = setup.spec.sites
    method = f"ablate:{ablation}" if ablation else f"patch:{setup.direction}"
    return Scores(
        values=values.mean(dim=1).reshape(plan.shape).float(),
        dims=plan.dims,
        coords=plan.coords,
        metric=setup.metric_name,
        method=method if verification is None else f"{method}:verified-topk",
        meta=setup.meta(
            sites=sites if isinstance(sites, str) else [str(s) for s in sites],
            positions=settings["positions"],
            clean_metric=clean_m,
            corrupt_metric=corrupt_m,
            base_metric=base_metric,
            cone=settings["cone"],
            max_batch_tokens=settings["max_batch_tokens"],
            **({"max_memory": settings["max_memory"]} if "max_memory" in settings else {}),
            **(verification or {}),
        ),
        pos_labels=pos_labels,
    )


def _prefilter(name: Prefilter) -> Callable[..., Scores]:
    """The estimator behind a prefilter name (imported here: pathlens.attribution builds on this package)."""
    from pathlens.attribution import atp, atp_star, relp

    estimators: dict[str, Callable[..., Scores]] = {"atp*": atp_star, "relp": relp, "atp": atp}
    return estimators[name]


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


def executed_variant(variant: Variant, shared: int, seq_len: int, through_z: bool = True) -> Variant:
    """The variant a sweep runs to realise `variant`.

    - A head's output is patched through its z (with `through_z`; not for a subspace patch, whose basis lives in
      the head's d_model write): the output projection is linear, so replacing, zeroing, mean-ablating or
      resampling z_h does exactly that to z_h @ W_O[h], without materialising the (batch, pos, heads, d_model)
      head outputs.
    - Positions before `shared` (see `shared_prefix`) are dropped: there the patch writes the value already
      present. A variant left with no position is a no-op (`positions == ()`), whose metric is the base run's.
    """
    site = replace(variant.site, kind="head_z") if variant.site.kind == "head" and through_z else variant.site
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
        if isinstance(op, (Replace, Project)):
            op = replace(op, source=op.source[rows])
        interventions.append(
            Intervention(
                v.site, op, positions=list(v.positions) if v.positions else None, rows=slice(i * r, (i + 1) * r)
            )
        )
    run = model.run(
        base_ids[rows].repeat(k, 1), attention_mask=task.attention_mask[rows].repeat(k, 1), interventions=interventions
    )
    return task.rows(rows).tile(k).score(run.logits)
