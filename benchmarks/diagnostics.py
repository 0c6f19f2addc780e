"""Diagnostics benchmark and parity script: head detectors against TransformerLens, the logit lens and commitment
layer on IOI, the massive-activation scan and the training-time clamp experiment.

Parts:
- heads: TransformerLens 4.3's `detect_head` on its TransformerBridge around the same SmolLM2 weights, against
  `pathlens.diagnostics.heads` on the same token ids (TL's own `to_tokens` of each prompt): max |difference| per
  detector, error measure and exclusion flags; time of each against the floor (one plain eager forward returning
  attentions, scored by hand). Prompts: the shipped held-out sentences, each written twice (so duplicate and
  induction heads have something to find).
- top-heads: the top-5 heads of each detector on SmolLM2 and induction-2l (repeated random tokens).
- lens: logit lens and commitment layers of 16 IOI prompts on SmolLM2; lens time against the floor (one forward
  with all hidden states, final norm and unembedding by hand).
- massive / clamp / lib: see their functions.

Run `python benchmarks/diagnostics.py --json` for one JSON line per row. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/diagnostics.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import copy
import itertools
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import (
    Emitter,
    add_device_argument,
    check_parts,
    check_repeats_and_threads,
    ratio,
    round_robin,
    set_threads,
    tl_bridge,
)
from pathlens import Model, load
from pathlens.diagnostics import heads
from pathlens.diagnostics.commitment import commitment
from pathlens.diagnostics.lens import logit_lens
from pathlens.diagnostics.lib import lib, second_copy_loss
from pathlens.diagnostics.massive import intervention_test, scan
from pathlens.diagnostics.training import Training, plot_runs, previous_token_pattern, train, uniform_pattern
from pathlens.features.corpus import windows
from pathlens.interventions import Ablate, Intervention, Replace
from pathlens.tasks import ioi
from pathlens.zoo.train_induction import TrainSettings, build_model, learning_rate, make_batch, repeated_sequences

PARTS = ("heads", "top-heads", "lens", "massive", "clamp", "lib")
TL_NAMES = {name: f"{name}_head" for name in ("previous_token", "duplicate_token", "induction")}
DETECTORS = {
    "previous_token": heads.previous_token,
    "duplicate_token": heads.duplicate_token,
    "induction": heads.induction,
}
BUILDERS = {
    "previous_token": heads.previous_token_pattern,
    "duplicate_token": heads.duplicate_token_pattern,
    "induction": heads.induction_pattern,
}


def heldout_sentences() -> list[str]:
    text = files("pathlens.steering.data").joinpath("heldout.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _padded(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    length = max(int(r.numel()) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return ids, mask


def _floor_scores(eager: Any, rows: list[Tensor], name: str) -> Tensor:
    """The floor: each prompt in one eager forward returning attentions, scored with TL's formula ("mul")."""
    out = []
    with torch.no_grad():
        for r in rows:
            attentions = eager(r[None], output_attentions=True).attentions  # L x (1, H, q, k)
            a = torch.stack(attentions)[:, 0]  # (L, H, q, k)
            d = BUILDERS[name](r[None])[0]  # (q, k)
            out.append((a * d).sum((-1, -2)) / a.sum((-1, -2)))
    return torch.stack(out).mean(0)


