"""SAE training benchmark on the embedded SmolLM2: a TopK SAE (width 8 × d_model) on one layer's residual stream.

Workload `sae-topk`: activations of `L{layer}.resid_post` over windows of the offline default corpus (the first
position of each window left out: SmolLM2's attention sink, whose norm is ~7× every other token's) are collected
once, then trained on for `--epochs` epochs by

- pathlens: `Dictionary(topk)` + `Trainer` (`pathlens.features.train`), and
- the floor: the fastest TopK SAE loop written by hand here in plain torch (same width, k, batch, learning rate,
  Adam, initialisation rule, unit-norm decoder, input scaling and b_dec start; no AuxK, no dead-latent bookkeeping,
  no autograd: the gradients written out, touching only the k active latents per token, as pathlens' sparse path
  does, and fused Adam),

interleaved epoch by epoch on the same shuffled batches for the first `--floor-epochs` epochs (its rate is taken
over those), so a busy machine's load falls on both alike. Reported:
training tokens/s of each and their ratio, and pathlens' dictionary's FVE and L0 on held-out windows' activations
and its CE loss recovered when spliced into the model (`pathlens.features.evaluate`). `saelens_ratio` is null
unless a SAELens virtualenv is given with `--saelens-python` (SAELens pins transformer-lens 3.x, so it cannot
share this environment: `python3 -m venv /work/saelens-venv`, pip install the CPU torch 2.13.0 wheel, then
`pip install sae-lens`); SAELens' TopK SAE (`benchmarks/saelens_topk.py`) then trains on 8 batches of the same
saved activations in a subprocess with as many torch threads as this run, alternated with pathlens on the same 8
batches (`--saelens-batches`), and the ratio compares the medians of those alternated runs. SAELens runs its
defaults for a TopK SAE otherwise (it rescales latents by decoder norms instead of renormalising the rows, and
clips the gradient norm at 1: part of what its trainer does per step), with the same AuxK (k_aux = d_in // 2,
coefficient 1) and dead window (`--dead-steps`).

Run `python benchmarks/features_sae.py --json` (one JSON line per row); `--store DIR` reuses an activation store
(`pathlens store` / `pathlens.features.collect`) holding the site instead of collecting; it must hold the first
`--windows` of `windows(default corpus, context=128, n_tokens=128 × (windows + heldout), seed=0)` (the cut the
held-out windows come from, so they stay disjoint from the training rows).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/features_sae.py`: import the package from the repo root
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import json
import math
import statistics
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.nn import functional as F

from benchmarks.common import add_device_argument, check_device, emit_rows, set_threads
from pathlens import Model, load
from pathlens.features.corpus import windows
from pathlens.features.evaluate import evaluate
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.store import ActivationStore, stream
from pathlens.features.train import TrainConfig, Trainer, tensor_batches


def csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix of entries grouped by row (`crow`: where each row's entries start)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class FloorSAE:
    """The floor: TopK SAE training by hand in plain torch, the fewest operations the method needs: z in full (top-k
    needs it), then the k kept latents only: decode = weighted sum of k decoder rows (an embedding bag); gradients
    written out (∂ŷ = 2(ŷ − x)/n; ∂v = ⟨∂ŷ, W_dec[j]⟩ where v > 0; ∂W_dec, ∂W_enc scatter-adds of k rows per token;
    ∂b_enc their sums; ∂b_dec = Σ∂ŷ − W_enc ∂b_enc), the parallel part of ∂W_dec removed, fused Adam."""

    def __init__(self, d: int, width: int, k: int, lr: float, x: Tensor, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(width, d, generator=gen).to(x.device)  # drawn on the CPU: the same start on any device
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.scale = math.sqrt(d / float(x.pow(2).sum(-1).mean()))
        self.w_enc = w_dec.T.contiguous()  # the fused Adam step needs each gradient laid out like its parameter
        self.w_dec = w_dec
        self.b_enc = torch.zeros(width, device=x.device)
        self.b_dec = (x * self.scale).mean(0)
        self.k = k
        self.opt = torch.optim.Adam([self.w_enc, self.w_dec, self.b_enc, self.b_dec], lr=lr, fused=True)

    def encode(self, x: Tensor) -> Tensor:
        z = (x * self.scale - self.b_dec) @ self.w_enc + self.b_enc  # (n, width)
        values, indices = torch.topk(z, self.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, indices, torch.relu(values))

    def step(self, x: Tensor) -> None:
        n, k, width = int(x.shape[0]), self.k, int(self.w_dec.shape[0])
        xs = x * self.scale  # (n, d)
        xc = xs - self.b_dec  # (n, d)
        z = torch.addmm(self.b_enc, xc, self.w_enc)  # (n, width)
        idx = torch.topk(z, k, dim=-1).indices.sort(dim=-1).values  # (n, k)
        v = z.gather(1, idx).relu_()  # (n, k)
        grad_out = (F.embedding_bag(idx, self.w_dec, per_sample_weights=v, mode="sum") + self.b_dec - xs) * (2 / n)
        by_token = torch.arange(0, n * k + 1, k, device=x.device)  # each token's k entries, in order
        pattern = csr(by_token, idx.reshape(-1), torch.zeros(n * k, device=x.device), (n, width))
        grad_v = torch.sparse.sampled_addmm(pattern, grad_out, self.w_dec.T, beta=0.0).values().view(n, k)
        grad_v *= v > 0  # (n, k): ReLU's gradient
        flat = idx.reshape(-1)
        order = torch.argsort(flat.unsqueeze(0), dim=1, stable=True).squeeze(0)  # grouped by latent (a 2-D sort:
        # torch's multithreaded 1-D sort is ~100× slower on 2 busy cores)
        by_latent = torch.zeros(width + 1, dtype=torch.long, device=x.device)
        by_latent[1:] = torch.cumsum(torch.bincount(flat, minlength=width), 0)
        tokens = order // k
        grad_w_dec = csr(by_latent, tokens, v.reshape(-1)[order], (width, n)) @ grad_out  # (width, d)
        grad_w_enc = (csr(by_latent, tokens, grad_v.reshape(-1)[order], (width, n)) @ xc).T  # (d, width)
        grad_b_enc = torch.zeros(width, device=x.device).index_add_(0, flat, grad_v.reshape(-1))  # (width,)
        grad_b_dec = grad_out.sum(0) - self.w_enc @ grad_b_enc  # (d,)
        along = torch.linalg.vecdot(grad_w_dec, self.w_dec) / self.w_dec.norm(dim=1).square()  # (width,)
        grad_w_dec.addcmul_(self.w_dec, along.unsqueeze(1), value=-1.0)
        grads = (grad_w_enc, grad_w_dec, grad_b_enc, grad_b_dec)
        for param, grad in zip((self.w_enc, self.w_dec, self.b_enc, self.b_dec), grads, strict=True):
            param.grad = grad.contiguous()
        self.opt.step()
        self.w_dec /= self.w_dec.norm(dim=1, keepdim=True)


def activations(model: Model, site: str, ids: Tensor, store: str | None) -> Tensor:
    """(tokens, d) activations of `site` without each window's first position: from `store` when given (its
    rows, position 0 dropped through the store's row origins), else one model pass per 8 windows."""
    if store:
        st = ActivationStore(store)
        rows = st.rows(site).float()
        _, pos = st.origin(torch.arange(rows.shape[0]))
        return rows[pos > 0]
    parts = [b[site].reshape(-1, 128, b[site].shape[-1])[:, 1:] for b in stream(model, [site], ids, batch_size=8)]
    return torch.cat(parts).reshape(-1, parts[0].shape[-1]).float()


