"""Steering benchmark on the embedded SmolLM2: generation cost against a hand-written hook and the peers,
dose–response, directional ablation, and why a vector works.

Parts:
- generate: 32 neutral prompts x 48 new tokens, greedy, one sentiment vector (difference in means of the shipped
  sentiment pairs) at one layer's resid_post, all positions. pathlens (`pathlens.generate`) against the floor:
  the model's own `generate` with a hand-written forward hook on that block adding the same vector; and the peers
  on the same workload, each on its own deep copy of the weights: nnsight 0.8 (`TransformersModel.generate` with
  the addition at every step, `for step in tracer.iter[:N]`) and TransformerLens 4.3 (`TransformerBridge.generate`
  with a `blocks.L.hook_out` hook). TransformerBridge's key/value-cached generation returns one repeated token on
  SmolLM2 under transformers 5 (also without a hook and for a single unpadded prompt), so TransformerLens is timed
  with `use_past_kv_cache=False`, which gives the right tokens. Peers are timed once (`--peer-repeats`).
- generate-per-row: the same batch with 4 different vectors/scales cycled over the rows, against one vector for
  all rows (the ratio) and against a hand-written hook adding each row's own vector (tokens_identical).
- dose-response: `dose_response(...)`, the workload every steering method is judged on (other benchmark modules
  call it with their own steering objects): scales x the 64 shipped neutral prompts as rows of batched, per-row
  steered generation, seeded sampling (temperature 1) of 48 tokens; VADER shift of the completions against the
  unsteered rows, perplexity increase on held-out neutral text; here for mean-diff, PCA and probe vectors
  (normalized to the layer's typical norm), with three before/after generations per method.
- ablation: the mean-difference direction ablated at every layer (run time): held-out accuracy of a freshly trained
  logistic probe before and after, at several layers (target: chance ± 5 %), and the largest |logit difference|
  between the weight-orthogonalized copy and run-time ablation (target ≤ 1e-4).
- explain: the pathways a sentiment vector acts through (`pathlens.steering.explain`), and how long it takes.
- learned: the learned-steering methods on the same sentiment data, with their own modules' default settings
  (not in the default parts: they train for minutes): LinEAS and Linear-AcT beside mean-diff
  (benchmarks/steering_transport.py) and the weighted controller and EigenShift
  (benchmarks/steering_controller.py); run those scripts directly to change their settings.

Run `python benchmarks/steering.py --json` for one JSON line per row.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/steering.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import copy
import dataclasses
import importlib.util
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import (
    Emitter,
    add_device_argument,
    check_parts,
    check_repeats_and_threads,
    max_abs_diff,
    ratio,
    round_robin,
    set_threads,
    tl_bridge,
    versions,
)
from pathlens import Model, load
from pathlens.steering import SteeringVector, contrast, explain, find, generate, neutral_prompts, sweep
from pathlens.steering.ablation import ablation_interventions, orthogonalized, probe_after_ablation
from pathlens.steering.generate import left_padded, pad_id

PARTS = ("generate", "generate-per-row", "dose-response", "ablation", "explain", "learned")
DEFAULT_PARTS = PARTS[:-1]
N_PROMPTS, NEW_TOKENS = 32, 48
DOSE_PROMPTS, DOSE_TOKENS, DOSE_SEED = 64, 48, 0
TARGET_SHIFT, PPL_BUDGET = 0.3, 0.25
METHODS = ("mean-diff", "pca", "probe")


def _adding_hook(vectors: Tensor) -> Callable[..., Any]:
    """The floor: a forward hook on a block adding `vectors` ((d,) or (B, 1, d)) to its hidden-state output."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + vectors.to(hidden)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return hook


