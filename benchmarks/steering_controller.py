"""Learned steering on the embedded SmolLM2 with the shipped sentiment set: the weighted controller and EigenShift.

Parts:
- controller: the Guiding Giants controller (pathlens.steering.learned.controller) over a per-layer mean-difference
  direction (positive − negative sentiment at every layer's resid_post, each at its layer's typical norm), trained
  on the first 24 contrast pairs — negative sentences need steering (label 1), positive sentences and 24 neutral
  prompts do not (label 0). Judged on held-out prompts: the concept shift is the mean VADER shift of greedy
  continuations of the held-out negative sentences (targets, --n-prompts of them); the cost is KL(unsteered ‖
  steered) of next-token distributions along the unsteered greedy continuation (forced decoding, every step) of
  prompts that need no steering — as many held-out positive sentences ("already have the concept") and held-out
  neutral prompts ("unrelated"). The baseline is the same direction at a fixed scale at every layer, added where
  the controller adds (each forward's last position). A `matched` row compares the two at equal mean shift (KL
  interpolated linearly along each method's scale sweep). Controller variants: gate sigmoid / raw (the paper),
  update step (lagged) / prompt. Also timed: controller generation vs fixed-vector generation vs unsteered
  hf.generate (the floor).
- eigenshift: SVD of the unembedding; components scored on final normed states of the training texts, split by
  the model's own next-token probability of negative words (VADER lexicon valence ≤ −1.5): the top 10% of
  states ("states that produce negative words") vs the rest; k components scaled by β. Judged by the summed
  next-token probability of 22 negative words after 24 held-out sentence openings ("Everyone agreed that the movie
  felt"), its relative drop, the perplexity increase on the shipped held-out neutral text, and VADER of greedy
  continuations of those openings (for β = 0). Checked: the edited copy's logits against the run-time op's.
  Timed: generation with the run-time op vs from the edited copy (the floor: no hook).

Run `python benchmarks/steering_controller.py --json` for one JSON line per row; `rows(args)` yields them.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/steering_controller.py`: import the package from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import (
    Emitter,
    add_device_argument,
    check_parts,
    check_repeats_and_threads,
    round_robin,
    set_threads,
)
from pathlens import Model, load
from pathlens.steering import (
    SteeringVector,
    contrast,
    generate,
    heldout_text,
    layer_sites,
    mean_difference,
    neutral_prompts,
    perplexity,
    token_set_probability,
    vader_scores,
)
from pathlens.steering.generate import Steerer, left_padded, pad_id
from pathlens.steering.learned.controller import WeightedSteering, train_controller
from pathlens.steering.learned.eigenshift import components, unembedding_site
from pathlens.steering.learned.study_controller import forced_logits, step_kl

PARTS = ("controller", "eigenshift")
NEGATIVE_WORDS = [
    " terrible", " awful", " horrible", " miserable", " dreadful", " disappointing", " bad", " boring", " sad",
    " worst", " poor", " ugly", " disgusting", " annoying", " angry", " hate", " disappointed", " unpleasant",
    " painful", " negative", " mediocre", " lousy",
]  # fmt: skip
VARIANTS = {"sigmoid-prompt": ("sigmoid", "prompt"), "sigmoid-step": ("sigmoid", "step"), "raw-step": ("raw", "step")}


def _interp(x: Sequence[float], y: Sequence[float], at: float) -> float | None:
    """y at x = `at`, linear between the sweep's points (sorted by x); None outside the measured range."""
    order = np.argsort(x)
    xs, ys = np.asarray(x)[order], np.asarray(y)[order]
    if not xs[0] <= at <= xs[-1]:
        return None
    return float(np.interp(at, xs, ys))


