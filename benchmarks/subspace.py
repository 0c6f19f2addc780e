"""Subspace benchmark on the embedded SmolLM2: the illusion decomposition table on IOI, and the cost of a DAS step.

Parts:
- ioi: counterfactual IOI pairs (train: half of the template pairs, names, places, objects; test: the other
  halves, every pair flipping the position label). 1-D directions at a mid-depth MLP hidden site (`--mlp-site`)
  and at the residual stream at the last position (`--resid-site`): DAS, difference in means (ABB − BAB) and the
  positional gradient; each checked by `illusion_check` on the held-out pairs. The residual site is decomposed
  against the queries of the 3 heads after it that noising patching finds most important (the paper uses the
  name movers' queries). Prints the paper-layout table per direction and whether the illusion flag is raised.
- speed: one DAS training step (batch of 20 training pairs, 1-D at the MLP site; by default the last tokens
  after a cached prefix, and also the full-forward step) against the floor, a plain forward + backward of the
  same batch in torch (cross-entropy at the last token, `loss.backward()`), timed round-robin in the same run;
  prints the ratios (target ≤ 1.3) and checks the two steps agree.
- pyvene: a DAS step at the residual stream against pyvene's (when importable; `pip install --dry-run pyvene` shows
  it would not touch torch or transformers, and `pip install --no-deps --target DIR pyvene` with PYTHONPATH=DIR
  runs it beside this venv without installing anything into it). Reports whether pyvene could be installed beside
  this torch/transformers (`pip install --dry-run pyvene`), without installing it.

Run `python benchmarks/subspace.py --json` for one JSON line per row.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/subspace.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import importlib.metadata
import importlib.util
import subprocess
import time
from typing import Any

import torch

from benchmarks.common import (
    Emitter,
    add_device_argument,
    check_parts,
    check_repeats_and_threads,
    round_robin,
    set_threads,
)
from pathlens import Model, load
from pathlens.subspace import illusion_check
from pathlens.subspace.das import DASSettings, DASTrainer
from pathlens.subspace.study import counterfactual_split, find_subspace, important_heads
from pathlens.tasks.base import Task

PARTS = ("ioi", "speed", "pyvene")


def _clean_accuracy(model: Model, task: Task) -> float:
    with torch.no_grad():
        logits = model.run(task.clean_ids, attention_mask=task.attention_mask).logits
    final = logits[torch.arange(task.n), task.answer_pos].cpu()
    return float((final.argmax(-1) == task.answer_ids).double().mean())


def ioi_tables(model: Model, args: argparse.Namespace, emit: Emitter) -> None:
    train, test = counterfactual_split(model, "ioi", args.n_train, args.n_test, args.seed)
    resid_layer = int(args.resid_site.split(".")[0][1:])
    heads = important_heads(model, test.rows(list(range(min(40, test.n)))), resid_layer, 3)
    emit({"part": "ioi", "what": "setup", "clean_accuracy_test": _clean_accuracy(model, test), "heads": heads})
    combined = ["| direction | intervention | acc | LD | FLDD % |", "|---|---|---|---|---|"]
    for site in [s for s in (args.mlp_site, args.resid_site) if s]:
        for finder in args.finders.split(","):
            start = time.perf_counter()
            kw: dict[str, Any] = {"epochs": args.epochs} if finder == "das" else {}
            sub = find_subspace(model, finder, train, site, args.seed, **kw)
            found = time.perf_counter() - start
            on_heads = heads if site == args.resid_site else None
            report = illusion_check(model, sub, test, heads=on_heads, parts=("q",))
            print(f"\n{finder} at {site} (found in {found:.0f} s; readers {report.decomposition['readers']})")
            print(report.table())
            print(f"illusion flag: {report.illusion} {report.conditions}")
            for r in report.rows[0 if not combined[2:] else 1 :]:
                acc = "—" if r["intervention"] == "clean" else f"{r['accuracy']:.3f}"
                row = f"| {finder} {site} | {r['intervention']} | {acc} | {r['logit_diff']:.3f} | {r['fldd']:.2f} |"
                combined.append(row)
            emit(
                {
                    "part": "ioi",
                    "site": site,
                    "finder": finder,
                    "seconds_to_find": found,
                    "illusion": report.illusion,
                    "conditions": report.conditions,
                    "rows": report.rows,
                    "decomposition": report.decomposition,
                    "final_loss": sub.meta.get("loss_per_epoch", [None])[-1],
                }
            )
    print("\nAll directions on the held-out pairs (the paper's layout):")
    print("\n".join(combined))


def pyvene_dry_run() -> str:
    """What `pip install --dry-run pyvene` would do to torch / transformers (nothing is installed)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "pyvene"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"dry run failed: {err}"
    would = [line for line in out.stdout.splitlines() if line.startswith("Would install")]
    text = would[0] if would else (out.stdout + out.stderr).strip().splitlines()[-1:]
    return str(text)


