"""The interpretability-illusion check (Makelov, Lange, Nanda, arXiv 2311.17030; METHODS §2).

A 1-D patch along v can move the output through a *dormant* pathway while the part of v that actually varies
with the input is *disconnected* (in the null space of every weight that reads the site). The check splits v
against the downstream weights W that read the site — v_row in the span of what W reads, v_null with
v_null·W = 0 (checked) — and patches, at each row's last token of the base prompts, with the source values:

    full-component   the whole site value (h ← h_src)
    direction        the 1-D subspace along v
    row-part         along v_row/‖v_row‖        null-part   along v_null/‖v_null‖
    placebo          along a random direction (seeded)

reporting interchange accuracy (argmax = the counterfactual label), mean logit difference (the task's answer
minus wrong token: for IOI, base IO − base S) and the fractional logit-difference decrease
FLDD = 100·(1 − LD_patched/LD_clean), on the pairs whose counterfactual label differs from the base answer (the
pairs an interchange should change; the paper's ABB→BAB and BAB→ABB test pairs).

The downstream weights W (rows: the site's dims), by site kind:
    mlp_post[L]           the MLP's output (down) projection
    head_z[L, h]          that head's output projection W_O[h]
    mlp_in[L]             the MLP's input projections (up / gate / c_fc)
    attn_in[L]            the q/k/v projections of layer L (named heads, or all)
    resid_pre/mid/post    the q/k/v projections of the named `heads` (e.g. the heads patching found important),
                          or of every head of the next attention layer, read through that layer's input norm
                          folded in (its gain, and its centering for LayerNorm). The norm's division by the RMS
                          is not linear: a null-space part still changes that scale, which is why the paper
                          folds it the same way and why this stays a diagnostic for residual sites.
The row space is found rank-aware: the left singular vectors of W whose singular values exceed `rtol`·σ_max
(a QR of a rank-deficient W returns arbitrary extra directions).

The illusion flag is raised when all four hold (thresholds in FLDD percentage points, written in the report):
the whole component does not move the output toward the counterfactual (FLDD ≤ `near_zero`: one-sided, since a
full patch that moves it away — the paper's MLP8, FLDD −8 — is no evidence for the direction either), the 1-D
effect is large (FLDD ≥ `large`), the null-part effect is ≈ 0 (|FLDD| ≤ `near_zero`) and the row-part effect is
≪ the 1-D one (FLDD_row ≤ `row_fraction`·FLDD_direction).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pathlens.arch.base import get_blocks, get_module, is_linear, output_weight_per_head, weight_out_in
from pathlens.arch.norms import norm_parts
from pathlens.circuits.layout import QKV
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.model import Model
from pathlens.results.io import write_bytes, write_text
from pathlens.sites import Site
from pathlens.subspace.basis import Subspace
from pathlens.subspace.finders import random_direction
from pathlens.subspace.reads import VariantFn, answer_values, run_variants
from pathlens.tasks.base import Task
from pathlens.tasks.counterfactual import require_counterfactuals

INTERVENTIONS = ("full-component", "direction", "row-part", "null-part", "placebo")
RESIDUAL_KINDS = ("resid_pre", "resid_mid", "resid_post")
DEFAULT_RTOL = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """When the illusion flag is raised (FLDD in percentage points)."""

    near_zero: float = 10.0
    large: float = 30.0
    row_fraction: float = 0.5


@dataclass(frozen=True)
class Readers:
    """The downstream weights that read a site, as one matrix (d_site, r): a change δ of the site changes what
    they read by δ @ matrix. `names` lists the weights."""

    matrix: Tensor
    names: tuple[str, ...]


@dataclass(frozen=True)
class Decomposition:
    """v = row + null with row in the readers' row space (rank `rank` at tolerance `tol`), null in its kernel;
    `null_residual` = ‖null @ W‖ / (‖v‖·‖W‖₂), computed in float32 (the check: ≤ 1e-5)."""

    v: Tensor
    row: Tensor
    null: Tensor
    rank: int
    tol: float
    null_residual: float


@dataclass(frozen=True)
class IllusionReport:
    """The decomposition table, the flag and how it was decided; `save(folder)` writes JSON + PNG."""

    rows: list[dict[str, Any]]
    illusion: bool
    conditions: dict[str, bool]
    thresholds: Thresholds
    decomposition: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, intervention: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["intervention"] == intervention)

    def to_json(self) -> dict[str, Any]:
        return {
            "illusion": self.illusion,
            "conditions": self.conditions,
            "thresholds": asdict(self.thresholds),
            "rows": self.rows,
            "decomposition": self.decomposition,
            "meta": self.meta,
        }

    def table(self) -> str:
        """The paper's layout: intervention | acc | LD | FLDD %."""
        lines = ["| intervention | acc | LD | FLDD % |", "|---|---|---|---|"]
        for r in self.rows:
            acc = "—" if r["intervention"] == "clean" else f"{r['accuracy']:.3f}"
            lines.append(f"| {r['intervention']} | {acc} | {r['logit_diff']:.3f} | {r['fldd']:.2f} |")
        return "\n".join(lines)

    def png(self) -> bytes:
        """A bar chart of FLDD per intervention, accuracy written on each bar, the thresholds drawn."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        shown = [r for r in self.rows if r["intervention"] != "clean"]
        fig = Figure(figsize=(6.4, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        names = [r["intervention"] for r in shown]
        values = [r["fldd"] for r in shown]
        bars = ax.bar(names, values, color=["#888888", "#c0392b", "#2874a6", "#7d3c98", "#aaaaaa"][: len(shown)])
        for bar, r in zip(bars, shown, strict=True):
            ax.annotate(
                f"acc {r['accuracy']:.2f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
            )
        for y in (self.thresholds.near_zero, -self.thresholds.near_zero, self.thresholds.large):
            ax.axhline(y, color="0.6", lw=0.8, ls="--")
        ax.set_ylabel("FLDD %")
        ax.set_title(f"{self.meta.get('site', '')}: illusion {'RAISED' if self.illusion else 'not raised'}")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        return buffer.getvalue()

    def save(self, folder: str | os.PathLike[str], name: str = "subspace") -> dict[str, Path]:
        out = Path(folder)
        return {
            "json": write_text(out / f"{name}.json", json.dumps(self.to_json(), indent=2) + "\n"),
            "png": write_bytes(out / f"{name}.png", self.png()),
        }


# ---- the downstream weights ---------------------------------------------------------------------------------


def _norm_fold(model: Model, layer: int, path: str | None) -> Tensor:
    """(d_model, d_model) linear part of the input norm at `path` of block `layer`: diag(gain), centered first
    for LayerNorm (identity without a norm)."""
    d = model.arch.d_model
    if path is None:
        return torch.eye(d, dtype=torch.float64)
    block = get_blocks(model.hf, model.arch.blocks)[layer]
    centers, gain, _ = norm_parts(get_module(block, path), d)
    fold = torch.diag(gain.double())
    if centers:
        fold = (torch.eye(d, dtype=torch.float64) - 1.0 / d) @ fold
    return fold


def _head_reads(model: Model, heads: Sequence[Site], parts: Sequence[str]) -> tuple[list[Tensor], list[str]]:
    """Per named head and part, its projection from the attention input: (d_model, d_head) each, float64."""
    mats, names = [], []
    by_layer: dict[int, QKV] = {}
    for head in heads:
        assert head.layer is not None and head.index is not None
        qkv = by_layer.setdefault(head.layer, QKV(model, head.layer))
        for part in parts:
            index = head.index if part == "q" else model.kv_group(head.index)
            mats.append(qkv.w["qkv".index(part)][index].detach().double().T)
            names.append(f"{head}.{part}" if part == "q" else f"L{head.layer}.G{index}.{part}")
    return mats, names


def _check_heads(model: Model, heads: Sequence[Site | str], parts: Sequence[str]) -> list[Site]:
    bad = [p for p in parts if p not in ("q", "k", "v")]
    if bad or not parts:
        raise PathlensError(f"illusion_check: parts must be some of 'q', 'k', 'v', got {list(parts)}.")
    if model.arch.qkv_proj is None:
        raise PathlensError(
            f"illusion_check: the q/k/v projections of {model.arch.family} are not mapped (ArchMap.qkv_proj), so "
            "the heads that read a residual site cannot be named; pass an ArchMap with qkv_proj."
        )
    out = []
    for h in heads:
        site = model.resolve(h)
        if site.kind != "head" or site.index is None:
            raise PathlensError(f"illusion_check: heads must be single heads like 'L9.H6', got {h!r}.")
        out.append(site)
    return out


def downstream_readers(
    model: Model, site: Site | str, heads: Sequence[Site | str] | None = None, parts: Sequence[str] = ("q", "k", "v")
) -> Readers:
    """The weights that read `site` downstream, as one (d_site, r) matrix (see the module docstring)."""
    s = model.resolve(site)
    a = model.arch
    block = get_blocks(model.hf, a.blocks)[s.layer] if s.layer is not None else None
    if s.kind == "mlp_post" and s.index is None and block is not None and a.mlp_down:
        down = weight_out_in(get_module(block, a.mlp_down), "MLP down projection").detach().double()
        return Readers(down.T, (f"L{s.layer} MLP down projection",))
    if s.kind == "head_z" and s.index is not None and block is not None:
        w_o = output_weight_per_head(get_module(block, a.o_proj), a.n_heads, a.d_head)[s.index]
        return Readers(w_o.detach().double(), (f"L{s.layer}.H{s.index} W_O",))
    if s.kind == "mlp_in" and block is not None and a.mlp:
        mlp = get_module(block, a.mlp)
        down_module = get_module(block, a.mlp_down) if a.mlp_down else None
        ins = [m for m in mlp.modules() if is_linear(m) and m is not down_module and m is not mlp]
        mats = [weight_out_in(m, "MLP input projection").detach().double().T for m in ins]
        return Readers(torch.cat(mats, dim=1), tuple(f"L{s.layer} MLP input projection {i}" for i in range(len(ins))))
    if s.kind == "attn_in" or s.kind in RESIDUAL_KINDS:
        assert s.layer is not None
        first = s.layer if s.kind in ("attn_in", "resid_pre") else s.layer + 1
        if heads is None:
            if first >= a.n_layers:
                raise PathlensError(
                    f"illusion_check: {s} is read by no later attention layer (it is the last layer's output); the "
                    "check needs downstream weights that read the site — pick an earlier layer, or an MLP hidden "
                    "site (mlp_post)."
                )
            named = [Site("head", first, h) for h in range(a.n_heads)]
        else:
            named = _check_heads(model, heads, parts)
            early = [
                str(h)
                for h in named
                if h.layer is None or h.layer < first or (s.kind == "attn_in" and h.layer != first)
            ]
            if early:
                raise PathlensError(
                    f"illusion_check: heads {early} do not read {s} (they run before it, or in another layer for "
                    f"attn_in); name heads of layer {first}{' or later' if s.kind != 'attn_in' else ''}."
                )
        _check_heads(model, named, parts)
        mats, names = _head_reads(model, named, parts)
        if s.kind != "attn_in":
            folds = {int(h.layer or 0): _norm_fold(model, int(h.layer or 0), a.attn_norm) for h in named}
            per_head = [folds[int(h.layer or 0)] for h in named for _ in parts]
            mats = [fold @ m for fold, m in zip(per_head, mats, strict=True)]
        return Readers(torch.cat(mats, dim=1), tuple(names))
    raise PathlensError(
        f"illusion_check: no downstream weight reads {s} as one matrix; the check needs a site whose reader is a "
        "weight matrix: an MLP hidden site (L{l}.mlp_post), one head's z (L{l}.H{h}.z), mlp_in, attn_in, or a "
        "residual site (resid_pre / resid_mid / resid_post) with the heads that read it."
    )


def decompose(v: Tensor, readers: Readers, rtol: float = DEFAULT_RTOL) -> Decomposition:
    """Split v (d,) into its part in the row space of `readers` and its part in their kernel (float64 SVD)."""
    w = readers.matrix.double()
    if v.ndim != 1 or v.shape[0] != w.shape[0]:
        raise PathlensError(
            f"illusion_check: the direction has {tuple(v.shape)} entries but the weights reading the site take "
            f"{w.shape[0]}; give a ({w.shape[0]},) direction found at this site."
        )
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    tol = float(s.max()) * rtol if s.numel() else 0.0
    basis = u[:, s > tol]  # (d, rank)
    vd = v.double()
    row = basis @ (basis.T @ vd)
    null = vd - row
    spectral = float(s.max()) if s.numel() else 0.0
    residual = float((null.float() @ w.float()).norm()) / max(float(vd.norm()) * spectral, 1e-30)
    return Decomposition(v.detach(), row.float(), null.float(), int(basis.shape[1]), tol, residual)


# ---- the check ---------------------------------------------------------------------------------------------


def _effects(logits: Tensor, task: Task, labels: Tensor) -> tuple[float, float]:
    """(interchange accuracy, mean logit difference answer − wrong) of logits (N, V) at the scored positions."""
    rows = torch.arange(task.n)
    ld = logits[rows, task.answer_ids] - logits[rows, task.wrong_ids]
    acc = (logits.argmax(-1) == labels.to(logits.device)).double().mean()
    return float(acc), float(ld.double().mean())


def illusion_check(
    model: Model,
    subspace: Subspace,
    task: Task,
    *,
    heads: Sequence[Site | str] | None = None,
    parts: Sequence[str] = ("q", "k", "v"),
    thresholds: Thresholds = Thresholds(),
    placebo_seed: int = 0,
    rtol: float = DEFAULT_RTOL,
    pairs: str = "changing",
    max_batch_tokens: int = 2048,
) -> IllusionReport:
    """Decompose `subspace`'s direction against the weights that read its site, patch each part, and report the
    table and the illusion flag (module docstring). `task` needs counterfactual labels (the held-out pairs);
    pairs="changing" keeps the pairs whose label differs from the base answer, "all" keeps every pair."""
    labels = require_counterfactuals(task, "illusion_check")
    if subspace.k != 1:
        raise PathlensError(
            f"illusion_check: the subspace has k={subspace.k} directions; the check decomposes one direction — pass "
            "each column as Subspace.from_direction(subspace.basis[:, i], site)."
        )
    if subspace.positions != "last":
        raise PathlensError(
            "illusion_check: the check patches each row's last token; use a subspace with positions='last'."
        )
    if pairs not in ("changing", "all"):
        raise PathlensError(f"illusion_check: pairs must be 'changing' or 'all', got {pairs!r}.")
    site = model.resolve(subspace.site, write=True)
    subspace.check_fits(model)
    if pairs == "changing":
        keep = (labels != task.answer_ids).nonzero().reshape(-1)
        if keep.numel() == 0:
            raise PathlensError(
                "illusion_check: no pair's counterfactual label differs from its base answer, so no patch should "
                "change anything; build pairs whose interchange changes the output (ioi(..., flip=1.0)) or pass "
                "pairs='all'."
            )
        task, labels = task.rows(keep), labels[keep]
    readers = downstream_readers(model, site, heads, parts)
    parts_of = decompose(subspace.direction, readers, rtol)
    v = subspace.direction.float()
    placebo = random_direction(subspace.d, site, placebo_seed, float(v.norm())).direction
    sources = answer_values(model, task, site, "corrupt", max_batch_tokens)[:, None]  # (N, 1, d)
    directions: dict[str, Tensor | None] = {
        "direction": v,
        "row-part": parts_of.row,
        "null-part": parts_of.null,
        "placebo": placebo,
    }

    def empty_direction(d: Tensor) -> bool:
        return float(d.norm()) <= 1e-6 * float(v.norm())

    def along(d: Tensor | None) -> VariantFn:
        def variant(rows: Tensor, batch_rows: slice) -> Intervention | None:
            if d is None or empty_direction(d):
                return None  # patching along nothing changes nothing: the row is the unpatched run
            return Subspace.from_direction(d, site).intervention(sources[rows], rows=batch_rows)

        return variant

    def full(rows: Tensor, batch_rows: slice) -> Intervention:
        return Intervention(site, Replace(sources[rows]), positions="last", rows=batch_rows)

    def clean(rows: Tensor, batch_rows: slice) -> Intervention | None:
        return None

    names = ["clean", *INTERVENTIONS]
    fns = [clean, full, *(along(directions[n]) for n in INTERVENTIONS[1:])]
    logits = run_variants(model, task, fns, max_batch_tokens)
    clean_acc, clean_ld = _effects(logits[0], task, labels)
    rows_out: list[dict[str, Any]] = []
    for name, out in zip(names, logits, strict=True):
        acc, ld = _effects(out, task, labels)
        fldd = 100.0 * (1.0 - ld / clean_ld) if clean_ld != 0 else float("nan")
        row: dict[str, Any] = {"intervention": name, "accuracy": acc, "logit_diff": ld, "fldd": fldd}
        if name in directions:
            d = directions[name]
            row["norm"] = float(d.norm()) if d is not None else 0.0
            row["empty"] = d is None or empty_direction(d)
        rows_out.append(row)
    by = {r["intervention"]: r for r in rows_out}
    conditions = {
        "full_component_not_toward_counterfactual": by["full-component"]["fldd"] <= thresholds.near_zero,
        "direction_large": by["direction"]["fldd"] >= thresholds.large,
        "null_part_near_zero": abs(by["null-part"]["fldd"]) <= thresholds.near_zero,
        "row_part_much_smaller": by["row-part"]["fldd"] <= thresholds.row_fraction * by["direction"]["fldd"],
    }
    decomposition = {
        "readers": list(readers.names),
        "reader_shape": list(readers.matrix.shape),
        "rank": parts_of.rank,
        "tol": parts_of.tol,
        "rtol": rtol,
        "row_norm": float(parts_of.row.norm() / v.norm()),
        "null_norm": float(parts_of.null.norm() / v.norm()),
        "null_residual": parts_of.null_residual,
        "row_dot_null": float(parts_of.row.double() @ parts_of.null.double()),
    }
    meta = {
        "site": str(site),
        "model": model.name,
        "task": task.name,
        "n_pairs": task.n,
        "pairs": pairs,
        "clean_accuracy": clean_acc,
        "placebo_seed": placebo_seed,
        "subspace": dict(subspace.meta),
        "flag_rule": (
            f"illusion = FLDD full-component <= {thresholds.near_zero} and FLDD direction >= {thresholds.large} "
            f"and |FLDD null-part| <= {thresholds.near_zero} and FLDD row-part <= {thresholds.row_fraction} x FLDD "
            "direction"
        ),
    }
    return IllusionReport(rows_out, all(conditions.values()), conditions, thresholds, decomposition, meta)
