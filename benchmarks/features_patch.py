"""Latent patching benchmark on the embedded SmolLM2: a sparse autoencoder spliced at `L{layer}.resid_post`, its
`--latents` most task-relevant latents patched one by one (noising: clean run, each latent's corrupted value
written) on an IOI task of `--n` prompts (BABA templates), positions all.

Workload `latent-patch`, three ways on the same latents, interleaved round by round (`round_robin`):

- pathlens, `patch(..., cone=True)`: the variants enter at layer + 1 from the base run's stream rebuilt by the
  splice (`pathlens.patching.cone`), reusing the base run's keys/values before the first position where the
  clean and corrupted prompts differ;
- pathlens, `patch(..., cone=False)`: every variant through the whole model (what latent sites cost before);
- the floor, by hand in plain torch: one cached base run (the model's own key/value cache and hidden states),
  each variant's stream at layer + 1 written as resid_post + (f_src,i − f_i)·W_dec,i / s_out (the cheapest exact
  form of a one-latent patch), the blocks after the layer called directly on K variants at once with the cached
  prefix, the final norm and unembedding only at the answer positions.

Reported: `seconds` (pathlens with the cone), `floor_seconds`, `ratio_vs_floor`, `full_seconds`,
`speedup_vs_full` and `identical` (pathlens' cone, full path and the floor agree per cell within `--tolerance`;
`max_abs_diff` is the largest difference from pathlens' full path). The SAE is a TopK SAE (width 8 × d_model,
k 32) whose scales and b_dec are fitted to the site's activations on `--fit-windows` windows of the default corpus
(its directions random: the speed does not depend on what a latent means), or a trained one given with
`--dictionary PATH` (`Dictionary.save` files, e.g. from benchmarks/features_cards.py).

Run `python benchmarks/features_patch.py --json` (one JSON line per row).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/features_patch.py`: import the package from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

import pathlens
from benchmarks.common import (
    add_device_argument,
    check_repeats_and_threads,
    emit_rows,
    max_abs_diff,
    round_robin,
    set_threads,
    task_on,
)
from pathlens.features.corpus import windows
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.train import Trainer
from pathlens.model import Model
from pathlens.tasks import Task, ioi


def fitted_sae(model: Model, site: str, n_windows: int) -> Dictionary:
    """A TopK SAE (width 8 × d, k 32) with its input scale and b_dec fitted to `site` on `n_windows` windows."""
    wins = windows(None, model.tokenizer, context=128, n_tokens=128 * n_windows, seed=0)
    x = model.run(wins.ids.to(model.device), cache=[site]).cache[site][:, 1:].reshape(-1, model.arch.d_model)
    d = model.arch.d_model
    sae = Dictionary(DictionaryConfig("topk", d, 8 * d, k=32, meta={"site": site}), seed=0)
    Trainer(sae, site).fit_scales(x.float().cpu(), x.float().cpu())
    return sae.to(model.device)


def relevant_latents(model: Model, sae: Dictionary, site: str, task: Task, count: int) -> list[int]:
    """The `count` latents whose clean and corrupted values differ most on the task (summed |Δf|)."""
    mask = task.attention_mask
    x_clean = model.run(task.clean_ids, attention_mask=mask, cache=[site]).cache[site]
    x_corrupt = model.run(task.corrupt_ids, attention_mask=mask, cache=[site]).cache[site]
    with torch.no_grad():
        delta = (sae.encode(x_clean) - sae.encode(x_corrupt)).abs().sum(dim=(0, 1))  # (width,)
    return sorted(int(i) for i in torch.topk(delta, count).indices)


class HandCone:
    """The floor: a cached base run, each variant's stream after the layer written by hand, the later blocks
    called directly on K variants with the cached key/value prefix (positions before the first that differs)."""

    def __init__(self, model: Model, sae: Dictionary, task: Task, layer: int, latents: list[int], k: int):
        hf, self.task, self.layer, self.k = model.hf, task, layer, k
        self.blocks, self.norm, self.head = hf.model.layers, hf.model.norm, hf.lm_head
        self.rotary = hf.model.rotary_emb
        mask = task.attention_mask
        with torch.no_grad():
            base = hf(task.clean_ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
            source = hf(task.corrupt_ids, attention_mask=mask, output_hidden_states=True)
            differs = (task.clean_ids != task.corrupt_ids).any(dim=0).nonzero()
            self.p = p = int(differs[0]) if differs.numel() else task.seq_len
            x = base.hidden_states[layer + 1][:, p:]  # (N, P', d): resid_post[layer] = the next block's input
            f_base = sae.encode(x)[..., latents]  # (N, P', K_all)
            f_src = sae.encode(source.hidden_states[layer + 1][:, p:])[..., latents]  # (N, P', K_all)
        self.x, self.delta = x, f_src - f_base  # (N, P', K_all)
        self.directions = (sae.W_dec[latents] / sae.s_out).detach()  # (K_all, d)
        self.kv = [(layer_kv.keys[:, :, :p], layer_kv.values[:, :, :p]) for layer_kv in base.cache.layers]
        n, length = task.clean_ids.shape
        q = torch.arange(p, length)[:, None]  # absolute query positions
        allowed = (torch.arange(length)[None, :] <= q)[None] & mask.bool()[:, None, :]  # (N, P', P)
        self.mask = allowed[:, None]  # (N, 1, P', P)
        self.positions = torch.arange(p, length)[None]  # (1, P')
        self.answer = task.answer_pos - p  # (N,)

    def run(self) -> Tensor:
        """Per-latent batch-mean logit difference (K_all,)."""
        out = []
        n = self.task.n
        with torch.no_grad():
            for first in range(0, self.delta.shape[-1], self.k):
                delta = self.delta[..., first : first + self.k]  # (N, P', K)
                k = int(delta.shape[-1])
                hidden = (
                    self.x[None] + delta.permute(2, 0, 1)[..., None] * self.directions[first : first + k, None, None]
                )
                hidden = hidden.reshape(k * n, *self.x.shape[1:])  # (K·N, P', d)
                cache = DynamicCache(
                    ddp_cache_data=[
                        (None, None) if i <= self.layer else (keys.repeat(k, 1, 1, 1), values.repeat(k, 1, 1, 1))
                        for i, (keys, values) in enumerate(self.kv)
                    ]
                )
                rope = self.rotary(hidden, self.positions)
                mask = self.mask.repeat(k, 1, 1, 1)  # (K·N, 1, P', P)
                for block in self.blocks[self.layer + 1 :]:
                    hidden = block(
                        hidden,
                        attention_mask=mask,
                        position_ids=self.positions,
                        cache=cache,
                        use_cache=True,
                        position_embeddings=rope,
                    )
                picked = hidden[torch.arange(k * n), self.answer.repeat(k)]  # (K·N, d)
                logits = self.head(self.norm(picked))  # (K·N, V)
                rows = torch.arange(k * n)
                answers, wrong = self.task.answer_ids.repeat(k), self.task.wrong_ids.repeat(k)
                diff = logits[rows, answers] - logits[rows, wrong]  # (K·N,)
                out.append(diff.reshape(k, n).mean(dim=1))
        return torch.cat(out)


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The benchmark's row (one: `latent-patch`)."""
    model = pathlens.load("smollm2", device=args.device)
    site = f"L{args.layer}.resid_post"
    task = task_on(ioi(model.tokenizer, n=args.n, seed=0, templates="BABA"), args.device)
    sae = Dictionary.load(args.dictionary).to(args.device) if args.dictionary else fitted_sae(model, site, 16)
    latents = relevant_latents(model, sae, site, task, args.latents)
    budget = args.max_batch_tokens
    with model.splice(sae, site, name="sae"):
        sites = [f"L{args.layer}.sae.F{i}" for i in latents]

        def sweep(cone: bool) -> Tensor:
            kw: dict[str, Any] = {"cone": cone, "max_batch_tokens": budget, "progress": False}
            return pathlens.patch(model, task, sites=sites, **kw).values

        floor = HandCone(model, sae, task, args.layer, latents, max(1, budget // (task.n * task.seq_len)))
        timed = round_robin(
            {"cone": lambda: sweep(True), "full": lambda: sweep(False), "floor": floor.run},
            args.repeats,
        )
    cone, full, hand = (timed[name].result for name in ("cone", "full", "floor"))
    diff = max(max_abs_diff(cone, full), max_abs_diff(hand.to(full.dtype), full))
    seconds, floor_s, full_s = (timed[name].median for name in ("cone", "floor", "full"))
    yield {
        "workload": "latent-patch",
        "site": site,
        "width": sae.width,
        "latents": len(latents),
        "n": task.n,
        "seq_len": task.seq_len,
        "positions": "all",
        "shared_prefix": floor.p,
        "seconds": round(seconds, 3),
        "floor_seconds": round(floor_s, 3),
        "full_seconds": round(full_s, 3),
        "ratio_vs_floor": round(seconds / floor_s, 3),
        "speedup_vs_full": round(full_s / seconds, 3),
        "identical": diff <= args.tolerance,
        "max_abs_diff": diff,
        "repeats": args.repeats,
        "dictionary": args.dictionary or "fitted topk (random directions)",
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This benchmark's arguments (`argv`, or the command line), checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs all three)")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--latents", type=int, default=256, help="latents patched (the most task-relevant)")
    parser.add_argument("--n", type=int, default=8, help="IOI prompts")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="tokens per patched forward")
    parser.add_argument("--dictionary", default=None, help="a saved SAE of the site (default: a fitted TopK one)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |difference| counted as identical")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    check_repeats_and_threads(parser, args)
    return args


def main() -> None:
    args = parse()
    set_threads(args.threads)
    emit_rows(rows(args), args.json)


if __name__ == "__main__":
    main()