def _hooked_generate(model: Model, ids: Tensor, mask: Tensor, layer: int, vectors: Tensor) -> Tensor:
    block = model.hf.get_submodule(model.arch.blocks)[layer]
    handle = block.register_forward_hook(_adding_hook(vectors))
    try:
        with torch.no_grad():
            out = model.hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad_id(model),
            )
    finally:
        handle.remove()
    return out[:, ids.shape[1] :].cpu()


def nnsight_runner(model: Model, ids: Tensor, mask: Tensor, layer: int, added: Tensor) -> Callable[[], Tensor]:
    """nnsight 0.8, idiomatic: `generate` with the vector added to the block's output at each of the N steps."""
    from nnsight.modeling.transformers import TransformersModel

    lm = TransformersModel(copy.deepcopy(model.hf), tokenizer=model.tokenizer, task="text-generation")
    block = lm.model.layers[layer]

    def run() -> Tensor:
        with lm.generate(
            {"input_ids": ids, "attention_mask": mask},
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_id(model),
        ) as tracer:
            for _ in tracer.iter[:NEW_TOKENS]:  # every step happens unless every row ends early (not on this workload)
                block.output[:] += added
            out = tracer.result.save()
        return out[:, ids.shape[1] :].cpu()

    return run


def tl_runner(model: Model, ids: Tensor, mask: Tensor, layer: int, added: Tensor) -> Callable[[], Tensor]:
    """TransformerLens 4.3: a TransformerBridge around a deep copy, `generate` under a `blocks.L.hook_out` hook
    (without the key/value cache, whose output is wrong on this model: see the module docstring)."""
    bridge = tl_bridge(model.hf)  # type: ignore[arg-type]  # an HF PreTrainedModel

    def hook(x: Tensor, hook: Any) -> Tensor:
        return x + added.to(x)

    def run() -> Tensor:
        with torch.no_grad(), bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_out", hook)]):
            out = bridge.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                use_past_kv_cache=False,
                stop_at_eos=False,
                return_type="tokens",
                verbose=False,
            )
        return out[:, ids.shape[1] :].cpu()

    return run


def sentiment_vector(model: Model, method: str, site: str, scale: float = 1.0) -> SteeringVector:
    """The shipped sentiment pairs' vector by `method` at `site`, normalized to the site's typical norm."""
    data = contrast("sentiment")
    found = find(model, method, data.positive, data.negative, site, data="shipped sentiment pairs")
    return SteeringVector(found.vectors, normalize=True, norms=found.norms, scale=scale, meta=found.meta)


