"""Studies: the runs the command line offers, as library functions that compute results and write their files.

- `task_for`: a task by name for a model (token-only models get induction over their vocabulary);
- `write_sweep`: a sweep's Scores, heatmap PNG and CSV table, with its top cells for printing;
- `circuit_study`: discover a circuit, measure it, list its pathways, write its files and HTML report;
- `demo_study`: the IOI demo (metric, direct logit attribution, two patching sweeps and an EAP-IG circuit).

Each returns what a caller prints (the CLI renders it as tables); none prints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pathlens.circuits.discover import DiscoveryMethod, Ranking, discover, pathways
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.faithfulness import Curve, faithfulness_curve
from pathlens.diagnostics.dla import head_logit_attribution
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching import patch
from pathlens.report.html import write_report
from pathlens.report.steer_page import write_steer_page
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.steering.data import heldout_text
from pathlens.steering.sweep import steer_study
from pathlens.tasks import TASKS, build_task, ioi
from pathlens.tasks.base import Task
from pathlens.tasks.ioi import BABA_TEMPLATES

CIRCUIT_SUMMARY = "summary.json"  # a circuit study's record, beside the circuit's own circuit.json/.safetensors
DEMO_RESID_PROMPTS = 4  # the per-(layer, position) sweep is the demo's longest step; 4 prompts keep it short


def task_for(model: Model, name: str, n: int, seed: int) -> Task:
    """Build task `name` for `model` (token-only models get induction over their vocabulary)."""
    if name not in TASKS:
        raise PathlensError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    if model.tokenizer is None:
        if name != "induction":
            raise PathlensError(f"{model.name} has no tokenizer, so only the token-level 'induction' task applies.")
        cfg: Any = model.hf.config
        return build_task(
            name, None, vocab_size=cfg.vocab_size, bos_id=getattr(cfg, "bos_token_id", None), n=n, seed=seed
        )
    return build_task(name, model.tokenizer, n=n, seed=seed)


def plottable(scores: Scores) -> Scores:
    """A 2-D view for plotting: (layer, head, pos) becomes (head, pos) with heads labelled L{l}.H{h}."""
    if scores.values.ndim != 3:
        return scores
    first, second, last = scores.dims
    labels = [
        f"L{a}.{'H' if second == 'head' else 'G'}{b}" for a in scores.coords[first] for b in scores.coords[second]
    ]
    return Scores(
        values=scores.values.reshape(len(labels), -1),
        dims=("component", last),
        coords={"component": labels, last: scores.coords[last]},
        metric=scores.metric,
        method=scores.method,
        meta=scores.meta,
        pos_labels=scores.pos_labels,
    )


@dataclass(frozen=True)
class SweepSummary:
    """What `write_sweep` wrote, for printing: the sweep's title, dims and its 10 strongest cells by |effect|."""

    title: str
    dims: tuple[str, ...]
    top: pd.DataFrame  # columns: the dims, then "value" (patched − base run)


def write_sweep(scores: Scores, out: Path, name: str, title: str) -> SweepSummary:
    """Save scores (safetensors + JSON), a heatmap PNG and a CSV table of effects (patched − base run)."""
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / name)
    plottable(scores).plot(out / f"{name}.png", title=title)
    ranked = scores.with_values(scores.values - scores.meta["base_metric"])
    top = ranked.top(10)
    write_text(out / f"{name}.csv", ranked.to_frame().to_csv(index=False))
    return SweepSummary(title, scores.dims, top)


