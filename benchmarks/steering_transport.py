"""Transport steering benchmark on the embedded SmolLM2: LinEAS and Linear-AcT against the mean-difference vector.

Data: the shipped sentiment set, unpaired — source = 32 negative sentences (pairs 16..47), target = 32 positive
sentences (pairs 0..31). LinEAS takes each sentence's last token as its sample (`--pooling last`: with the official
mean pooling it moved generations far less on this set), Linear-AcT its mean over tokens (`--act-pooling mean`, the
official default: last-token maps broke generation). Parts:
- train: LinEAS on the chosen sites (default every layer's mlp_out), timed (target ≤ 120 s on 2 cores), with its
  active units per site (target ≤ 10 % of the chosen sites' units); Linear-AcT ("incr") fitted on the same data,
  timed; the mean-difference vector (positive − negative, at L`--layer`.resid_post, normalized to the typical norm).
- step-overhead: one LinEAS training step through pathlens (model.run with grad, Affine interventions) against the
  floor — the same step with hand-written forward hooks on the MLP modules — interleaved; the ratio. No peer library
  implements LinEAS or Linear-AcT on Hugging Face models (apple/ml-act and ml-lineas are research code bound to
  their own model wrappers), so there is no peer column.
- dose-response: each method's frontier — strengths λ (transport) or scales (vector) x the shipped neutral prompts
  as rows of batched, per-row-steered greedy generation (`pathlens.steering.sweep`): VADER shift of the generations
  against perplexity increase on the shipped held-out neutral text; then the best shift of each method within
  perplexity budgets, and three before/after generations per method.

`rows(args)` yields the JSON rows; `python benchmarks/steering_transport.py --json` prints one per line.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/steering_transport.py`: import the package from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from benchmarks.common import (
    Emitter,
    add_device_argument,
    check_parts,
    check_repeats_and_threads,
    ratio,
    round_robin,
    set_threads,
    time_once,
)
from pathlens import Model, load
from pathlens.steering import SteeringVector, contrast, mean_difference, neutral_prompts, sweep
from pathlens.steering.learned import TransportSteer, linear_act, lineas
from pathlens.steering.learned.activations import pool, pooled
from pathlens.steering.learned.lineas import frozen, map_interventions, train_maps
from pathlens.steering.learned.ot import matched_quantiles, wasserstein2

PARTS = ("train", "step-overhead", "dose-response")
TRAIN_TARGET_S = 120.0
ACTIVE_TARGET = 0.10
BUDGETS = (0.05, 0.10, 0.25)


def sentiment_sets() -> tuple[list[str], list[str]]:
    """(source, target): 32 negative sentences from pairs 16..47 and 32 positive ones from pairs 0..31 (unpaired)."""
    data = contrast("sentiment")
    return data.negative[16:48], data.positive[:32]


def sites_of(model: Model, kinds: str, layers: str) -> list[str]:
    chosen = range(model.n_layers) if layers == "all" else [int(x) for x in layers.split(",") if x]
    return [f"L{layer}.{kind}" for layer in chosen for kind in kinds.split(",")]


# ---- the floor of one training step: hand-written hooks on the MLP modules ------------------------------


def _map_hook(delta: Tensor, bias: Tensor, store: list[Tensor]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        steered = (1 + delta) * output + bias  # (b, p, d)
        store.append(steered)
        return steered

    return hook


def floor_step(model: Model, texts: list[str], layers: list[int], targets: dict[int, Tensor]) -> Callable[[], float]:
    """One LinEAS step (forward with every map on, W2 loss, backward) with plain forward hooks on `mlp` modules."""
    ids, mask = (t.to(model.device) for t in model.tokenize(texts))
    targets = {layer: t.to(model.device) for layer, t in targets.items()}
    blocks = model.hf.get_submodule(model.arch.blocks)
    params = {
        layer: (
            torch.zeros(targets[layer].shape[1], device=model.device, requires_grad=True),
            torch.zeros(targets[layer].shape[1], device=model.device, requires_grad=True),
        )
        for layer in layers
    }

    def step() -> float:
        stores: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        handles = [
            blocks[layer].mlp.register_forward_hook(_map_hook(*params[layer], stores[layer])) for layer in layers
        ]
        try:
            with frozen(model), torch.enable_grad():
                model.hf(input_ids=ids, attention_mask=mask, logits_to_keep=1)
                loss = sum(
                    wasserstein2(
                        z := pool(stores[layer][0].float(), mask, "mean"), matched_quantiles(targets[layer], z.shape[0])
                    )
                    for layer in layers
                )
                loss.backward()  # type: ignore[union-attr]
        finally:
            for h in handles:
                h.remove()
        return float(loss.detach())  # type: ignore[union-attr]

    return step


def pathlens_step(model: Model, texts: list[str], sites: list[str], targets: dict[str, Tensor]) -> Callable[[], float]:
    """The same step through pathlens: `train_maps` for one step (Adam and prox included, a few microseconds)."""

    def source(params: Any, step: int) -> dict[str, Tensor]:
        return pooled(model, texts, sites, map_interventions(params), "mean", grad=True)

    def step() -> float:
        with frozen(model):
            return train_maps(source, targets, steps=1, lr=1e-2)[1][0]

    return step


# ---- rows ----------------------------------------------------------------------------------------------


def train_rows(model: Model, args: argparse.Namespace, steers: dict[str, Any]) -> Iterator[dict[str, Any]]:
    source, target = sentiment_sets()
    sites = sites_of(model, args.kinds, args.layers)

    def fit() -> TransportSteer:
        return lineas(
            model,
            source,
            target,
            sites,
            steps=args.steps,
            lr=args.lr,
            l1=args.l1,
            group=args.group,
            pooling=args.pooling,
            seed=0,
            data="pathlens sentiment set: 32 negative (source) / 32 positive (target), unpaired",
        )

    steer, seconds = time_once(fit)
    table = steer.active_units()
    steers["lineas"] = steer
    if args.out:
        steer.save(Path(args.out) / "lineas")
    yield {
        "workload": "train",
        "method": "lineas",
        "seconds": round(seconds, 2),
        "target_seconds": TRAIN_TARGET_S,
        "met_time": seconds <= TRAIN_TARGET_S,
        "steps": args.steps,
        "lr": args.lr,
        "l1": args.l1,
        "group": args.group,
        "pooling": args.pooling,
        "sites": len(sites),
        "kinds": args.kinds,
        "loss_start": round(steer.meta["loss_start"], 4),
        "loss_end": round(steer.meta["loss_end"], 4),
        "active_units": steer.meta["active_units"],
        "total_units": steer.meta["total_units"],
        "active_fraction": round(steer.meta["active_units"] / steer.meta["total_units"], 4),
        "target_active_fraction": ACTIVE_TARGET,
        "met_sparsity": steer.meta["active_units"] <= ACTIVE_TARGET * steer.meta["total_units"],
        "active_per_site": {r["site"]: int(r["active"]) for r in table.to_dict(orient="records") if r["active"]},
    }
    act, act_seconds = time_once(
        lambda: linear_act(
            model, source, target, sites, mode=args.act_mode, pooling=args.act_pooling, data="pathlens sentiment set"
        )
    )
    steers["linear-act"] = act
    if args.out:
        act.save(Path(args.out) / "linear_act")
    yield {
        "workload": "train",
        "method": "linear-act",
        "mode": args.act_mode,
        "pooling": args.act_pooling,
        "seconds": round(act_seconds, 2),
        "sites": len(sites),
    }
    vector_site = f"L{args.layer}.resid_post"
    found, vec_seconds = time_once(
        lambda: mean_difference(model, target, source, vector_site, data="pathlens sentiment set")
    )
    steers["mean-diff"] = SteeringVector(found.vectors, normalize=True, norms=found.norms, meta=found.meta)
    yield {"workload": "train", "method": "mean-diff", "seconds": round(vec_seconds, 2), "site": vector_site}


def overhead_rows(model: Model, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    source, target = sentiment_sets()
    layers = list(range(model.n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",") if x]
    sites = [f"L{layer}.mlp_out" for layer in layers]
    targets = pooled(model, target, sites)
    timed = round_robin(
        {
            "pathlens": pathlens_step(model, source, sites, targets),
            "floor": floor_step(model, source, layers, {layer: targets[f"L{layer}.mlp_out"] for layer in layers}),
        },
        args.repeats,
    )
    yield {
        "workload": "step-overhead",
        "method": "lineas",
        "sites": len(sites),
        "pathlens_s": round(timed["pathlens"].median, 3),
        "floor_s": round(timed["floor"].median, 3),
        "ratio_vs_floor": ratio(timed["pathlens"].median, timed["floor"].median),
        "loss_identical": abs(timed["pathlens"].result - timed["floor"].result) <= 1e-5 * abs(timed["floor"].result),
        "peer": "none (no library implements LinEAS on Hugging Face models)",
    }


def dose_rows(model: Model, args: argparse.Namespace, steers: dict[str, Any]) -> Iterator[dict[str, Any]]:
    strengths = [float(s) for s in args.strengths.split(",") if s]
    scales = [float(s) for s in args.scales.split(",") if s]
    prompts = neutral_prompts()[: args.prompts]
    tables, generations = [], []
    for name, levels in (("lineas", strengths), ("linear-act", strengths), ("mean-diff", scales)):
        out = Path(args.out) / f"sweep_{name}" if args.out else None
        result = sweep(model, {name: steers[name]}, levels, prompts, max_new_tokens=args.tokens, out=out)
        tables.append(result.table)
        generations.append(result.generations)
        for row in result.table.to_dict(orient="records"):
            yield {
                "workload": "dose-response",
                "method": name,
                "level": "strength" if name != "mean-diff" else "scale",
                "scale": row["scale"],
                "vader_mean": round(row["vader_mean"], 4),
                "vader_shift": round(row["vader_shift"], 4),
                "ppl_increase": round(row["ppl_increase"], 4),
                "kl": round(row["kl"], 4),
                "n": row["n"],
            }
    table = pd.concat(tables, ignore_index=True)
    for name in ("lineas", "linear-act", "mean-diff"):
        mine = table[(table["name"] == name) & (table["scale"] > 0)]
        best = {}
        for budget in BUDGETS:
            within = mine[mine["ppl_increase"] <= budget]
            best[f"best_shift_within_{int(budget * 100)}pct_ppl"] = (
                None if within.empty else round(float(within["vader_shift"].max()), 4)
            )
        yield {"workload": "frontier", "method": name, **best}
    gens = pd.concat(generations, ignore_index=True)
    for name in ("lineas", "linear-act", "mean-diff"):
        mine = gens[gens["name"] == name]
        strongest = float(mine["scale"].max())
        for prompt in list(dict.fromkeys(gens["prompt"]))[:3]:
            before = gens[(gens["name"] == "unsteered") & (gens["prompt"] == prompt)]["text"].iloc[0]
            after = mine[(mine["prompt"] == prompt) & (mine["scale"] == strongest)]["text"].iloc[0]
            yield {
                "workload": "example",
                "method": name,
                "scale": strongest,
                "prompt": prompt,
                "before": before,
                "after": after,
            }


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The benchmark's rows, in order; `args` as `main` parses them."""
    set_threads(args.threads)
    model = load("smollm2", device=args.device)
    steers: dict[str, Any] = {}
    if "train" in args.parts or "dose-response" in args.parts:
        yield from train_rows(model, args, steers)
    if "step-overhead" in args.parts:
        yield from overhead_rows(model, args)
    if "dose-response" in args.parts:
        yield from dose_rows(model, args, steers)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON line per row")
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--kinds", default="mlp_out", help="site kinds LinEAS / Linear-AcT act on (comma list)")
    p.add_argument("--layers", default="all", help="'all' or a comma list of layers")
    p.add_argument("--steps", type=int, default=40, help="LinEAS training steps")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--l1", type=float, default=0.8, help="LinEAS l1 penalty (per unit of lr)")
    p.add_argument("--group", type=float, default=0.0, help="LinEAS group penalty")
    p.add_argument("--pooling", default="last", choices=["mean", "last", "all"], help="LinEAS samples per sentence")
    p.add_argument("--act-pooling", default="mean", choices=["mean", "last", "all"], help="Linear-AcT's")
    p.add_argument("--act-mode", default="incr", choices=["incr", "atonce"])
    p.add_argument("--layer", type=int, default=10, help="layer of the mean-difference vector (resid_post)")
    p.add_argument("--strengths", default="1,2,3,4", help="transport strengths λ")
    p.add_argument("--scales", default="0.1,0.2,0.3", help="mean-diff scales (fractions of the typical norm)")
    p.add_argument("--prompts", type=int, default=64, help="how many shipped neutral prompts")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    p.add_argument("--out", default="benchmarks/out/steering_transport", help="where steers and sweeps are written")
    add_device_argument(p)
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    check_repeats_and_threads(p, args)
    check_parts(p, args, PARTS)
    emit = Emitter(json=args.json, extra={"model": "smollm2", "threads": args.threads or torch.get_num_threads()})
    for row in rows(args):
        emit(row)
    emit.finish()


if __name__ == "__main__":
    main()
