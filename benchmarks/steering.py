"""Steering benchmark on the embedded SmolLM2: generation cost against a hand-written hook, and dose–response.

Parts:
- generate: 32 neutral prompts x 48 new tokens, greedy, one sentiment vector (difference in means of the shipped
  sentiment pairs) at one layer's resid_post, all positions. pathlens (`pathlens.generate`) against the floor:
  the model's own `generate` with a hand-written forward hook on that block adding the same vector. Prints the
  ratio and whether the tokens are identical. nnsight / TransformerLens are timed only when installed.
- generate-per-row: the same batch with 4 different vectors/scales cycled over the rows, against one vector for
  all rows (the ratio) and against a hand-written hook adding each row's own vector (tokens_identical).
- dose-response: mean-diff, PCA and probe vectors (normalized to the layer's typical norm), scales x the 64 shipped
  neutral prompts as rows of batched generation (greedy), VADER shift and perplexity increase on held-out text.

Run `python benchmarks/steering.py --json` for one JSON line per row.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as `python benchmarks/steering.py`: import the package from the repo root, as -m does
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import benchmarks  # noqa: F401  (turns tqdm off before torch imports it: see benchmarks/__init__.py)

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import Emitter, check_parts, check_repeats_and_threads, ratio, round_robin, set_threads
from pathlens import Model, load
from pathlens.steering import SteeringVector, contrast, find, generate, neutral_prompts, sweep
from pathlens.steering.generate import left_padded, pad_id

PARTS = ("generate", "generate-per-row", "dose-response")
N_PROMPTS, NEW_TOKENS = 32, 48


def _adding_hook(vectors: Tensor) -> Callable[..., Any]:
    """The floor: a forward hook on a block adding `vectors` ((d,) or (B, 1, d)) to its hidden-state output."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + vectors.to(hidden.dtype)
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
    return out[:, ids.shape[1] :]


def generation_rows(model: Model, vec: SteeringVector, layer: int, repeats: int, emit: Emitter) -> None:
    prompts = neutral_prompts()[:N_PROMPTS]
    ids, mask = left_padded(model, prompts, None)
    site = vec.sites[0]
    added = vec.scale * vec.effective(site)

    timed = round_robin(
        {
            "pathlens": lambda: generate(model, prompts, vec, max_new_tokens=NEW_TOKENS).ids,
            "floor": lambda: _hooked_generate(model, ids, mask, layer, added),
        },
        repeats,
    )
    emit(
        {
            "workload": "generate",
            "prompts": N_PROMPTS,
            "new_tokens": NEW_TOKENS,
            "site": site,
            "pathlens_s": timed["pathlens"].median,
            "floor_s": timed["floor"].median,
            "ratio_vs_floor": ratio(timed["pathlens"].median, timed["floor"].median),
            "tokens_identical": bool(torch.equal(timed["pathlens"].result, timed["floor"].result)),
            "nnsight_s": None,
            "tl_s": None,
            "peers": "not installed" if importlib.util.find_spec("nnsight") is None else "not measured",
        }
    )
    entries = [(vec, vec.scale), (vec, -vec.scale), (vec, vec.scale / 2), None]  # a pair's scale replaces vec's
    steer = [entries[i % 4] for i in range(N_PROMPTS)]
    unit = vec.effective(site)
    per_row = torch.stack([torch.zeros_like(unit) if e is None else e[1] * unit for e in steer])  # (B, d)
    per_row = per_row[:, None, :]  # (B, 1, d)
    timed = round_robin(
        {
            "per_row": lambda: generate(model, prompts, steer, max_new_tokens=NEW_TOKENS).ids,
            "one_vector": lambda: generate(model, prompts, vec, max_new_tokens=NEW_TOKENS).ids,
            "floor": lambda: _hooked_generate(model, ids, mask, layer, per_row),
        },
        repeats,
    )
    emit(
        {
            "workload": "generate-per-row",
            "prompts": N_PROMPTS,
            "new_tokens": NEW_TOKENS,
            "pathlens_s": timed["per_row"].median,
            "one_vector_s": timed["one_vector"].median,
            "ratio_vs_one_vector": ratio(timed["per_row"].median, timed["one_vector"].median),
            "floor_s": timed["floor"].median,
            "ratio_vs_floor": ratio(timed["per_row"].median, timed["floor"].median),
            "tokens_identical": bool(torch.equal(timed["per_row"].result, timed["floor"].result)),
            "nnsight_s": None,
            "tl_s": None,
        }
    )


def dose_response_rows(model: Model, site: str, scales: list[float], out: Path, new_tokens: int, emit: Emitter) -> None:
    data = contrast("sentiment")
    vectors = {}
    for method in ("mean-diff", "pca", "probe"):
        found = find(model, method, data.positive, data.negative, site, data="shipped sentiment pairs")
        vectors[method] = SteeringVector(found.vectors, normalize=True, norms=found.norms, meta=found.meta)
    result = sweep(model, vectors, scales, max_new_tokens=new_tokens, out=out)
    for row in result.table.to_dict(orient="records"):
        emit(
            {
                "workload": "dose-response",
                "method": row["name"],
                "direction": row["direction"],
                "scale": row["scale"],
                "vader_mean": round(row["vader_mean"], 4),
                "vader_shift": round(row["vader_shift"], 4),
                "ppl_increase": round(row["ppl_increase"], 4),
                "kl": round(row["kl"], 4),
                "site": site,
                "generations": str(result.files["generations"]),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--scales", default="-0.3,-0.2,-0.1,0.1,0.2,0.3", help="fractions of the typical norm")
    parser.add_argument("--dose-tokens", type=int, default=NEW_TOKENS, help="new tokens per dose-response row")
    parser.add_argument("--out", default="benchmarks/out/steering", help="where the dose-response files go")
    args = parser.parse_args()
    check_repeats_and_threads(parser, args)
    check_parts(parser, args, PARTS)
    set_threads(args.threads)
    model = load("smollm2")
    site = f"L{args.layer}.resid_post"
    emit = Emitter(json=args.json, extra={"model": "smollm2", "threads": torch.get_num_threads()})
    if "generate" in args.parts or "generate-per-row" in args.parts:
        data = contrast("sentiment")
        found = find(model, "mean-diff", data.positive, data.negative, site, data="shipped sentiment pairs")
        vec = SteeringVector(found.vectors, normalize=True, norms=found.norms, scale=0.2, meta=found.meta)
        generation_rows(model, vec, args.layer, args.repeats, emit)
    if "dose-response" in args.parts:
        scales = [float(s) for s in args.scales.split(",") if s]
        dose_response_rows(model, site, scales, Path(args.out), args.dose_tokens, emit)
    if not args.json:
        for row in emit.rows:
            print(row)


if __name__ == "__main__":
    main()