def circuit_study(
    model: Model,
    task: Task,
    task_name: str,
    method: DiscoveryMethod,
    out: Path,
    top_paths: int = 10,
    top_k: int | None = None,
    target: float = 0.8,
    steps: int = 5,
    by: Ranking = "auto",
    max_memory: int | str | None = None,
) -> dict[str, Any]:
    """Discover a circuit with `method` (within `max_memory` bytes, e.g. "2GB", when given), measure it, find its
    `top_paths` pathways, and write to `out`: the circuit as circuit.safetensors + circuit.json
    (`Graph.load(out / "circuit")` reads it back), edges.csv, circuit.png, curve.png (when a curve was measured),
    pathways.csv, the run's record as summary.json, and report.html. Returns the summary.json record (with "paths"
    and "seconds")."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    circuit = discover(
        model, task, method=method, top_k=top_k, target=target, steps=steps, by=by, max_memory=max_memory
    )
    patcher = EdgePatcher(model, task, max_memory=max_memory)
    routes = pathways(patcher, circuit, k=top_paths)
    seconds = time.perf_counter() - start
    mib = faithfulness_curve(patcher, circuit, sizes="mib", by=circuit.meta.get("ranked_by") or "abs")
    circuit.save(out / "circuit")
    write_text(out / "edges.csv", circuit.to_frame().to_csv(index=False))
    circuit.plot(out / "circuit.png", title=f"{model.name} {task_name}: {method} circuit")
    curve_dict = circuit.meta.get("curve")
    if curve_dict:
        keys = ("sizes", "faithfulness", "metric", "full", "empty", "edges_total")
        Curve(**{k: curve_dict[k] for k in keys}).plot(out / "curve.png", title=f"{method}: faithfulness curve")
    routes_frame = pd.DataFrame(
        [{**r, "nodes": " → ".join(r["nodes"])} for r in routes],
        columns=["rank", "nodes", "score", "estimate", "metric", "faithfulness"],
    )
    write_text(out / "pathways.csv", routes_frame.to_csv(index=False))
    record = {
        "model": model.name,
        "task": task_name,
        "method": method,
        "faithfulness": circuit.meta["faithfulness"],
        "n_edges": circuit.n_edges,
        "edges_total": circuit.edges_total,
        "fraction": circuit.n_edges / circuit.edges_total,
        "ranked_by": circuit.meta["ranked_by"],
        "ablation": circuit.meta["ablation"],
        "direction": circuit.meta["direction"],
        "metric": circuit.meta["metric"],
        "curve": None
        if not curve_dict
        else {str(s): f for s, f in zip(curve_dict["sizes"], curve_dict["faithfulness"], strict=True)},
        "curve_area": None if not curve_dict else curve_dict["area"],
        "cpr": mib.cpr,  # MIB's CPR and CMD: the circuit's edge scores ranked as discovery ranked them, at MIB's
        "cmd": mib.cmd,  # edge fractions (faithfulness_curve(sizes="mib")); seconds excludes this curve
        "paths": routes,
        "seconds": seconds,
    }
    write_text(out / CIRCUIT_SUMMARY, json.dumps(record, indent=1))
    write_report(
        out / "report.html",
        title=f"{model.name} · {task_name} · {method} circuit",
        circuit=circuit,
        curve=curve_dict,
        pathways=routes,
        prompts=list(task.prompts or [])[:8],
        summary={k: v for k, v in record.items() if k not in ("paths", "curve")},
    )
    return record


@dataclass(frozen=True)
class DemoStudy:
    """What `demo_study` found (its files are in `out`): summary.json's content and what to print."""

    task: Task  # the IOI task the demo ran
    summary: dict[str, Any]  # summary.json: metric, top patched heads, circuit figures
    top_heads: pd.DataFrame  # the 10 heads of largest |direct logit attribution| (layer, head, value)
    sweeps: list[SweepSummary]  # heads patched, then resid_pre per position
    circuit: dict[str, Any]  # the circuit study's record (circuit/summary.json)
    steering: dict[str, Any] | None = None  # the steering section's record (steer/steer.json)