def speed(model: Model, args: argparse.Namespace, emit: Emitter) -> None:
    train, _ = counterfactual_split(model, "ioi", 40, 8, args.seed)
    start = time.perf_counter()
    cached = DASTrainer(model, train, args.mlp_site, DASSettings(seed=args.seed))
    setup_seconds = time.perf_counter() - start
    assert cached.runner is not None, "the cached-prefix path should apply to SmolLM2"
    full = DASTrainer(model, train, args.mlp_site, DASSettings(seed=args.seed, cached_prefix=False))
    rows = torch.arange(20)
    ids, mask = train.clean_ids[rows].to(model.device), train.attention_mask[rows].to(model.device)  # the floor's
    labels, pos = train.counterfactual_ids, train.answer_pos[rows]
    assert labels is not None
    labels = labels.to(model.device)
    loss_cached, grad_cached = cached.loss_and_grad(rows)
    loss_full, grad_full = full.loss_and_grad(rows)

    def floor() -> None:
        logits = model.hf(input_ids=ids, attention_mask=mask).logits  # (20, P, V)
        loss = torch.nn.functional.cross_entropy(logits[torch.arange(20), pos], labels[rows])
        loss.backward()
        model.hf.zero_grad(set_to_none=True)

    timed = round_robin(
        {
            "das_step": lambda: cached.loss_and_grad(rows),
            "das_step_full_forward": lambda: full.loss_and_grad(rows),
            "forward_backward": floor,
        },
        args.repeats,
    )
    step, step_full, base = (timed[k].median for k in ("das_step", "das_step_full_forward", "forward_backward"))
    verdict = pyvene_dry_run()
    emit(
        {
            "part": "speed",
            "site": args.mlp_site,
            "batch": 20,
            "seconds_das_step": step,
            "seconds_das_step_full_forward": step_full,
            "seconds_forward_backward": base,
            "seconds_prefix_cache_and_sources_once": setup_seconds,
            "ratio": step / base,
            "ratio_full_forward": step_full / base,
            "met": step / base <= 1.3,
            "loss_diff_cached_vs_full": abs(loss_cached - loss_full),
            "grad_max_diff_cached_vs_full": float((grad_cached - grad_full).abs().max()),
            "pyvene_dry_run": verdict,
        }
    )
    print(
        f"DAS step {step * 1e3:.0f} ms (full-forward step {step_full * 1e3:.0f} ms), plain forward+backward "
        f"{base * 1e3:.0f} ms: x{step / base:.2f} (x{step_full / base:.2f}; target <= 1.3)"
    )
    print(f"pyvene: {verdict}")


