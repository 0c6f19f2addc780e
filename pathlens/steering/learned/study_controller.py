"""What `pathlens steer --method controller|eigenshift` runs: train or score on a shipped contrast set, sweep the
method's strength, write generations and a record whose rows read like the fixed-vector sweep's (scale,
vader_mean, vader_shift, ppl_increase, kl).

- controller: a per-layer mean-difference direction (positive − negative side, every layer's resid_post at its
  typical norm) and a controller trained with the negative side as "needs steering" and the positive side plus
  the first 16 neutral prompts as "needs none" (gate sigmoid; update "prompt", since the lagged mode switches
  itself off after the first steps on SmolLM2, see controller.py). Scales are α. Each row: VADER of greedy
  continuations of the negative-side prompts (targets) and its shift; `kl`: KL(unsteered ‖ steered) of the
  next-token distributions along the unsteered continuations of neutral prompts not used in training
  (`forced_logits`, every step), the cost where no steering is needed; ppl_increase is not measured (the controller
  steers generation steps, not a scored text).
- eigenshift: the unembedding's components scored (AUROC) on the final normed states of the negative side's
  texts vs the positive side's, the 8 most concept-specific shrunk; scales are β. Each row: VADER of greedy
  continuations of neutral prompts, perplexity increase and KL on the shipped held-out text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.results.io import write_text
from pathlens.steering.data import contrast, heldout_text, neutral_prompts
from pathlens.steering.evaluate import vader_scores
from pathlens.steering.finders import layer_sites, mean_difference
from pathlens.steering.generate import Steerer, generate, left_padded, pad_id
from pathlens.steering.learned.controller import train_controller
from pathlens.steering.learned.eigenshift import components
from pathlens.steering.vector import SteeringVector

LEARNED_METHODS = ("controller", "eigenshift")
DEFAULT_SCALES = {"controller": (0.02, 0.04, 0.08), "eigenshift": (0.5, 0.0)}
EIGENSHIFT_K = 8


class _Force(LogitsProcessor):
    """Forces each row's next token to its continuation (B, T): decoding along a fixed text."""

    def __init__(self, tokens: Tensor, prompt_len: int):
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(scores.shape[0]), self.tokens[:, step].to(scores.device)] = 0.0
        return forced  # type: ignore[return-value]