def controller_rows(model: Model, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    data = contrast("sentiment")
    neutral = neutral_prompts()
    train_pos, train_neg = data.positive[:24], data.negative[:24]
    n = args.n_prompts
    targets = data.negative[24 : 24 + n]
    keep = {"has-concept": data.positive[24 : 24 + n], "unrelated": neutral[32 : 32 + n]}
    found = mean_difference(model, train_pos, train_neg, layer_sites(model), data="shipped sentiment pairs 0-23")
    direction = SteeringVector(found.vectors, normalize=True, norms=found.norms, positions="last", meta=found.meta)
    trained = train_controller(model, train_neg, train_pos + neutral[:24], direction, seed=0)
    yield {
        "workload": "controller-training",
        "method": "controller",
        "read_seconds": round(trained.meta["read_seconds"], 3),
        "train_seconds": round(trained.meta["train_seconds"], 3),
        "losses": [round(v, 4) for v in trained.meta["losses"]],
        "n_steer": trained.meta["n_steer"],
        "n_keep": trained.meta["n_keep"],
    }
    tokens = args.tokens
    base_targets = generate(model, targets, max_new_tokens=tokens)
    base_vader = float(np.mean(vader_scores(base_targets.texts)))
    base_keep = {name: generate(model, ps, max_new_tokens=tokens, logits=True) for name, ps in keep.items()}
    settings: list[tuple[str, float, Steerer | SteeringVector]] = [
        ("fixed", c, direction.with_scale(c)) for c in args.fixed_scales
    ]
    for variant, (gate, update) in VARIANTS.items():
        settings += [
            (f"controller-{variant}", a, trained.with_(alpha=a, gate=gate, update=update)) for a in args.alphas
        ]
    examples: dict[str, list[str]] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, scale, steer in settings:
        gen = generate(model, targets, steer, max_new_tokens=tokens)
        shift = float(np.mean(vader_scores(gen.texts))) - base_vader
        kls = {}
        for kind, ps in keep.items():
            base = base_keep[kind]
            assert base.logits is not None
            kls[kind] = step_kl(base.logits, forced_logits(model, steer, ps, base.ids))
        row = {
            "workload": "controller",
            "method": "controller" if name.startswith("controller") else "fixed",
            "variant": name,
            "scale": scale,
            "vader_mean": round(base_vader + shift, 4),
            "vader_shift": round(shift, 4),
            "kl_has_concept": round(kls["has-concept"], 5),
            "kl_unrelated": round(kls["unrelated"], 5),
            "kl": round((kls["has-concept"] + kls["unrelated"]) / 2, 5),
            "ppl_increase": None,
            "n_targets": len(targets),
        }
        if isinstance(steer, WeightedSteering):
            row["mean_gain_targets"] = round(float(steer.gains(steer.read(model, targets)).mean()), 5)
            row["mean_gain_keep"] = round(
                float(torch.cat([steer.gains(steer.read(model, ps)) for ps in keep.values()]).mean()), 5
            )
        curves.setdefault(name, []).append((shift, row["kl"]))
        examples[f"{name}@{scale:g}"] = gen.texts[:3]
        yield row
    fixed = curves["fixed"]
    for variant in [n for n in curves if n != "fixed"]:
        mine = curves[variant]
        for shift, kl_fixed in fixed:
            kl_ctrl = _interp([s for s, _ in mine], [k for _, k in mine], shift)
            yield {
                "workload": "controller-matched",
                "method": "controller",
                "variant": variant,
                "vader_shift": round(shift, 4),
                "kl_fixed": round(kl_fixed, 5),
                "kl_controller": None if kl_ctrl is None else round(kl_ctrl, 5),
                "ratio": None if kl_ctrl is None or kl_fixed == 0 else round(kl_ctrl / kl_fixed, 3),
                "met": None if kl_ctrl is None else kl_ctrl < kl_fixed,
            }
    yield {
        "workload": "controller-examples",
        "method": "controller",
        "prompts": targets[:3],
        "unsteered": base_targets.texts[:3],
        "steered": examples,
    }
    prompts = targets[:16]
    ids, mask = (t.to(model.device) for t in left_padded(model, prompts, None))  # the floor's inputs
    ctrl = trained.with_(alpha=args.alphas[-1], gate="sigmoid")
    fixed_vec = direction.with_scale(args.fixed_scales[-1])

    def floor() -> Tensor:
        with torch.no_grad():
            return model.hf.generate(  # type: ignore[operator, no-any-return]
                input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=pad_id(model)
            )

    timed = round_robin(
        {
            "controller": lambda: generate(model, prompts, ctrl, max_new_tokens=tokens),
            "fixed": lambda: generate(model, prompts, fixed_vec, max_new_tokens=tokens),
            "floor": floor,
        },
        args.repeats,
    )
    yield {
        "workload": "controller-generation-time",
        "method": "controller",
        "prompts": len(prompts),
        "new_tokens": tokens,
        "seconds_controller": round(timed["controller"].median, 3),
        "seconds_fixed": round(timed["fixed"].median, 3),
        "seconds_floor": round(timed["floor"].median, 3),
        "ratio_vs_fixed": round(timed["controller"].median / timed["fixed"].median, 3),
        "ratio_vs_floor": round(timed["controller"].median / timed["floor"].median, 3),
    }


def _negative_vocab(model: Model) -> Tensor:
    """Which token ids decode to a word of the VADER lexicon with valence ≤ −1.5 (vocab,) bool."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # type: ignore[import-untyped]

    lexicon = SentimentIntensityAnalyzer().lexicon
    words = [model.tokenizer.decode([i]).strip().lower() for i in range(model.vocab_size)]
    return torch.tensor([lexicon.get(w, 0.0) <= -1.5 for w in words])


def eigenshift_rows(model: Model, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    data = contrast("sentiment")
    spec = json.loads(resources.files("pathlens.steering.data").joinpath("sentiment.json").read_text())
    openings = [
        t.split("{adjective}")[0].rstrip().format(subject=s) for t in spec["templates"][2:] for s in spec["subjects"]
    ]
    heldout = heldout_text()
    texts = data.negative[:24] + data.positive[:24] + neutral_prompts()[:32]
    site = unembedding_site(model)
    ids, mask = model.tokenize(texts)
    start = time.perf_counter()
    with torch.no_grad():
        run = model.run(ids, attention_mask=mask, cache=site)
    states = run.cache[site][mask.bool()]  # (N, d)
    p_negative = torch.softmax(run.logits[mask.bool()].double(), -1)[:, _negative_vocab(model)].sum(-1)  # (N,)
    concept = p_negative >= p_negative.quantile(0.9)
    read_seconds = time.perf_counter() - start
    base_prob = float(token_set_probability(model, openings, NEGATIVE_WORDS).mean())
    base_ppl = perplexity(model, heldout)
    base_gen = generate(model, openings, max_new_tokens=args.tokens)
    base_vader = float(np.mean(vader_scores(base_gen.texts)))
    yield {
        "workload": "eigenshift",
        "method": "eigenshift",
        "how": None,
        "k": 0,
        "beta": 1.0,
        "scale": 1.0,
        "neg_prob": round(base_prob, 6),
        "neg_prob_drop": 0.0,
        "ppl": round(base_ppl, 4),
        "ppl_increase": 0.0,
        "vader_mean": round(base_vader, 4),
        "vader_shift": 0.0,
        "n_concept_states": int(concept.sum()),
        "n_other_states": int((~concept).sum()),
    }
    examples: dict[str, list[str]] = {"unsteered": base_gen.texts[:3]}
    best: dict[str, Any] | None = None
    for how in args.hows:
        start = time.perf_counter()
        comps = components(model, states[concept].float(), states[~concept].float(), how)  # type: ignore[arg-type]
        score_seconds = read_seconds + time.perf_counter() - start
        for k in args.ks:
            for beta in args.betas:
                shift = comps.select(k, beta, model)
                edited = shift.edited(model)
                prob = float(token_set_probability(edited, openings, NEGATIVE_WORDS).mean())
                ppl = perplexity(edited, heldout)
                row: dict[str, Any] = {
                    "workload": "eigenshift",
                    "method": "eigenshift",
                    "how": how,
                    "k": k,
                    "beta": beta,
                    "scale": beta,
                    "components": list(shift.components[:8]),
                    "neg_prob": round(prob, 6),
                    "neg_prob_drop": round(1 - prob / base_prob, 4),
                    "ppl": round(ppl, 4),
                    "ppl_increase": round(ppl / base_ppl - 1, 4),
                    "vader_mean": None,
                    "vader_shift": None,
                    "score_seconds": round(score_seconds, 3),
                    "met": prob <= 0.5 * base_prob and ppl <= 1.05 * base_ppl,
                }
                if beta == 0.0 and k in args.vader_ks:
                    gen = generate(edited, openings, max_new_tokens=args.tokens)
                    vader = float(np.mean(vader_scores(gen.texts)))
                    row["vader_mean"], row["vader_shift"] = round(vader, 4), round(vader - base_vader, 4)
                    examples[f"{how} k={k} β=0"] = gen.texts[:3]
                within = row["ppl_increase"] <= 0.05
                if within and (best is None or row["neg_prob_drop"] > best["neg_prob_drop"]):
                    best = row
                del edited
                yield row
    yield {**(best or {}), "workload": "eigenshift-best-within-5pct-ppl", "method": "eigenshift"}
    yield {"workload": "eigenshift-examples", "method": "eigenshift", "prompts": openings[:3], "steered": examples}
    shift = components(model, states[concept].float(), states[~concept].float(), "auroc").select(8, 0.0, model)  # type: ignore[arg-type]
    edited = shift.edited(model)
    probe_ids, probe_mask = model.tokenize(heldout[:8])
    with torch.no_grad(), shift.applied(model):
        live = model.hf(input_ids=probe_ids.to(model.device), attention_mask=probe_mask.to(model.device)).logits
    copied = edited.run(probe_ids, attention_mask=probe_mask).logits
    prompts = openings[:16]
    timed = round_robin(
        {
            "op": lambda: generate(model, prompts, shift, max_new_tokens=args.tokens),
            "copy": lambda: generate(edited, prompts, max_new_tokens=args.tokens),
        },
        args.repeats,
    )
    yield {
        "workload": "eigenshift-copy-vs-op",
        "method": "eigenshift",
        "max_abs_logit_diff": float((live - copied)[probe_mask.bool()].abs().max()),
        "seconds_op": round(timed["op"].median, 3),
        "seconds_copy_floor": round(timed["copy"].median, 3),
        "ratio": round(timed["op"].median / timed["copy"].median, 3),
        "tokens_identical": bool(torch.equal(timed["op"].result.ids, timed["copy"].result.ids)),
    }


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Every row of the chosen parts (see module docstring), as they are measured."""
    set_threads(args.threads)
    model = load("smollm2", device=args.device)
    if "controller" in args.parts:
        yield from controller_rows(model, args)
    if "eigenshift" in args.parts:
        yield from eigenshift_rows(model, args)


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This benchmark's arguments (`argv`, or the command line), checked and with the comma lists parsed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--quick", action="store_true", help="one timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per generation")
    parser.add_argument("--n-prompts", type=int, default=16, help="held-out prompts per set (at most 24)")
    parser.add_argument("--fixed-scales", default="0.003,0.01", help="fixed per-layer scales (typical-norm units)")
    parser.add_argument("--alphas", default="0.006,0.02", help="controller α_global values")
    parser.add_argument("--ks", default="1,2,4,8,16,32", help="EigenShift component counts")
    parser.add_argument("--betas", default="0,0.5", help="EigenShift β values")
    parser.add_argument("--vader-ks", default="4,16", help="k values (β = 0) whose generations are scored")
    parser.add_argument("--hows", default="mean-diff,auroc", help="EigenShift component scores: mean-diff, auroc")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_repeats_and_threads(parser, args)
    check_parts(parser, args, PARTS)
    if not 1 <= args.n_prompts <= 24:
        parser.error("--n-prompts must be 1..24 (the held-out half of the sentiment pairs)")
    args.fixed_scales, args.alphas, args.betas = _floats(args.fixed_scales), _floats(args.alphas), _floats(args.betas)
    args.ks = [int(k) for k in _floats(args.ks)]
    args.vader_ks = [int(k) for k in _floats(args.vader_ks)]
    args.hows = [h for h in args.hows.split(",") if h]
    if not args.hows or any(h not in ("mean-diff", "auroc") for h in args.hows):
        parser.error("--hows is a comma list of mean-diff, auroc")
    return args


def main() -> None:
    args = parse()
    emit = Emitter(json=args.json, extra={"model": "smollm2", "threads": args.threads or torch.get_num_threads()})
    for row in rows(args):
        emit(row)
    emit.finish()


if __name__ == "__main__":
    main()
