"""Massive activations (Sun, Chen, Kolter, Liu 2024; METHODS §21): the very few residual-stream activations that are
orders of magnitude larger than the rest, where they sit, and what happens when they are removed.

`scan(model, source)` runs the model over token windows (a `pathlens.features.corpus.Windows`, token ids or texts)
caching every layer's output (resid_post) and reports
- every hit: an activation with |h| > `threshold` (100) and |h| > `ratio` (1000) × the median |h| of that layer's
  output on that window — window, position, layer, dimension, token and value;
- per layer, the top-3 |h| and the median |h|, averaged over windows (the paper's `--exp2` statistic).

`intervention_test(model, found, source)` is the paper's `--exp3`: at the layer where they first appear, set the
massive activations to zero, or to their mean value, and measure the perplexity change (interventions held in one
session; nothing else changes). The paper finds zeroing destroys the model and the mean changes almost nothing.

Thresholds: the 1000× ratio is from a third-party summary and the absolute 100 is unverified (METHODS §24).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.progress import Progress
from torch import Tensor

from pathlens.diagnostics.inputs import token_inputs
from pathlens.errors import PathlensError
from pathlens.features.corpus import Windows
from pathlens.interventions import Intervention, Op, Selection
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.sites import Site

HIT_FIELDS = ("window", "position", "layer", "dim", "token_id", "value", "ratio")
STATS = ("top1", "top2", "top3", "median")


@dataclass(frozen=True)
class MassiveScan:
    """What `scan` found.

    hits: Scores (hit, field) — one row per massive activation, the fields of `HIT_FIELDS` (ratio = |value| / the
        layer's median |h| on that window); meta["token_text"] maps each token id to its text.
    layer_stats: Scores (layer, stat) — top-1/2/3 |h| and the median |h| of each layer's output, mean over windows.
    """

    hits: Scores
    layer_stats: Scores

    def table(self) -> pd.DataFrame:
        """The hits as a DataFrame (one row each, integer fields as ints, plus the token text)."""
        v = self.hits.values.double().numpy()
        frame = pd.DataFrame(v, columns=list(HIT_FIELDS))
        for name in ("window", "position", "layer", "dim", "token_id"):
            frame[name] = frame[name].astype(np.int64)
        texts = self.hits.meta["token_text"]
        frame.insert(5, "token", [texts.get(str(i), f"t{i}") for i in frame["token_id"]])
        return frame

    def summary(self) -> pd.DataFrame:
        """Per (layer, dim): how many hits, at which positions and tokens (most common first), mean and max value."""
        frame = self.table()
        if frame.empty:
            return pd.DataFrame(columns=["layer", "dim", "hits", "positions", "tokens", "mean", "max_abs"])
        rows = []
        for (layer, dim), group in frame.groupby(["layer", "dim"]):
            rows.append(
                {
                    "layer": int(layer),
                    "dim": int(dim),
                    "hits": len(group),
                    "positions": dict(group["position"].value_counts().head(5)),
                    "tokens": dict(group["token"].value_counts().head(5)),
                    "mean": float(group["value"].mean()),
                    "max_abs": float(group["value"].abs().max()),
                }
            )
        return pd.DataFrame(rows)

    def first_layer(self) -> int | None:
        """The first layer with a hit (None: none found)."""
        layers = self.hits.values[:, HIT_FIELDS.index("layer")]
        return int(layers.min()) if layers.numel() else None

    def dims(self, layer: int) -> dict[int, float]:
        """The massive dimensions at `layer` with the mean value of their hits (the values `intervention_test` sets
        them to)."""
        frame = self.table()
        at = frame[frame["layer"] == layer]
        return {int(d): float(g["value"].mean()) for d, g in at.groupby("dim")}

    def save(self, folder: str | os.PathLike[str]) -> Path:
        out = Path(os.fspath(folder))
        self.hits.save(out / "hits")
        self.layer_stats.save(out / "layer_stats")
        write_text(
            out / "massive.json", json.dumps({"format": "pathlens.MassiveScan", "parts": ["hits", "layer_stats"]})
        )
        return out

    @staticmethod
    def load(folder: str | os.PathLike[str]) -> MassiveScan:
        out = Path(os.fspath(folder))
        if not (out / "massive.json").is_file():
            raise PathlensError(f"{out} holds no massive.json; pass the folder a MassiveScan was saved to.")
        return MassiveScan(hits=Scores.load(out / "hits"), layer_stats=Scores.load(out / "layer_stats"))

    def plot(self, path: str | os.PathLike[str] | None = None, title: str | None = None) -> Figure:
        """Per layer: the top-1, 2, 3 |h| and the median |h| (log scale), as in the paper's figure."""
        layers = self.layer_stats.coords["layer"]
        values = self.layer_stats.values.double().numpy()
        fig = Figure(figsize=(7.0, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for j, (name, marker) in enumerate(zip(STATS, ("o", "s", "^", "x"), strict=True)):
            ax.plot(layers, values[:, j], marker=marker, label=name if name != "median" else "median")
        ax.set_yscale("log")
        ax.set_xlabel("layer (output)")
        ax.set_ylabel("|activation|")
        ax.legend(fontsize=8)
        ax.set_title(title or f"massive activations: top-3 and median per layer ({self.hits.meta.get('model', '')})")
        if path is not None:
            fig.savefig(os.fspath(path), dpi=150)
        return fig


def token_windows(model: Model, source: object, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token ids and mask of `source`: corpus `Windows`, token ids (n, p) or texts (right-padded)."""
    if isinstance(source, Windows):
        return source.ids, torch.ones_like(source.ids)
    return token_inputs(model, source, attention_mask)


def scan(
    model: Model,
    source: object,
    *,
    threshold: float = 100.0,
    ratio: float = 1000.0,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    interventions: Sequence[Intervention] = (),
    progress: bool = False,
) -> MassiveScan:
    """Find massive activations in every layer's output over `source` (see the module doc). Real tokens only: a
    right-padded row's padding is left out of the medians and the hits. `interventions` apply during the runs."""
    if threshold < 0 or ratio < 0:
        raise PathlensError(f"threshold={threshold}, ratio={ratio}: both must be >= 0.")
    ids, mask = token_windows(model, source, attention_mask)
    chosen = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in chosen:
        if not 0 <= layer < model.n_layers:
            raise PathlensError(f"layers: {layer} is out of range; this model has layers 0..{model.n_layers - 1}.")
    sites = [f"L{layer}.resid_post" for layer in chosen]
    stats = torch.zeros(len(chosen), len(STATS), dtype=torch.float64)
    hits: list[list[float]] = []
    n = int(ids.shape[0])
    with Progress(disable=not progress, transient=True) as bar, torch.no_grad():
        job = bar.add_task(f"scanning {n} windows", total=n)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            cache = model.run(ids[rows], attention_mask=mask[rows], cache=sites, interventions=interventions).cache
            real = mask[rows].bool()  # (B, p)
            for i, (layer, site) in enumerate(zip(chosen, sites, strict=True)):
                magnitude = cache[site].float().abs()  # (B, p, d)
                medians = magnitude.masked_fill(~real[..., None], float("nan")).flatten(1).nanmedian(1).values  # (B,)
                top = magnitude.masked_fill(~real[..., None], -1.0).flatten(1).topk(3, dim=1).values  # (B, 3)
                stats[i, :3] += top.double().sum(0)
                stats[i, 3] += medians.double().sum()
                massive = (magnitude > threshold) & (magnitude > ratio * medians[:, None, None]) & real[..., None]
                for b, pos, dim in massive.nonzero().tolist():  # (hits, 3)
                    value = float(cache[site][b, pos, dim])
                    token = int(ids[start + b, pos])
                    median = float(medians[b])
                    hits.append([start + b, pos, layer, dim, token, value, abs(value) / max(median, 1e-30)])
            bar.advance(job, int(ids[rows].shape[0]))
    stats /= max(n, 1)
    table = torch.tensor(hits, dtype=torch.float64).reshape(-1, len(HIT_FIELDS))
    seen = sorted({int(t) for t in table[:, HIT_FIELDS.index("token_id")].tolist()})
    meta: dict[str, Any] = {
        "model": model.name,
        "threshold": threshold,
        "ratio": ratio,
        "windows": n,
        "tokens": int(mask.sum()),
        "token_text": {str(t): model.to_str_tokens([t])[0] for t in seen},
    }
    if isinstance(source, Windows):
        meta["corpus"] = source.describe()
    return MassiveScan(
        hits=Scores(
            table,
            ("hit", "field"),
            {"hit": list(range(len(hits))), "field": list(HIT_FIELDS)},
            "activation",
            "massive_scan",
            meta,
        ),
        layer_stats=Scores(
            stats,
            ("layer", "stat"),
            {"layer": chosen, "stat": list(STATS)},
            "abs_activation",
            "massive_scan",
            {k: v for k, v in meta.items() if k != "token_text"},
        ),
    )


@dataclass
class SetMassive(Op):
    """Set the massive cells of the listed dimensions — |x| > threshold and > ratio × the row's median |x| — to the
    given values (0 for zeroing, their mean for the mean intervention); every other cell is left as it is."""

    dims: Tensor  # (k,) long
    values: Tensor  # (k,)
    threshold: float = 100.0
    ratio: float = 1000.0
    name: str = field(default="set_massive")

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        magnitude = x.abs()  # (R, P', d)
        median = magnitude.flatten(1).median(dim=1).values  # (R,)
        dims = self.dims.to(x.device)
        picked = magnitude[..., dims]  # (R, P', k)
        massive = (picked > self.threshold) & (picked > self.ratio * median[:, None, None])
        new = torch.where(massive, self.values.to(device=x.device, dtype=x.dtype), x[..., dims])
        out = x.clone()
        out[..., dims] = new
        return out


def perplexity(
    model: Model, ids: Tensor, mask: Tensor, interventions: Sequence[Intervention] = (), batch_size: int = 8
) -> float:
    """exp of the mean next-token cross-entropy over every real (input, next) pair, under `interventions`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, int(ids.shape[0]), batch_size):
            rows = slice(start, start + batch_size)
            logits = model.run(ids[rows], attention_mask=mask[rows], interventions=interventions).logits.double()
            target = ids[rows][:, 1:]
            keep = (mask[rows][:, 1:] * mask[rows][:, :-1]).bool()  # (B, p-1)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
            total += float(nll[keep].sum())
            count += int(keep.sum())
    return math.exp(total / max(count, 1))


def intervention_test(
    model: Model,
    found: MassiveScan,
    source: object,
    layer: int | None = None,
    batch_size: int = 8,
    interventions: Sequence[Intervention] = (),
) -> pd.DataFrame:
    """The paper's intervention: at `layer` (default: the first layer with hits) set the massive activations to zero
    or to their mean; perplexity of `source` for the original model, each intervention, and its ratio.
    `interventions` apply in every run (the baseline too), before the massive ones are set."""
    at = found.first_layer() if layer is None else layer
    if at is None:
        raise PathlensError("intervention_test: the scan found no massive activations, so there is nothing to set.")
    means = found.dims(at)
    if not means:
        raise PathlensError(
            f"intervention_test: no massive activations at layer {at}; layers with some: "
            f"{sorted(set(found.table()['layer']))}."
        )
    ids, mask = token_windows(model, source)
    dims = torch.tensor(list(means), dtype=torch.long)
    threshold, ratio = float(found.hits.meta["threshold"]), float(found.hits.meta["ratio"])
    site = Site("resid_post", at)
    base = perplexity(model, ids, mask, interventions, batch_size=batch_size)
    rows = [{"intervention": "none", "layer": at, "dims": list(means), "perplexity": base, "ratio": 1.0}]
    for kind, values in (("zero", torch.zeros(len(means))), ("mean", torch.tensor(list(means.values())))):
        op = SetMassive(dims, values.float(), threshold, ratio)
        ppl = perplexity(model, ids, mask, [*interventions, Intervention(site, op)], batch_size=batch_size)
        rows.append({"intervention": kind, "layer": at, "dims": list(means), "perplexity": ppl, "ratio": ppl / base})
    return pd.DataFrame(rows)
