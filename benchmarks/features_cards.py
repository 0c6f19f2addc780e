"""Evaluation cards of the SmolLM2 dictionaries: ReLU + L1, TopK, BatchTopK and JumpReLU sparse autoencoders at
`L{layer}.resid_post` and a TopK transcoder from `L{layer}.mlp_in` to `L{layer}.mlp_out`, each trained on the same
`--tokens` tokens (one stream of shuffled batches from an activation store feeds all five: `store_batches`),
then evaluated on the store's held-out windows (`pathlens.features.evaluate`: L0, FVE, CE loss recovered, KL,
dead and dense fractions).

The store must hold the three sites (`pathlens store --model smollm2 --sites
L6.resid_post,L6.mlp_in,L6.mlp_out --tokens 300k --out DIR`); its last `--heldout` windows are never trained on.
Settings are those of `pathlens features sae|transcoder` (width 8 × d_model, k 32, λ_L1 = λ_L0 = 1, Adam lr
1e-3, dead after 200 steps, dead ReLU latents resampled every 200 steps), except that training stops after
`--tokens` (default 131072) and batches hold 256 tokens (on a CPU budget more, smaller steps reach a given FVE
with fewer tokens: a JumpReLU SAE, λ 1, had held-out FVE 0.79 / 0.82 / 0.84 at L0 21 / 18 / 16 after 51k / 77k /
102k tokens in batches of 256; after 102k tokens in batches of 1024 its training MSE was 2.2× higher).

One JSON row per dictionary (`workload` = its kind, `l0`, `fve`, `ce_recovered`, `kl`, `dead`, `dense`, `tokens`,
`seconds` of training), and one row `latents` with the top contexts (text, the peak token in [[ ]]) of five latents
of `--show` (spread over the firing-frequency ranking: `pick_latents`). With `--out DIR` the dictionaries,
cards and contexts are written there too.

Run `python benchmarks/features_cards.py --store DIR --json`.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/features_cards.py`: import the package from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pathlens
from benchmarks.common import add_device_argument, check_device, emit_rows, set_threads
from pathlens.features.contexts import pick_latents, top_contexts
from pathlens.features.evaluate import evaluate
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.store import ActivationStore
from pathlens.features.train import TrainConfig, Trainer, store_batches

SAE_KINDS = ("relu", "topk", "batchtopk", "jumprelu")


def trainers(args: argparse.Namespace, widths: dict[str, int]) -> dict[str, Trainer]:
    """One trainer per dictionary: the four SAE kinds at resid_post and the TopK transcoder, by workload name."""
    post, mlp_in, mlp_out = (f"L{args.layer}.{s}" for s in ("resid_post", "mlp_in", "mlp_out"))
    train_config = TrainConfig(lr=args.lr, dead_steps=args.dead_steps, resample_every=args.dead_steps)
    made: dict[str, Trainer] = {}
    for kind in args.kinds:
        meta = {"model": "smollm2", "site": post, "kind": kind, "seed": args.seed}
        config = DictionaryConfig(
            kind, widths[post], args.expansion * widths[post], k=args.k, l1=args.l1, l0=args.l0, meta=meta
        )
        made[kind] = Trainer(Dictionary(config, seed=args.seed), post, None, train_config, seed=args.seed)
    if args.transcoder:
        meta = {"model": "smollm2", "site": mlp_in, "target": mlp_out, "kind": "topk", "seed": args.seed}
        config = DictionaryConfig(
            "topk", widths[mlp_in], args.expansion * widths[mlp_in], d_out=widths[mlp_out], k=args.k, meta=meta
        )
        made["transcoder-topk"] = Trainer(Dictionary(config, seed=args.seed), mlp_in, mlp_out, train_config, args.seed)
    return made


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One row per dictionary, then the `latents` row."""
    store = ActivationStore(args.store)
    model = pathlens.load("smollm2", device=args.device)
    sites = [f"L{args.layer}.{s}" for s in ("resid_post", "mlp_in", "mlp_out")]
    store.check(model=model, sites=sites)
    made = trainers(args, store.widths)
    train_windows = int(store.manifest["n_windows"]) - args.heldout
    seconds = dict.fromkeys(made, 0.0)
    seen = 0
    for batch in store_batches(store, sites, args.batch, args.seed, epochs=100, windows=train_windows):
        for name, trainer in made.items():
            x = batch[trainer.source].to(args.device)
            y = None if trainer.target is None else batch[trainer.target].to(args.device)
            start = time.perf_counter()
            trainer.step(x, y)
            seconds[name] += time.perf_counter() - start
        seen += args.batch
        if seen >= args.tokens:
            break
    heldout = store.window_ids()[train_windows:]
    out = Path(args.out) if args.out else None
    cards = {}
    for name, trainer in made.items():
        d = trainer.dictionary
        d.config.meta.update({"tokens_trained": trainer.tokens, "steps": trainer.steps})
        card = evaluate(model, d, heldout, name=name)
        cards[name] = card
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            d.save(out / name)
            (out / f"{name}.card.json").write_text(json.dumps(card.as_dict(), indent=2) + "\n")
        yield {
            "workload": name,
            "site": card.site,
            "target": card.target,
            "width": d.width,
            "l0": round(card.l0, 2),
            "fve": round(card.fve, 4),
            "ce_recovered": round(card.ce_recovered, 4),
            "kl": round(card.kl, 4),
            "dead": round(card.dead_fraction, 4),
            "dense": round(card.dense_fraction, 4),
            "tokens": trainer.tokens,
            "heldout_tokens": card.tokens,
            "seconds": round(seconds[name], 1),
            "tokens_per_s": round(trainer.tokens / seconds[name], 1),
        }
    shown = args.show if args.show in made else next(iter(made))
    latents = pick_latents(cards[shown].frequencies, args.latents_shown)
    contexts = top_contexts(model, made[shown].dictionary, heldout, latents, top=args.contexts)
    texts = {str(i): [str(c) for c in found] for i, found in contexts.items()}
    if out is not None:
        (out / f"{shown}.contexts.json").write_text(json.dumps(texts, indent=2, ensure_ascii=False) + "\n")
    yield {"workload": "latents", "dictionary": shown, "contexts": texts}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This benchmark's arguments (`argv`, or the command line), checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--store", required=True, help="an activation store of smollm2 holding the three sites")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=131072, help="training tokens of every dictionary")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=32, help="store windows held out for the cards")
    parser.add_argument("--kinds", default=",".join(SAE_KINDS), help="SAE kinds at resid_post (comma list)")
    parser.add_argument("--no-transcoder", dest="transcoder", action="store_false", help="skip the transcoder")
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--l1", type=float, default=1.0)
    parser.add_argument("--l0", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dead-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", default="jumprelu", help="the dictionary whose latents' contexts are shown")
    parser.add_argument("--latents-shown", type=int, default=5)
    parser.add_argument("--contexts", type=int, default=3, help="top contexts per latent shown")
    parser.add_argument("--out", default=None, help="folder for the dictionaries, cards and contexts")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in SAE_KINDS]
    if bad:
        parser.error(f"--kinds: unknown {bad}; use a comma list of {', '.join(SAE_KINDS)}")
    if args.threads < 0 or args.tokens < args.batch or args.heldout < 1:
        parser.error("--threads >= 0, --tokens >= --batch and --heldout >= 1")
    check_device(parser, args)
    return args


def main() -> None:
    args = parse()
    set_threads(args.threads or None)
    emit_rows(rows(args), args.json)


if __name__ == "__main__":
    main()