def heads_rows(model: Model, repeats: int, emit: Emitter) -> None:
    """Parity: TL's `detect_head` (one cached run per prompt, reused for every setting, as TL allows for a single
    prompt) against `heads.similarity` on pathlens' patterns of the same ids, for every detector x measure x
    exclusion; then the public detectors end to end, timed against TL and the floor."""
    from transformer_lens.head_detector import detect_head

    bridge = tl_bridge(model.hf)
    bridge.tokenizer = model.tokenizer  # a bridge built from a module has none; TL tokenizes with the same one
    texts = [f"{s} {s}" for s in heldout_sentences()[:8]]
    rows = [bridge.to_tokens(t)[0].cpu() for t in texts]
    ids, mask = _padded(rows)
    lengths = [int(r.numel()) for r in rows]
    with torch.no_grad():
        caches = [bridge.run_with_cache(r[None], remove_batch_dim=True)[1] for r in rows]
    patterns = heads.attention_patterns(model, ids, mask)
    for name, measure, (bos, current) in itertools.product(
        TL_NAMES, ("mul", "abs"), itertools.product([False, True], repeat=2)
    ):
        flags = {"exclude_bos": bos, "exclude_current_token": current, "error_measure": measure}
        theirs = torch.stack(
            [detect_head(bridge, t, TL_NAMES[name], cache=c, **flags) for t, c in zip(texts, caches, strict=True)]
        ).mean(0)
        detection = BUILDERS[name](ids)
        ours = torch.stack([heads.similarity(a, detection, lengths, **flags).mean(0) for a in patterns])  # type: ignore[arg-type]
        diff = float((ours - theirs.double()).abs().max())
        emit(
            {
                "part": "heads-parity",
                "detector": name,
                "error_measure": measure,
                "exclude_bos": bos,
                "exclude_current_token": current,
                "max_abs_diff": diff,
                "met": diff <= 1e-5,
                "prompts": len(texts),
            }
        )
    eager = copy.deepcopy(model.hf)
    eager.set_attn_implementation("eager")
    for name in TL_NAMES:
        timed = round_robin(
            {
                "pathlens": lambda name=name: DETECTORS[name](model, ids, attention_mask=mask).values,
                "transformer_lens": lambda name=name: detect_head(bridge, texts, TL_NAMES[name]),
                "floor": lambda name=name: _floor_scores(eager, rows, name),
            },
            repeats,
        )
        floor = timed["floor"].median
        ours, theirs = timed["pathlens"].result, timed["transformer_lens"].result
        emit(
            {
                "part": "heads-time",
                "detector": name,
                "end_to_end_max_abs_diff_vs_tl": float((ours.double() - theirs.double()).abs().max()),
                "seconds_pathlens": timed["pathlens"].median,
                "seconds_transformer_lens": timed["transformer_lens"].median,
                "seconds_floor": floor,
                "ratio_pathlens_floor": ratio(timed["pathlens"].median, floor),
                "ratio_tl_floor": ratio(timed["transformer_lens"].median, floor),
                "floor_max_abs_diff": float((timed["floor"].result - ours).abs().max()),
            }
        )


def top_heads_rows(emit: Emitter) -> None:
    for name in ("smollm2", "induction-2l"):
        model = load(name)
        ids = heads.repeated_tokens(model, n=8)
        results = {key: fn(model, ids) for key, fn in DETECTORS.items()}
        results["prefix_matching"] = heads.prefix_matching(model, ids)
        for key, scores in results.items():
            top = scores.top(5, by="value").to_dict("records")
            emit(
                {
                    "part": "top-heads",
                    "model": name,
                    "detector": key,
                    "top5": [f"L{r['layer']}.H{r['head']}={r['value']:.3f}" for r in top],
                }
            )


def _floor_lens(model: Model, ids: Tensor, mask: Tensor, k: int) -> Tensor:
    """The floor: one forward with every hidden state; final norm and unembedding by hand, top-k per layer."""
    ids, mask = ids.to(model.device), mask.to(model.device)
    norm = model.hf.get_submodule(model.arch.final_norm or "")
    unembed = model.hf.get_submodule(model.arch.unembed)
    with torch.no_grad():
        hidden = model.hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        # the last entry is already normed by the model; the lens of the last layer reads the block output
        tops = [unembed(norm(h)).float().log_softmax(-1).topk(k, -1).indices for h in hidden[:-1]]
    return torch.stack(tops, 1).cpu()


def lens_rows(model: Model, repeats: int, out: Path, emit: Emitter) -> None:
    task = ioi(model.tokenizer, n=16, seed=0)
    ids, mask = task.clean_ids, task.attention_mask
    timed = round_robin(
        {
            "pathlens": lambda: logit_lens(model, ids, targets=task.answer_ids, k=5, attention_mask=mask),
            "floor": lambda: _floor_lens(model, ids, mask, 5),
        },
        repeats,
    )
    lens = timed["pathlens"].result
    same = torch.equal(lens.top_id.values[:, :-1].long(), timed["floor"].result)
    emit(
        {
            "part": "lens-time",
            "prompts": task.n,
            "seconds_pathlens": timed["pathlens"].median,
            "seconds_floor": timed["floor"].median,
            "ratio": ratio(timed["pathlens"].median, timed["floor"].median),
            "top5_identical_to_floor": same,
        }
    )
    found = commitment(model, task)
    out.mkdir(parents=True, exist_ok=True)
    found.save(out / "commitment")
    found.plot(out / "commitment.png")
    lens.plot(out / "lens_ioi0.png", prompt=0)
    top1 = (found.answer_rank.values == 1).float().mean(0)
    for row in found.summary().to_dict("records"):
        emit({"part": "commitment", **row})
    emit(
        {
            "part": "commitment-curves",
            "answer_top1_share_per_layer": [round(float(x), 3) for x in top1],
            "restored_mean_per_layer": [round(float(x), 3) for x in torch.nanmean(found.restored.values, 0)],
        }
    )


