"""Dose–response: how a concept score and the cost move with a steering vector's scale.

`sweep(model, vectors, scales, prompts)` generates every (vector, scale, prompt) as rows of batched generation
(each row carrying its own vector and scale; the unsteered rows are generated once and shared by every vector),
scores the texts with VADER, measures the cost of each (vector, scale) on held-out neutral text, and returns
a `SweepResult`: the table (pandas; one row per vector and scale), every generation, a JSON-ready summary with
each vector's best shift in either direction within a perplexity budget, and — with `out=` — writes
`dose_response.csv`, `generations.json`, `dose_response.png` and `sweep.json` there (atomically).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pathlens.errors import PathlensError
from pathlens.interventions import Positions
from pathlens.model import Model
from pathlens.results.io import write_bytes, write_text
from pathlens.steering.data import heldout_text, neutral_prompts
from pathlens.steering.evaluate import cost, next_token_logprobs, vader_scores
from pathlens.steering.generate import RowSteer, generate
from pathlens.steering.vector import SteeringVector, check_scale, positions_to_json

PPL_BUDGET = 0.25
"""The perplexity increase (fraction) within which `SweepResult.summary` reports each vector's best shift."""


@dataclass
class SweepResult:
    """table: one row per (vector, scale) — name, method, scale, direction, vader_mean, vader_std, vader_shift,
    ppl, ppl_increase, kl, entropy, n; generations: one row per generated text (name, scale, prompt, text, vader);
    summary: JSON-ready record; files: what was written (with `out=`)."""

    table: pd.DataFrame
    generations: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def sweep(
    model: Model,
    vectors: SteeringVector | Mapping[str, SteeringVector],
    scales: Sequence[float],
    prompts: Sequence[str] | None = None,
    *,
    heldout: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    ppl_budget: float = PPL_BUDGET,
    out: str | os.PathLike[str] | None = None,
) -> SweepResult:
    """Dose–response of each vector (a name -> SteeringVector mapping, or one vector named by its method) over
    `scales` on `prompts` (default: the 64 shipped neutral prompts), cost on `heldout` (default: the shipped
    held-out text). See the module docstring."""
    named = (
        {str(vectors.meta.get("method", "vector")): vectors} if isinstance(vectors, SteeringVector) else dict(vectors)
    )
    if not named:
        raise PathlensError("sweep: vectors is empty; give a SteeringVector or {name: SteeringVector}.")
    scale_list = [float(s) if not isinstance(s, bool) else s for s in scales]
    if not scale_list:
        raise PathlensError("sweep: scales is empty; give at least one scale (0 is added as the baseline).")
    for s in scale_list:
        check_scale(s, "scale in scales")
    for vec in named.values():
        vec.check(model)
    prompt_list = list(prompts) if prompts is not None else neutral_prompts()
    texts = list(heldout) if heldout is not None else heldout_text()
    steered = sorted({s for s in scale_list if s != 0.0})
    jobs: list[tuple[str, float, str]] = [("unsteered", 0.0, p) for p in prompt_list]
    jobs += [(name, s, p) for name in named for s in steered for p in prompt_list]
    outputs: list[str] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        steer: list[RowSteer] = [None if name == "unsteered" else (named[name], s) for name, s, _ in chunk]
        gen = generate(
            model,
            [p for _, _, p in chunk],
            steer,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed + start,
        )
        outputs += gen.texts
    scores = vader_scores(outputs)
    generations = pd.DataFrame(
        [
            {"name": name, "scale": s, "prompt": p, "text": t, "vader": v}
            for (name, s, p), t, v in zip(jobs, outputs, scores, strict=True)
        ]
    )
    baseline = next_token_logprobs(model, texts)
    base_cost = cost(model, texts, None, baseline=baseline)
    base_scores = generations[generations["name"] == "unsteered"]["vader"]
    rows = []
    for name, vec in named.items():
        for s in sorted({0.0, *steered}):
            mine = (
                base_scores
                if s == 0.0
                else generations[(generations["name"] == name) & (generations["scale"] == s)]["vader"]
            )
            c = base_cost if s == 0.0 else cost(model, texts, vec, s, baseline=baseline)
            rows.append(
                {
                    "name": name,
                    "method": vec.meta.get("method"),
                    "scale": s,
                    "direction": "none" if s == 0 else ("positive" if s > 0 else "negative"),
                    "vader_mean": float(mine.mean()),
                    "vader_std": float(mine.std(ddof=0)),
                    "vader_shift": float(mine.mean() - base_scores.mean()),
                    "ppl": c["ppl"],
                    "ppl_increase": c["ppl_increase"],
                    "kl": c["kl"],
                    "entropy": c["entropy"],
                    "n": int(mine.size),
                }
            )
    table = pd.DataFrame(rows)
    summary = _summary(model, named, table, ppl_budget, len(prompt_list), max_new_tokens, do_sample, seed)
    result = SweepResult(table, generations, summary)
    if out is not None:
        result.files = write_sweep_files(result, Path(os.fspath(out)))
    return result