def generation_rows(model: Model, vec: SteeringVector, layer: int, args: argparse.Namespace) -> Iterator[dict]:
    prompts = neutral_prompts()[:N_PROMPTS]
    ids, mask = (t.to(model.device) for t in left_padded(model, prompts, None))  # the floor's and peers' inputs
    site = vec.sites[0]
    added = (vec.scale * vec.effective(site)).to(model.device)
    timed = round_robin(
        {
            "pathlens": lambda: generate(model, prompts, vec, max_new_tokens=NEW_TOKENS).ids,
            "floor": lambda: _hooked_generate(model, ids, mask, layer, added),
        },
        args.repeats,
    )
    peers: dict[str, tuple[float | None, bool | None, str]] = {}
    for name, dist, make in (("nnsight", "nnsight", nnsight_runner), ("tl", "transformer-lens", tl_runner)):
        wanted = name in args.peers.split(",")
        if not wanted or importlib.util.find_spec(dist.replace("-", "_")) is None:
            peers[name] = (None, None, "not installed" if wanted else "skipped (--peers)")
            continue
        peer = round_robin({name: make(model, ids, mask, layer, added)}, args.peer_repeats, warm_up=False)[name]
        same = bool(torch.equal(peer.result, timed["floor"].result))
        peers[name] = (peer.median, same, versions([dist])[dist])
    yield {
        "workload": "generate",
        "prompts": N_PROMPTS,
        "new_tokens": NEW_TOKENS,
        "site": site,
        "pathlens_s": round(timed["pathlens"].median, 3),
        "floor_s": round(timed["floor"].median, 3),
        "ratio_vs_floor": ratio(timed["pathlens"].median, timed["floor"].median),
        "tokens_identical": bool(torch.equal(timed["pathlens"].result, timed["floor"].result)),
        "nnsight_s": None if peers["nnsight"][0] is None else round(peers["nnsight"][0], 3),
        "tl_s": None if peers["tl"][0] is None else round(peers["tl"][0], 3),
        "speedup_vs_nnsight": ratio(peers["nnsight"][0], timed["pathlens"].median),
        "speedup_vs_tl": ratio(peers["tl"][0], timed["pathlens"].median),
        "nnsight_tokens_identical": peers["nnsight"][1],
        "tl_tokens_identical": peers["tl"][1],
        "nnsight_version": peers["nnsight"][2],
        "tl_version": peers["tl"][2],
        "tl_variant": "TransformerBridge.generate, use_past_kv_cache=False (its cached generation is wrong here)",
        "peer_repeats": args.peer_repeats,
    }
    if "generate-per-row" not in args.parts:
        return
    entries = [(vec, vec.scale), (vec, -vec.scale), (vec, vec.scale / 2), None]  # a pair's scale replaces vec's
    steer = [entries[i % 4] for i in range(N_PROMPTS)]
    unit = vec.effective(site)
    per_row = torch.stack([torch.zeros_like(unit) if e is None else e[1] * unit for e in steer])  # (B, d)
    per_row = per_row[:, None, :].to(model.device)  # (B, 1, d)
    timed = round_robin(
        {
            "per_row": lambda: generate(model, prompts, steer, max_new_tokens=NEW_TOKENS).ids,
            "one_vector": lambda: generate(model, prompts, vec, max_new_tokens=NEW_TOKENS).ids,
            "floor": lambda: _hooked_generate(model, ids, mask, layer, per_row),
        },
        args.repeats,
    )
    yield {
        "workload": "generate-per-row",
        "prompts": N_PROMPTS,
        "new_tokens": NEW_TOKENS,
        "pathlens_s": round(timed["per_row"].median, 3),
        "one_vector_s": round(timed["one_vector"].median, 3),
        "ratio_vs_one_vector": ratio(timed["per_row"].median, timed["one_vector"].median),
        "floor_s": round(timed["floor"].median, 3),
        "ratio_vs_floor": ratio(timed["per_row"].median, timed["floor"].median),
        "tokens_identical": bool(torch.equal(timed["per_row"].result, timed["floor"].result)),
        "nnsight_s": None,
        "tl_s": None,
    }