# ---- the training-time clamp experiment (induction-2l's recipe) --------------------------------------------------

CLAMPED = "L0.H1.pattern"  # the recipe's previous-token head (TrainSettings.previous_token_head = 1 in layer 0)
INDUCTION = (1, 0)  # the recipe's induction head


def clamp_conditions() -> dict[str, Callable[[int], list[Intervention]]]:
    """Each condition's interventions for sequences of length p: the recipe's solo phase (only the two circuit heads
    active: the others' outputs zeroed, as `only_heads` does) plus the previous-token head's pattern."""

    def with_pattern(pattern: Callable[[int], Tensor] | None) -> Callable[[int], list[Intervention]]:
        def interventions(p: int) -> list[Intervention]:
            solo = [Intervention("L0.H0.z", Ablate("zero")), Intervention("L1.H1.z", Ablate("zero"))]
            return solo + ([Intervention(CLAMPED, Replace(pattern(p)))] if pattern is not None else [])

        return interventions

    return {
        "normal": with_pattern(None),
        "prev-token pattern uniform": with_pattern(uniform_pattern),
        "prev-token pattern zero": with_pattern(lambda p: torch.zeros(1, p, p)),
        "prev-token pattern clamped perfect": with_pattern(previous_token_pattern),
    }


def _clamp_eval(eval_ids: Tensor, interventions: list[Intervention]) -> Callable[[Model, int], dict[str, float]]:
    """Checkpoint measures on [BOS, r, r]: the induction head's induction score, the previous-token head's
    previous-token score, and loss / accuracy on the second copy (r_2..r_T), all under the condition's interventions."""
    t_len = (eval_ids.shape[1] - 1) // 2
    second = torch.arange(t_len + 1, 2 * t_len)  # positions predicting r_2..r_T

    def evaluate(model: Model, step: int) -> dict[str, float]:
        run = model.run(eval_ids, cache=["L0.pattern", "L1.pattern"], interventions=interventions, cache_device="cpu")
        lengths = [int(eval_ids.shape[1])] * int(eval_ids.shape[0])
        induction = heads.similarity(run.cache["L1.pattern"], heads.induction_pattern(eval_ids), lengths).mean(0)
        previous = heads.similarity(run.cache["L0.pattern"], heads.previous_token_pattern(eval_ids), lengths).mean(0)
        logits = run.logits[:, second].double().cpu()  # (n, T-1, V)
        target = eval_ids[:, second + 1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        return {
            "induction_score": float(induction[INDUCTION[1]]),
            "prev_token_score": float(previous[1]),
            "eval_loss": float(loss),
            "eval_accuracy": float((logits.argmax(-1) == target).double().mean()),
        }

    return evaluate


def clamp_rows(steps: int, every: int, out: Path, emit: Emitter, device: torch.device) -> None:
    """Train induction-2l's recipe (solo phase: the two circuit heads) from the same seed under each condition."""
    settings = TrainSettings(steps=steps, solo_steps=steps)
    eval_ids = repeated_sequences(256, settings.eval_repeat, settings.num_tokens, torch.Generator().manual_seed(2))
    runs: dict[str, Training] = {}
    for name, interventions in clamp_conditions().items():
        torch.manual_seed(settings.seed)
        model = Model(build_model(settings).to(device), name=f"induction-2l recipe ({name})")
        decay = [p for p in model.hf.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.hf.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
            betas=(0.9, 0.98),
        )
        data = torch.Generator().manual_seed(settings.seed + 1)
        start = time.perf_counter()
        runs[name] = train(
            model,
            lambda step, data=data: make_batch(settings, data),
            optimizer,
            steps,
            interventions=interventions(settings.seq_len),
            learning_rate=lambda step: learning_rate(step, settings),
            evaluate=_clamp_eval(eval_ids, interventions(int(eval_ids.shape[1]))),
            every=every,
        )
        runs[name].save(out / "clamp" / name.replace(" ", "_"))
        seconds = time.perf_counter() - start
        checkpoints = runs[name].checkpoints
        frame = checkpoints.to_frame().pivot(index="checkpoint", columns="measure", values="value")
        formed = frame.index[(frame["eval_accuracy"] > 0.5).to_numpy()]
        emit(
            {
                "part": "clamp",
                "condition": name,
                "steps": steps,
                "seconds": round(seconds, 1),
                "first_loss": float(runs[name].loss.values[:20].mean()),
                "final_loss": float(runs[name].loss.values[-100:].mean()),
                "induction_formed_at": int(formed[0]) if len(formed) else None,
                "checkpoints": [int(c) for c in frame.index],
                "loss_curve_every_100": [round(float(x), 3) for x in runs[name].loss.values[::100]],
                **{f"{m}_per_checkpoint": [round(float(x), 3) for x in frame[m]] for m in frame.columns},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, "induction_score", out / "clamp_induction_score.png", "induction-2l recipe: induction head L1.H0")
    plot_runs(runs, "eval_loss", out / "clamp_eval_loss.png", "induction-2l recipe: loss on repeated tokens")
    normal = runs["normal"].loss.values
    level = float((normal[:20].mean() + normal[-100:].mean()) / 2)
    for name, run in runs.items():
        emit(
            {
                "part": "clamp-verdict",
                "condition": name,
                "phase_change_level": level,
                "final_loss": float(run.loss.values[-100:].mean()),
                "above_phase_change_level": bool(float(run.loss.values[-100:].mean()) > level),
            }
        )


def massive_rows(model: Model, tokens: int, out: Path, emit: Emitter) -> None:
    """The massive-activation scan of SmolLM2 over `tokens` tokens of the offline default corpus (128-token windows),
    and the paper's intervention test at the first layer with hits."""
    wins = windows(None, model.tokenizer, context=128, n_tokens=tokens, seed=0)
    start = time.perf_counter()
    found = scan(model, wins)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    found.save(out / "massive")
    found.plot(out / "massive_smollm2.png")
    for row in found.summary().to_dict("records"):
        emit(
            {
                "part": "massive",
                "windows": len(wins),
                "tokens": wins.n_tokens,
                "seconds": round(seconds, 1),
                **{k: ({str(a): int(b) for a, b in v.items()} if isinstance(v, dict) else v) for k, v in row.items()},
            }
        )
    stats = found.layer_stats
    emit(
        {
            "part": "massive-layer-stats",
            "top1": [round(float(x), 1) for x in stats.sel(stat="top1").values],
            "median": [round(float(x), 3) for x in stats.sel(stat="median").values],
        }
    )
    if found.first_layer() is not None:
        for row in intervention_test(model, found, wins).to_dict("records"):
            emit({"part": "massive-intervention", **row})


def lib_rows(out: Path, emit: Emitter, device: torch.device) -> None:
    """LIB vs PCA on induction-2l: 16 repeated random-token sequences, loss = the second copy's cross-entropy."""
    model = load("induction-2l", device=device)
    ids = heads.repeated_tokens(model, n=16, length=20)
    start = time.perf_counter()
    result = lib(model, ids, loss=second_copy_loss)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    result.plot(out / "lib_induction2l.png")
    for row in result.table().to_dict("records"):
        emit({"part": "lib", "model": "induction-2l", "seconds": round(seconds, 1), **row})
    frame = result.ablation.to_frame()
    for (kind, site), group in frame.groupby(["basis", "site"]):
        emit(
            {
                "part": "lib-curve",
                "basis": kind,
                "site": site,
                "base_loss": result.ablation.meta["base_loss"],
                "ablated": group["ablated"].tolist(),
                "loss_increase": [round(v, 4) for v in group["value"]],
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--out", default="benchmarks/out/diagnostics", help="where PNGs and results go")
    parser.add_argument("--massive-tokens", type=int, default=10_240, help="tokens the massive-activation scan reads")
    parser.add_argument("--clamp-steps", type=int, default=1500, help="training steps per clamp condition")
    parser.add_argument("--clamp-every", type=int, default=100, help="checkpoint interval of the clamp runs")
    add_device_argument(parser)
    args = parser.parse_args()
    check_repeats_and_threads(parser, args)
    check_parts(parser, args, PARTS)
    set_threads(args.threads)
    emit = Emitter(json=args.json, extra={"threads": torch.get_num_threads()})
    out = Path(args.out)
    smollm2 = load("smollm2", device=args.device) if {"heads", "lens", "massive"} & set(args.parts) else None
    if "heads" in args.parts and smollm2 is not None:
        heads_rows(smollm2, args.repeats, emit)
    if "top-heads" in args.parts:
        top_heads_rows(emit)
    if "lens" in args.parts and smollm2 is not None:
        lens_rows(smollm2, args.repeats, out, emit)
    if "massive" in args.parts and smollm2 is not None:
        massive_rows(smollm2, args.massive_tokens, out, emit)
    if "lib" in args.parts:
        lib_rows(out, emit, args.device)
    if "clamp" in args.parts:
        clamp_rows(args.clamp_steps, args.clamp_every, out, emit, args.device)
    emit.finish()


if __name__ == "__main__":
    main()