def _best(table: pd.DataFrame, budget: float, sign: int) -> dict[str, Any] | None:
    within = table[(table["ppl_increase"] <= budget) & (table["scale"] * sign > 0)]
    if within.empty:
        return None
    row = within.loc[(within["vader_shift"] * sign).idxmax()]
    return {k: float(row[k]) for k in ("scale", "vader_shift", "ppl_increase")}


def _summary(
    model: Model,
    named: Mapping[str, SteeringVector],
    table: pd.DataFrame,
    budget: float,
    n_prompts: int,
    new_tokens: int,
    do_sample: bool,
    seed: int,
) -> dict[str, Any]:
    per_vector = {}
    for name, vec in named.items():
        mine = table[table["name"] == name]
        per_vector[name] = {
            "meta": dict(vec.meta),
            "sites": vec.sites,
            "normalize": vec.normalize,
            "best_positive_within_budget": _best(mine, budget, +1),
            "best_negative_within_budget": _best(mine, budget, -1),
        }
    return {
        "model": model.name,
        "prompts": n_prompts,
        "max_new_tokens": new_tokens,
        "do_sample": do_sample,
        "seed": seed,
        "ppl_budget": budget,
        "unsteered_vader_mean": float(table[table["scale"] == 0.0]["vader_mean"].iloc[0]),
        "vectors": per_vector,
        "rows": table.to_dict(orient="records"),
    }