def dose_response(
    model: Model,
    steers: Mapping[str, Any],
    levels: Sequence[float],
    out: str | os.PathLike[str] | None,
    *,
    prompts: int = DOSE_PROMPTS,
    new_tokens: int = DOSE_TOKENS,
    seed: int = DOSE_SEED,
    do_sample: bool = True,
    examples: int = 3,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """The dose–response workload every steering method is judged on, as benchmark rows.

    steers: name -> a SteeringVector or any steering object `pathlens.steering.sweep` accepts (learned steering);
    levels: its scales (or strengths). The first `prompts` shipped neutral prompts x `levels` are generated as rows
    of batched, per-row-steered generation (`new_tokens` tokens, seeded sampling at temperature 1 by default);
    each steer's files go to `out/<name>/` (generations.json is the texts' file). Yields, per (steer, level): a
    "dose-response" row (method, direction, scale, vader_mean, vader_shift vs the unsteered rows, ppl_increase on
    held-out neutral text, kl, n, met: |shift| ≥ 0.3 in the level's direction within a 25 % perplexity increase,
    generations); then per steer a "frontier" row (the best shift each way within the budget) and `examples`
    "example" rows (before/after at the strongest positive level). `extra` is added to every row."""
    more = dict(extra or {})
    chosen = neutral_prompts()[:prompts]
    for name, steer in steers.items():
        folder = None if out is None else Path(os.fspath(out)) / name
        result = sweep(
            model, {name: steer}, levels, chosen, max_new_tokens=new_tokens, do_sample=do_sample, seed=seed, out=folder
        )
        texts = str(result.files["generations"]) if "generations" in result.files else None
        table = result.table
        for row in table.to_dict(orient="records"):
            sign = 1 if row["scale"] > 0 else -1 if row["scale"] < 0 else 0
            yield {
                "workload": "dose-response",
                "method": name,
                "direction": row["direction"],
                "scale": row["scale"],
                "vader_mean": round(row["vader_mean"], 4),
                "vader_shift": round(row["vader_shift"], 4),
                "ppl_increase": round(row["ppl_increase"], 4),
                "kl": round(row["kl"], 4),
                "n": row["n"],
                "do_sample": do_sample,
                "seed": seed,
                "new_tokens": new_tokens,
                "met": bool(sign and sign * row["vader_shift"] >= TARGET_SHIFT and row["ppl_increase"] <= PPL_BUDGET),
                "generations": texts,
                **more,
            }
        best: dict[str, dict[str, float] | None] = {}
        for sign, label in ((1, "positive"), (-1, "negative")):
            within = table[(table["scale"] * sign > 0) & (table["ppl_increase"] <= PPL_BUDGET)]
            if within.empty:
                best[label] = None
                continue
            top = within.loc[(within["vader_shift"] * sign).idxmax()]
            best[label] = {k: round(float(top[k]), 4) for k in ("scale", "vader_shift", "ppl_increase")}
        yield {"workload": "frontier", "method": name, "ppl_budget": PPL_BUDGET, **best, **more}
        gens = result.generations
        strongest = float(table["scale"].max())
        if strongest <= 0:
            continue
        for prompt in chosen[:examples]:
            before = gens[(gens["name"] == "unsteered") & (gens["prompt"] == prompt)]["text"].iloc[0]
            mine = gens[(gens["name"] == name) & (gens["prompt"] == prompt)]
            after = mine[mine["scale"] == strongest]["text"].iloc[0]
            weakest = float(table["scale"].min())
            negative = mine[mine["scale"] == weakest]["text"].iloc[0] if weakest < 0 else None
            yield {
                "workload": "example",
                "method": name,
                "prompt": prompt,
                "before": before,
                f"after_{strongest:+g}": after,
                **({f"after_{weakest:+g}": negative} if negative is not None else {}),
                **more,
            }


def ablation_rows(model: Model, layer: int, probe_layers: Sequence[int]) -> Iterator[dict[str, Any]]:
    data = contrast("sentiment")
    site = f"L{layer}.resid_post"
    direction = sentiment_vector(model, "mean-diff", site).vectors[site]
    start = time.perf_counter()
    table = probe_after_ablation(
        model, data.positive, data.negative, direction, [f"L{i}.resid_post" for i in probe_layers]
    )
    seconds = time.perf_counter() - start
    for row in table.to_dict(orient="records"):
        yield {
            "workload": "ablation-probe",
            "direction_from": site,
            "site": row["site"],
            "probe_before": round(row["before"], 4),
            "probe_after": round(row["after"], 4),
            "chance": 0.5,
            "met": abs(row["after"] - 0.5) <= 0.05,
            "residual_along_direction": row["residual"],
            "n": len(data.positive) + len(data.negative),
            "folds": 4,
            "seconds_all_sites": round(seconds, 2),
        }
    ids, mask = model.tokenize(neutral_prompts()[:8])
    with torch.no_grad():
        ablated = model.run(ids, attention_mask=mask, interventions=ablation_interventions(model, direction)).logits
        baked = orthogonalized(model, direction).run(ids, attention_mask=mask).logits
    real = mask.bool()
    diff = max_abs_diff(baked[real], ablated[real])
    yield {"workload": "ablation-orthogonalized", "max_abs_logit_diff": diff, "met": diff <= 1e-4, "prompts": 8}


def explain_rows(model: Model, vec: SteeringVector, prompts: int) -> Iterator[dict[str, Any]]:
    start = time.perf_counter()
    found = explain(model, vec, n_prompts=prompts, k=8)
    summary = found.summary(k=5)
    yield {
        "workload": "explain",
        "site": vec.sites[0],
        "scale": vec.scale,
        "prompts": prompts,
        "seconds": round(time.perf_counter() - start, 2),
        "unsteered_metric": round(found.unsteered_metric, 4),
        "steered_metric": round(found.steered_metric, 4),
        "top_heads": summary["top_heads"],
        "top_mlps": summary["top_mlps"],
        "paths": [" -> ".join(p["nodes"]) + f" ({p['score']:.3g})" for p in summary["paths"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--peers", default="nnsight,tl", help="peers timed on the generate workload")
    parser.add_argument("--peer-repeats", type=int, default=1, help="timed runs of each peer")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--scales", default="-0.3,-0.2,-0.1,0.1,0.2,0.3", help="fractions of the typical norm")
    parser.add_argument("--methods", default=",".join(METHODS), help="finders in the dose-response part")
    parser.add_argument("--positions", default="all", help="where the dose-response vectors are added")
    parser.add_argument("--dose-prompts", type=int, default=DOSE_PROMPTS)
    parser.add_argument("--dose-tokens", type=int, default=DOSE_TOKENS, help="new tokens per dose-response row")
    parser.add_argument("--greedy", action="store_true", help="greedy dose-response instead of seeded sampling")
    parser.add_argument("--probe-layers", default="3,6,10,15,20,29", help="layers the ablation probe reads")
    parser.add_argument("--out", default="benchmarks/out/steering", help="where the dose-response files go")
    add_device_argument(parser)
    args = parser.parse_args()
    check_repeats_and_threads(parser, args)
    check_parts(parser, args, PARTS)
    set_threads(args.threads)
    model = load("smollm2", device=args.device)
    site = f"L{args.layer}.resid_post"
    emit = Emitter(json=args.json, extra={"model": "smollm2", "threads": torch.get_num_threads()})
    if "generate" in args.parts or "generate-per-row" in args.parts or "explain" in args.parts:
        vec = sentiment_vector(model, "mean-diff", site, scale=0.2)
    if "generate" in args.parts or "generate-per-row" in args.parts:
        for row in generation_rows(model, vec, args.layer, args):
            emit(row)
    if "dose-response" in args.parts:
        scales = [float(s) for s in args.scales.split(",") if s]
        vectors = {
            method: dataclasses.replace(sentiment_vector(model, method, site), positions=args.positions)
            for method in args.methods.split(",")
        }
        extra = {"site": site, "positions": args.positions}
        for row in dose_response(
            model,
            vectors,
            scales,
            Path(args.out),
            prompts=args.dose_prompts,
            new_tokens=args.dose_tokens,
            do_sample=not args.greedy,
            extra=extra,
        ):
            emit(row)
    if "ablation" in args.parts:
        for row in ablation_rows(model, args.layer, [int(x) for x in args.probe_layers.split(",")]):
            emit(row)
    if "explain" in args.parts:
        for row in explain_rows(model, vec, prompts=16):
            emit(row)
    if "learned" in args.parts:
        from benchmarks import steering_controller, steering_transport

        shared = ["--threads", str(args.threads or 0), "--repeats", str(args.repeats), "--device", str(args.device)]
        for row in steering_transport.rows(steering_transport.parser().parse_args(shared)):
            emit(row)
        for row in steering_controller.rows(steering_controller.parse(shared)):
            emit(row)
    emit.finish()


if __name__ == "__main__":
    main()