def fve_l0(encode: Any, decode: Any, x: Tensor) -> tuple[float, float]:
    """Fraction of variance explained and mean L0 of an SAE on x (n, d)."""
    with torch.no_grad():
        f = encode(x)
        err = decode(f) - x
    return 1.0 - float(err.pow(2).sum()) / float((x - x.mean(0)).pow(2).sum()), float((f > 0).sum(-1).float().mean())


def saelens_alternating(python: str, x: Tensor, site: str, args: argparse.Namespace) -> tuple[float, float] | None:
    """(pathlens, SAELens) training tokens/s, each the median of `--saelens-rounds` runs of the same
    `--saelens-batches` batches of saved activations, alternated run by run (SAELens in its own interpreter with this
    run's torch threads, timed inside it; a busy machine's load then falls on both alike); None if SAELens fails."""
    data = Path(args.out) / "saelens-slice.safetensors"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = x[: args.saelens_batches * args.batch].contiguous()
    save_file({"x": rows}, str(data))
    script = Path(__file__).with_name("saelens_topk.py")
    threads = str(torch.get_num_threads())
    cmd = [
        python,
        str(script),
        str(data),
        str(args.k),
        str(args.batch),
        str(args.lr),
        "1",
        threads,
        str(args.dead_steps),
    ]
    ours, theirs = [], []
    for _ in range(args.saelens_rounds):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            print(f"SAELens run failed: {done.stderr[-400:]}", file=sys.stderr)
            return None
        theirs.append(float(json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]))
        d = rows.shape[1]
        config = TrainConfig(lr=args.lr, dead_steps=args.dead_steps)
        trainer = Trainer(Dictionary(DictionaryConfig("topk", d, 8 * d, k=args.k), seed=0), site, config=config)
        batches = list(tensor_batches({site: rows}, args.batch, seed=0))
        start = time.perf_counter()
        for batch in batches:
            trainer.step(batch[site])
        ours.append(len(batches) * args.batch / (time.perf_counter() - start))
    return statistics.median(ours), statistics.median(theirs)


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The benchmark's rows (one: `sae-topk`)."""
    set_threads(args.threads)
    model = load("smollm2", device=args.device)
    site = f"L{args.layer}.resid_post"
    wins = windows(None, model.tokenizer, context=128, n_tokens=128 * (args.windows + args.heldout), seed=0)
    train_ids, heldout = wins.ids[: args.windows], wins.ids[args.windows :]
    start = time.perf_counter()
    x = activations(model, site, train_ids, args.store)
    x = (x[: args.train_tokens] if args.train_tokens else x).to(args.device)
    collect_s = time.perf_counter() - start
    held = activations(model, site, heldout, None).to(args.device)
    d, width = int(x.shape[1]), 8 * int(x.shape[1])
    ours = Dictionary(DictionaryConfig("topk", d, width, k=args.k, meta={"site": site, "model": "smollm2"}), seed=0)
    ours = ours.to(args.device)
    trainer = Trainer(ours, site, config=TrainConfig(lr=args.lr, dead_steps=args.dead_steps), seed=0)
    floor = FloorSAE(d, width, args.k, args.lr, x[: args.batch], seed=0)
    seconds = {"pathlens": 0.0, "floor": 0.0}
    floor_tokens = 0
    for epoch in range(args.epochs):
        batches = list(tensor_batches({site: x}, args.batch, seed=epoch))
        runners = ("floor", "pathlens") if epoch < args.floor_epochs else ("pathlens",)
        for name in runners if epoch % 2 == 0 else runners[::-1]:
            begin = time.perf_counter()
            for batch in batches:
                floor.step(batch[site]) if name == "floor" else trainer.step(batch[site])
            seconds[name] += time.perf_counter() - begin
        floor_tokens += len(batches) * args.batch if epoch < args.floor_epochs else 0
    tokens = trainer.tokens
    fve, l0 = fve_l0(ours.encode, ours.decode, held)
    floor_fve, floor_l0 = fve_l0(floor.encode, lambda f: (f @ floor.w_dec + floor.b_dec) / floor.scale, held)
    card = evaluate(model, ours, heldout[: args.ce_windows], site=site, name="sae-topk")
    paired = saelens_alternating(args.saelens_python, x, site, args) if args.saelens_python else None
    if args.out:
        ours.save(Path(args.out) / "sae-topk")
    ours_tps, floor_tps = tokens / seconds["pathlens"], floor_tokens / seconds["floor"]
    yield {
        "workload": "sae-topk",
        "site": site,
        "width": width,
        "k": args.k,
        "train_tokens": int(x.shape[0]),
        "epochs": args.epochs,
        "tokens_trained": tokens,
        "collect_s": round(collect_s, 1),
        "tokens_per_s": round(ours_tps, 1),
        "floor_tokens_per_s": round(floor_tps, 1),
        "ratio_vs_floor": round(ours_tps / floor_tps, 3),
        "saelens_tokens_per_s": None if paired is None else round(paired[1], 1),
        "saelens_pathlens_tokens_per_s": None if paired is None else round(paired[0], 1),
        "saelens_ratio": None if paired is None else round(paired[0] / paired[1], 3),
        "fve": round(fve, 4),
        "l0": round(l0, 2),
        "floor_epochs": args.floor_epochs,
        "floor_fve": round(floor_fve, 4),
        "floor_l0": round(floor_l0, 2),
        "ce_recovered": round(card.ce_recovered, 4),
        "kl": round(card.kl, 4),
        "dead_fraction": round(card.dead_fraction, 4),
        "met": bool(fve >= 0.8 and l0 <= 64),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """This benchmark's arguments (`argv`, or the command line), checked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--windows", type=int, default=1000, help="training windows of 128 tokens")
    parser.add_argument("--heldout", type=int, default=64, help="held-out windows (FVE, L0)")
    parser.add_argument("--ce-windows", type=int, default=16, help="held-out windows for CE recovered")
    parser.add_argument("--train-tokens", type=int, default=0, help="train on the first N tokens only (0: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--floor-epochs", type=int, default=1, help="epochs the floor and SAELens are timed on")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dead-steps", type=int, default=200)
    parser.add_argument("--store", default=None, help="an activation store holding the site (else collected)")
    parser.add_argument("--out", default="benchmarks/out/features_sae", help="where the dictionary is saved")
    parser.add_argument("--saelens-python", default=None, help="python of a virtualenv with SAELens installed")
    parser.add_argument("--saelens-rounds", type=int, default=3, help="alternated pathlens/SAELens timing runs")
    parser.add_argument("--saelens-batches", type=int, default=8, help="batches per SAELens/pathlens timing run")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 0:
        parser.error("--threads must be >= 0")
    check_device(parser, args)
    if args.saelens_python and args.device.type != "cpu":
        parser.error(
            "--saelens-python: the SAELens comparison trains on the CPU (benchmarks/saelens_topk.py); "
            "run it with --device cpu"
        )
    return args


def main() -> None:
    args = parse()
    set_threads(args.threads or None)
    emit_rows(rows(args), args.json)


if __name__ == "__main__":
    main()