def plot_dose_response(table: pd.DataFrame) -> Figure:
    """Two panels against scale, one line per vector: mean VADER score, and perplexity increase (%)."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    score_ax, ppl_ax = fig.subplots(1, 2)
    for name, rows in table.groupby("name", sort=False):
        rows = rows.sort_values("scale")
        score_ax.plot(rows["scale"], rows["vader_mean"], marker="o", label=str(name))
        ppl_ax.plot(rows["scale"], 100 * rows["ppl_increase"], marker="o", label=str(name))
    score_ax.set_xlabel("scale")
    score_ax.set_ylabel("mean VADER compound")
    score_ax.axhline(0.0, color="0.6", linewidth=0.8)
    ppl_ax.set_xlabel("scale")
    ppl_ax.set_ylabel("perplexity increase on held-out text (%)")
    ppl_ax.axhline(100 * PPL_BUDGET, color="0.6", linewidth=0.8, linestyle="--")
    score_ax.legend(fontsize=8)
    return fig


def write_sweep_files(result: SweepResult, folder: Path) -> dict[str, Path]:
    """Write the table (CSV), generations (JSON), PNG and summary (JSON) into `folder`, each atomically."""
    buffer = io.BytesIO()
    plot_dose_response(result.table).savefig(buffer, format="png", dpi=120)
    files = {
        "table": write_text(folder / "dose_response.csv", result.table.to_csv(index=False)),
        "generations": write_text(
            folder / "generations.json",
            json.dumps(result.generations.to_dict(orient="records"), indent=1, ensure_ascii=False) + "\n",
        ),
        "png": write_bytes(folder / "dose_response.png", buffer.getvalue()),
        "summary": write_text(folder / "sweep.json", json.dumps(result.summary, indent=2, ensure_ascii=False) + "\n"),
    }
    return files


def steer_study(
    model: Model,
    concept: str,
    method: str,
    out: str | os.PathLike[str],
    layer: int | None = None,
    scales: Sequence[float] = (-0.2, -0.1, 0.1, 0.2),
    n_prompts: int = 16,
    max_new_tokens: int = 32,
    seed: int = 0,
    *,
    do_sample: bool = False,
    positions: Positions = "all",
    explain_vector: bool = True,
    explain_prompts: int = 8,
    heldout: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What `pathlens steer` runs: find the `concept` vector (a shipped contrast set) with `method` at
    L`layer`.resid_post (default: a third of the way up), normalized to that site's typical norm, so `scales`
    are fractions of a typical activation, applied at `positions`; sweep it over `scales` on `n_prompts` neutral
    prompts (greedy, or seeded sampling with `do_sample`); with `explain_vector` (and token sets for the concept,
    `explain.CONCEPT_TOKENS`), attribute its effect at the largest positive scale to heads, MLPs, edges and
    pathways on `explain_prompts` prompts (`explain.explain`; the graph is saved as explanation_graph). Cost is
    measured on `heldout` (default: the shipped held-out neutral text). Writes
    `vector.safetensors`/`.json`, the sweep's files and `steer.json` (the record returned) into `out`."""
    from pathlens.steering.data import contrast
    from pathlens.steering.explain import CONCEPT_TOKENS, concept_tokens, explain
    from pathlens.steering.finders import find

    data = contrast(concept)
    chosen = model.n_layers // 3 if layer is None else layer
    site = str(model.resolve(f"L{chosen}.resid_post"))
    if isinstance(n_prompts, bool) or not 1 <= n_prompts <= len(neutral_prompts()):
        raise PathlensError(
            f"n_prompts must be 1..{len(neutral_prompts())} (the shipped neutral prompts), got {n_prompts}."
        )
    found = find(model, method, data.positive, data.negative, site, data=f"pathlens {concept} contrast set")
    vec = SteeringVector(found.vectors, positions=positions, normalize=True, norms=found.norms, meta=found.meta)
    folder = Path(os.fspath(out))
    vec.save(folder / "vector")
    result = sweep(
        model,
        {method: vec},
        scales,
        neutral_prompts()[:n_prompts],
        max_new_tokens=max_new_tokens,
        heldout=heldout,
        do_sample=do_sample,
        seed=seed,
        out=folder,
    )
    gens = result.generations
    strongest = {sign: float(max(result.table["scale"] * sign)) * sign for sign in (1, -1)}
    examples = []
    for prompt in neutral_prompts()[: min(3, n_prompts)]:
        mine = gens[gens["prompt"] == prompt]
        row = {"prompt": prompt, "unsteered": str(mine[mine["name"] == "unsteered"]["text"].iloc[0])}
        for s in strongest.values():
            if s != 0.0:
                row[f"scale {s:+g}"] = str(mine[(mine["name"] == method) & (mine["scale"] == s)]["text"].iloc[0])
        examples.append(row)
    explanation: dict[str, Any] | None = None
    files = {k: str(v) for k, v in result.files.items()}
    if explain_vector and concept in CONCEPT_TOKENS and strongest[1] > 0:
        try:
            tokens = concept_tokens(model, concept)
        except PathlensError as err:  # a tokenizer that cannot tell the concept's words apart: say so, go on
            explanation = {"skipped": str(err)}
        else:
            why = explain(model, vec, scale=strongest[1], tokens=tokens, concept=concept, n_prompts=explain_prompts)
            why.graph.save(folder / "explanation_graph")
            files["explanation_graph"] = str(folder / "explanation_graph.safetensors")
            explanation = why.summary()
    record = {
        **result.summary,
        "concept": concept,
        "method": method,
        "site": site,
        "positions": positions_to_json(positions),
        "vector": str(folder / "vector.safetensors"),
        "examples": examples,
        "explanation": explanation,
        "files": files,
    }
    write_text(folder / "steer.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record