def versus_pyvene(model: Model, args: argparse.Namespace, emit: Emitter) -> None:
    """One 1-D DAS step at the residual stream (block output of layer `--resid-site`) at the last token, batch 20:
    pathlens (cached prefix, and full forward) against pyvene's LowRankRotatedSpaceIntervention on its own copy of
    the model (pyvene turns the model's gradients off and hooks it). Skipped when pyvene is not importable: it
    installs beside this torch/transformers with `pip install --no-deps --target DIR pyvene` and PYTHONPATH=DIR."""
    if importlib.util.find_spec("pyvene") is None:
        emit({"part": "pyvene", "skipped": "pyvene is not importable (see the part's docstring)"})
        return
    import pyvene as pv

    layer = int(args.resid_site.split(".")[0][1:])
    train, _ = counterfactual_split(model, "ioi", 40, 8, args.seed)
    rows = torch.arange(20)
    ids, mask, last = train.clean_ids[rows], train.attention_mask[rows], train.answer_pos[rows]
    ids, mask, corrupt = ids.to(model.device), mask.to(model.device), train.corrupt_ids[rows].to(model.device)
    labels = train.counterfactual_ids
    assert labels is not None
    labels = labels.to(model.device)
    site = f"L{layer}.resid_post"
    ours = DASTrainer(model, train, site, DASSettings(seed=args.seed))
    ours_full = DASTrainer(model, train, site, DASSettings(seed=args.seed, cached_prefix=False))
    theirs_model = load("smollm2", device=model.device)
    config = pv.IntervenableConfig(
        representations=[
            {
                "layer": layer,
                "component": "block_output",
                "unit": "pos",
                "max_number_of_units": 1,
                "low_rank_dimension": 1,
            }
        ],
        intervention_types=pv.LowRankRotatedSpaceIntervention,
    )
    intervenable = pv.IntervenableModel(config, theirs_model.hf)
    intervenable.set_device(model.device)  # its interventions (the model is there already)
    intervenable.disable_model_gradients()
    params = [
        p for v in intervenable.interventions.values() for p in (v[0] if isinstance(v, tuple) else v).parameters()
    ]
    opt = torch.optim.Adam(params, lr=0.01)
    unit = [[[int(p)] for p in last]]

    def pyvene_step() -> None:
        sources = [{"input_ids": corrupt, "attention_mask": mask}]
        _, out = intervenable({"input_ids": ids, "attention_mask": mask}, sources, {"sources->base": (unit, unit)})
        loss = torch.nn.functional.cross_entropy(out.logits[torch.arange(20), last], labels[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()

    timed = round_robin(
        {
            "pathlens": lambda: ours.loss_and_grad(rows),
            "pathlens_full_forward": lambda: ours_full.loss_and_grad(rows),
            "pyvene": pyvene_step,
        },
        args.repeats,
    )
    mine, mine_full, theirs = (timed[k].median for k in ("pathlens", "pathlens_full_forward", "pyvene"))
    emit(
        {
            "part": "pyvene",
            "site": site,
            "batch": 20,
            "seconds_pathlens_step": mine,
            "seconds_pathlens_full_forward_step": mine_full,
            "seconds_pyvene_step": theirs,
            "ratio_pathlens_over_pyvene": mine / theirs,
            "ratio_full_forward_over_pyvene": mine_full / theirs,
            "pyvene": importlib.metadata.version("pyvene"),
        }
    )
    print(
        f"DAS step at {site}: pathlens {mine * 1e3:.0f} ms (full forward {mine_full * 1e3:.0f} ms), pyvene "
        f"{theirs * 1e3:.0f} ms: x{mine / theirs:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON line per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one repeat, 3 DAS epochs")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--mlp-site", default="L15.mlp_post")
    parser.add_argument("--resid-site", default="L15.resid_post")
    parser.add_argument("--finders", default="das,mean-diff,gradient")
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    args = parser.parse_args()
    check_repeats_and_threads(parser, args)
    check_parts(parser, args, PARTS)
    if args.quick:
        args.epochs = 3
    set_threads(args.threads)
    emit = Emitter(args.json, {"threads": torch.get_num_threads()})
    model = load("smollm2", device=args.device)
    if "speed" in args.parts:
        speed(model, args, emit)
    if "pyvene" in args.parts:
        versus_pyvene(model, args, emit)
    if "ioi" in args.parts:
        ioi_tables(model, args, emit)


if __name__ == "__main__":
    main()