def demo_study(model: Model, out: Path, n: int = 8, seed: int = 0, progress: bool = False) -> DemoStudy:
    """IOI on `model`: clean vs corrupted logit difference, heads by direct logit attribution, activation patching
    of every head and of the residual stream per (layer, position), and an EAP-IG circuit with its faithfulness
    curve, pathways and HTML report; then a short steering section (`demo_steering`: a sentiment vector steered
    both ways, its cost and the pathways it acts through). Writes dla_heads, patch_heads, patch_resid
    (.png/.safetensors/.json/.csv), top_heads.csv, circuit/, steer/ and summary.json to `out`."""
    task = ioi(model.tokenizer, n=n, seed=seed)
    clean = model.run(task.clean_ids, attention_mask=task.attention_mask)
    corrupt = model.run(task.corrupt_ids, attention_mask=task.attention_mask)
    clean_ld, corrupt_ld = task.score(clean.logits), task.score(corrupt.logits)
    rows = torch.arange(task.n)
    top1 = clean.logits[rows, task.answer_pos].argmax(-1) == task.answer_ids
    dla = head_logit_attribution(model, task)
    summary: dict[str, Any] = {
        "model": model.name,
        "task": "ioi",
        "n_prompts": task.n,
        "seed": seed,
        "clean_logit_diff": float(clean_ld.mean()),
        "corrupt_logit_diff": float(corrupt_ld.mean()),
        "accuracy_answer_over_wrong": float((clean_ld > 0).float().mean()),
        "top1_accuracy": float(top1.float().mean()),
    }
    top_heads = dla.top(10)
    out.mkdir(parents=True, exist_ok=True)
    dla.plot(out / "dla_heads.png", title=f"{model.name}: IOI direct logit attribution per head")
    dla.save(out / "dla_heads")
    write_text(out / "top_heads.csv", top_heads.to_csv(index=False))
    heads = patch(model, task, sites="heads", positions="all", progress=progress)
    sweeps = [write_sweep(heads, out, "patch_heads", f"{model.name} IOI: heads patched clean→corrupt")]
    one_template = ioi(model.tokenizer, n=min(n, DEMO_RESID_PROMPTS), seed=seed, templates=[BABA_TEMPLATES[0]])
    resid = patch(model, one_template, sites="resid_pre", positions="each", progress=progress)
    sweeps.append(write_sweep(resid, out, "patch_resid", f"{model.name} IOI: resid_pre per position"))
    summary["patch_heads_top"] = [
        {"layer": int(r.layer), "head": int(r.head), "effect": float(r.value - heads.meta["corrupt_metric"])}
        for r in heads.top(5, by="value").itertuples()
    ]
    record = circuit_study(model, task, "ioi", "eap-ig", out / "circuit", top_paths=5)
    summary["circuit"] = {k: record[k] for k in ("faithfulness", "n_edges", "edges_total", "curve_area", "seconds")}
    steering = demo_steering(model, out / "steer", seed=seed)
    summary["steering"] = {
        k: steering[k] for k in ("site", "unsteered_vader_mean", "rows", "examples") if k in steering
    } | {"paths": (steering.get("explanation") or {}).get("paths", [])[:3]}
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return DemoStudy(task, summary, top_heads, sweeps, record, steering)


DEMO_STEER_SCALES = (-0.2, 0.2)
"""The demo's steering section: a sentiment vector at these scales (fractions of the site's typical norm)."""
DEMO_HELDOUT = 8
"""How many shipped held-out sentences the demo measures the steering cost on (all 30 in `pathlens steer`)."""


def demo_steering(model: Model, out: Path, seed: int = 0) -> dict[str, Any]:
    """The demo's short steering section: a difference-in-means sentiment vector (shipped contrast pairs) at a
    third of the way up, steered both ways on 4 neutral prompts × 12 greedy tokens, its cost measured on 8 held-out
    sentences, explained on 4 prompts; writes the steer study's files and its HTML page (steer.html) into `out`;
    returns its record."""
    record = steer_study(
        model,
        "sentiment",
        "mean-diff",
        out,
        scales=DEMO_STEER_SCALES,
        n_prompts=4,
        max_new_tokens=12,
        seed=seed,
        explain_prompts=4,
        heldout=heldout_text()[:DEMO_HELDOUT],
    )
    write_steer_page(out, record)
    return record
