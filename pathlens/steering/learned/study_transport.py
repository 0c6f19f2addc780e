"""`transport_study`: what `pathlens steer --method lineas|linear-act` runs — fit transport maps on a shipped
contrast set, sweep their strength over neutral prompts, write the steer, the sweep's files and steer.json.

The record has the shape of `pathlens.steering.sweep.steer_study`'s (rows of the dose–response table with `scale`
= the strength λ, before/after examples, files), so the CLI prints and pages it the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.results.io import write_text
from pathlens.steering.data import contrast, neutral_prompts
from pathlens.steering.learned.linear_act import linear_act
from pathlens.steering.learned.lineas import lineas
from pathlens.steering.learned.transport import TransportSteer
from pathlens.steering.sweep import sweep

METHODS = ("lineas", "linear-act")
KIND = "mlp_out"
"""The site kind the maps act on by default: each layer's MLP output (the down projection's output, one of the
official Linear-AcT sites for Llama-style models)."""
LINEAS_DEFAULTS: dict[str, Any] = {"steps": 40, "lr": 0.03, "l1": 0.8, "group": 0.0, "pooling": "last"}
"""LinEAS settings of the study: those of benchmarks/steering_transport.py. Each sentence's last token is its sample
(on the shipped sentiment set mean pooling, the official default, moved generations far less); Linear-AcT keeps its
mean pooling (last-token ranges and maps broke generation there)."""


def fit_transport(
    model: Model,
    method: str,
    source: Sequence[str],
    target: Sequence[str],
    layers: Sequence[int] | None = None,
    data: str = "",
    **settings: Any,
) -> TransportSteer:
    """LinEAS or Linear-AcT maps on `KIND` at `layers` (default: every layer), from `source` to `target`."""
    if method not in METHODS:
        raise PathlensError(f"unknown transport method {method!r}; use one of {list(METHODS)}.")
    chosen = range(model.n_layers) if layers is None else layers
    sites = [str(model.resolve(f"L{layer}.{KIND}")) for layer in chosen]
    if method == "lineas":
        return lineas(model, source, target, sites, data=data, **{**LINEAS_DEFAULTS, **settings})
    return linear_act(model, source, target, sites, data=data, **settings)


def transport_study(
    model: Model,
    concept: str,
    method: str,
    out: str | os.PathLike[str],
    layer: int | None,
    strengths: Sequence[float],
    n_prompts: int = 16,
    max_new_tokens: int = 32,
    seed: int = 0,
    *,
    do_sample: bool = False,
) -> dict[str, Any]:
    """Fit `method` maps moving the `concept` set's negative sentences onto its positive ones (unpaired use of the
    shipped set) at every layer's mlp_out (or only `layer`'s), sweep `strengths` on `n_prompts` neutral prompts;
    write `transport.safetensors`/`.json`, the sweep's files and `steer.json` (the record returned) into `out`."""
    if method not in METHODS:
        raise PathlensError(f"unknown transport method {method!r}; use one of {list(METHODS)}.")
    if isinstance(n_prompts, bool) or not 1 <= n_prompts <= len(neutral_prompts()):
        raise PathlensError(
            f"n_prompts must be 1..{len(neutral_prompts())} (the shipped neutral prompts), got {n_prompts}."
        )
    data = contrast(concept)
    steer = fit_transport(
        model,
        method,
        data.negative,
        data.positive,
        None if layer is None else [layer],
        data=f"pathlens {concept} contrast set (negative -> positive, unpaired)",
    )
    folder = Path(os.fspath(out))
    steer.save(folder / "transport")
    prompts = neutral_prompts()[:n_prompts]
    result = sweep(
        model,
        {method: steer},  # type: ignore[dict-item]  # sweep reads check, interventions, meta, sites, normalize
        strengths,
        prompts,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        seed=seed,
        out=folder,
    )
    gens = result.generations
    strongest = float(result.table["scale"].max())
    examples = []
    for prompt in prompts[:3]:
        mine = gens[gens["prompt"] == prompt]
        row = {"prompt": prompt, "unsteered": str(mine[mine["name"] == "unsteered"]["text"].iloc[0])}
        if strongest != 0.0:
            chosen = mine[(mine["name"] == method) & (mine["scale"] == strongest)]
            row[f"strength {strongest:g}"] = str(chosen["text"].iloc[0])
        examples.append(row)
    active = steer.active_units()
    record = {
        **result.summary,
        "concept": concept,
        "method": method,
        "site": f"{KIND} at {'every layer' if layer is None else f'layer {layer}'}",
        "active_units": int(active["active"].sum()),
        "total_units": int(active["width"].sum()),
        "vector": str(folder / "transport.safetensors"),
        "examples": examples,
        "explanation": None,
        "files": {k: str(v) for k, v in result.files.items()},
    }
    write_text(folder / "steer.json", json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return record