def forced_logits(
    model: Model, steer: Steerer | SteeringVector | None, prompts: Sequence[str], tokens: Tensor
) -> Tensor:
    """Per-step next-token logits (B, T, vocab) of the model steered by `steer`, decoding along `tokens` (B, T) (e.g.
    the unsteered continuation) through the model's own generate, so that per-step steering (a controller's lag)
    runs exactly as in generation."""
    ids, mask = left_padded(model, list(prompts), None)
    if steer is None:
        interventions = []
    elif isinstance(steer, SteeringVector):
        steer.check(model)
        interventions = steer.interventions()
    else:
        interventions = steer.generation_interventions(model, ids, mask)
    with torch.no_grad(), model.session(interventions):
        out = model.hf.generate(  # type: ignore[operator]  # transformers' generate, typed loosely
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=int(tokens.shape[1]),
            do_sample=False,
            pad_token_id=pad_id(model),
            logits_processor=LogitsProcessorList([_Force(tokens, int(ids.shape[1]))]),
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(list(out.logits), dim=1).float().cpu()


def step_kl(base: Tensor, steered: Tensor) -> float:
    """Mean KL(base ‖ steered) (nats) over rows and steps of (B, T, vocab) logits."""
    p = torch.log_softmax(base.double(), -1)
    q = torch.log_softmax(steered.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _mean_vader(texts: Sequence[str]) -> float:
    return float(np.mean(vader_scores(texts)))


def learned_study(
    model: Model,
    concept: str,
    method: str,
    out: str | os.PathLike[str],
    scales: Sequence[float] | None = None,
    n_prompts: int = 16,
    max_new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Run `method` ("controller" or "eigenshift") on the shipped contrast set `concept` (module docstring); write
    `generations.json`, the trained object (`controller.safetensors/.json`, or `eigenshift.safetensors/.json` at the
    strongest β swept) and `steer.json` (the record returned, whose `files` lists them) into `out`."""
    if method not in LEARNED_METHODS:
        raise PathlensError(f"unknown learned steering method {method!r}; use one of {list(LEARNED_METHODS)}.")
    if isinstance(n_prompts, bool) or not 1 <= n_prompts <= 32:
        raise PathlensError(f"n_prompts must be 1..32 for learned steering, got {n_prompts}.")
    data = contrast(concept)
    neutral = neutral_prompts()
    folder = Path(os.fspath(out))
    chosen = list(DEFAULT_SCALES[method] if scales is None else scales)
    rows: list[dict[str, Any]] = []
    generations: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if method == "controller":
        found = mean_difference(model, data.positive, data.negative, layer_sites(model), data=f"pathlens {concept}")
        direction = SteeringVector(found.vectors, normalize=True, norms=found.norms, positions="last", meta=found.meta)
        trained = train_controller(
            model, data.negative, data.positive + neutral[:16], direction, seed=seed, gate="sigmoid", update="prompt"
        )
        trained.save(folder / "controller")
        targets, keep = data.negative[:n_prompts], neutral[32 : 32 + n_prompts]
        base = generate(model, targets, max_new_tokens=max_new_tokens)
        base_keep = generate(model, keep, max_new_tokens=max_new_tokens, logits=True)
        assert base_keep.logits is not None
        base_vader = _mean_vader(base.texts)
        generations += [{"scale": 0.0, "prompt": p, "text": t} for p, t in zip(targets, base.texts, strict=True)]
        rows.append(_row(0.0, base_vader, base_vader, None, 0.0))
        for alpha in chosen:
            steer = trained.with_(alpha=alpha)
            gen = generate(model, targets, steer, max_new_tokens=max_new_tokens)
            kl = step_kl(base_keep.logits, forced_logits(model, steer, keep, base_keep.ids))
            rows.append(_row(alpha, _mean_vader(gen.texts), base_vader, None, kl))
            generations += [{"scale": alpha, "prompt": p, "text": t} for p, t in zip(targets, gen.texts, strict=True)]
        extra = {"train_seconds": trained.meta["train_seconds"], "losses": trained.meta["losses"]}
    else:
        from pathlens.steering.evaluate import cost, next_token_logprobs

        scored = components(model, data.negative, data.positive, "auroc")
        prompts = neutral[:n_prompts]
        texts = heldout_text()
        baseline = next_token_logprobs(model, texts)
        base_ppl = cost(model, texts, None, baseline=baseline)["ppl"]
        base = generate(model, prompts, max_new_tokens=max_new_tokens)
        base_vader = _mean_vader(base.texts)
        generations += [{"scale": 1.0, "prompt": p, "text": t} for p, t in zip(prompts, base.texts, strict=True)]
        rows.append(_row(1.0, base_vader, base_vader, (base_ppl, base_ppl), 0.0))
        for beta in chosen:
            edited = scored.select(EIGENSHIFT_K, beta, model).edited(model)
            gen = generate(edited, prompts, max_new_tokens=max_new_tokens)
            steered = next_token_logprobs(edited, texts)[0]
            ppl = cost(edited, texts, None, baseline=(steered, baseline[1], baseline[2]))["ppl"]
            kl = float((baseline[0].exp() * (baseline[0] - steered)).sum(-1)[baseline[2]].mean())
            rows.append(_row(beta, _mean_vader(gen.texts), base_vader, (ppl, base_ppl), kl))
            generations += [{"scale": beta, "prompt": p, "text": t} for p, t in zip(prompts, gen.texts, strict=True)]
        strongest = min(chosen) if chosen else 0.0  # β: the smallest keeps the least of the components
        scored.select(EIGENSHIFT_K, strongest, model).save(folder / "eigenshift")
        extra = {
            "k": EIGENSHIFT_K,
            "components": scored.ranked()[:EIGENSHIFT_K].tolist(),
            "score": "auroc",
            "saved_beta": strongest,
        }
    examples = []
    for prompt in dict.fromkeys(g["prompt"] for g in generations[: min(3, n_prompts)]):
        mine = {f"scale {g['scale']:g}": g["text"] for g in generations if g["prompt"] == prompt}
        examples.append({"prompt": prompt, **mine})
    record = {
        "model": model.name,
        "concept": concept,
        "method": method,
        "site": "every layer's resid_post" if method == "controller" else "unembedding",
        "rows": rows,
        "examples": examples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "vector": str(folder / f"{method}.safetensors"),
        "files": {"generations": str(folder / "generations.json"), method: str(folder / f"{method}.safetensors")},
        **extra,
    }
    write_text(folder / "generations.json", json.dumps(generations, indent=1, ensure_ascii=False) + "\n")
    write_text(folder / "steer.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


def _row(scale: float, vader: float, base_vader: float, ppl: tuple[float, float] | None, kl: float) -> dict[str, Any]:
    """One row of the record, with the keys the fixed-vector sweep's rows have; `ppl` is (steered, unsteered)
    perplexity on the held-out text, or None where it is not measured (NaN)."""
    steered, base = (float("nan"), float("nan")) if ppl is None else ppl
    return {
        "scale": scale,
        "vader_mean": vader,
        "vader_shift": vader - base_vader,
        "ppl": steered,
        "ppl_base": base,
        "ppl_increase": steered / base - 1.0,
        "kl": kl,
    }
