"""`generate`: batched, key/value-cached generation through the model's own `generate`, with steering per row.

Prompts are tokenized and left-padded into one batch; `model.hf.generate` runs inside one `model.session` that
holds the steering. Each row may carry its own steering — a different vector, scale or none — so a
dose–response sweep or an A/B comparison is one batched call: rows that share a site get one `Add` whose
vector is laid out (batch, 1, d) (row i's own vector, zero for rows without one), so the batch costs what a
single vector costs. Sampling is seeded inside a forked RNG, so the caller's global random state is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Add, Intervention
from pathlens.model import Model
from pathlens.sites import parse_site
from pathlens.steering.vector import SteeringVector, check_scale, positions_to_json


@runtime_checkable
class Steerer(Protocol):
    """Steering that is not a fixed vector (a learned controller, an output-layer edit): given the left-padded
    prompt batch (ids (B, P), mask (B, P)), the interventions one generation holds. It may run forwards of its own
    first (e.g. an unsteered pass over the prompts), before the generation's session opens."""

    def generation_interventions(self, model: Model, ids: Tensor, mask: Tensor) -> list[Intervention]: ...


@runtime_checkable
class Steerable(Protocol):
    """Any steer that gives its own interventions at a scale for chosen rows (e.g. learned transport maps, whose
    scale is their strength), usable per row like a SteeringVector: rows sharing one steer and scale get one set."""

    def check(self, model: Model) -> None: ...

    def interventions(
        self, scale: float | None = None, positions: Any = None, rows: Sequence[int] | None = None
    ) -> list[Intervention]: ...


RowSteer = SteeringVector | Steerable | tuple[SteeringVector | Steerable, float] | None
Steer = SteeringVector | Steerer | Steerable | Sequence[RowSteer] | None


@dataclass
class Generation:
    """What `generate` returns.

    texts: each row's generated continuation (decoded, special tokens skipped).
    ids: the generated tokens (B, T) (rows that stopped early are filled with the pad id).
    prompt_ids / prompt_mask: the left-padded prompt batch (B, P) the model was given.
    logits: per-step next-token logits (B, T, vocab) if asked for (`logits=True`), else None.
    """

    texts: list[str]
    ids: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    logits: Tensor | None = None


def generate(
    model: Model,
    prompts: "str | Sequence[str] | Tensor",
    steer: Steer = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    logits: bool = False,
    attention_mask: Tensor | None = None,
) -> Generation:
    """Generate from `prompts` with `steer` applied during every forward of the model's own `generate`.

    prompts: text(s), or left-padded token ids (B, P) with `attention_mask`.
    steer: None; one SteeringVector for every row; or a list with one entry per prompt — a SteeringVector (at
        its own scale), a (SteeringVector, scale) pair, or None (that row unsteered); any `Steerable` (e.g. a
        TransportSteer) wherever a SteeringVector may stand; or a `Steerer`, which gives the interventions for the
        whole batch.
    do_sample / temperature / seed: greedy by default; sampling draws from a generator seeded with `seed`.
    logits: also return the per-step next-token logits (B, T, vocab).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise PathlensError(f"generate: max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    check_scale(temperature, "temperature")
    if do_sample and temperature <= 0:
        raise PathlensError(f"generate: temperature must be positive when sampling, got {temperature}.")
    ids, mask = left_padded(model, prompts, attention_mask)
    if isinstance(steer, Steerer):
        interventions = steer.generation_interventions(model, ids, mask)
    else:
        interventions = row_interventions(model, steer, int(ids.shape[0]), int(mask.sum(1).min()), max_new_tokens)
    pad = pad_id(model)
    kwargs: dict[str, Any] = {
        "input_ids": ids.to(model.device),
        "attention_mask": mask.to(model.device),
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": pad,
        "return_dict_in_generate": True,
        "output_logits": logits,
    }
    if do_sample:
        kwargs.update(temperature=float(temperature), top_k=0, top_p=1.0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]), model.session(interventions):
        torch.manual_seed(seed)
        out = model.hf.generate(**kwargs)  # type: ignore[operator]  # transformers' generate, typed loosely
    new = out.sequences[:, ids.shape[1] :].cpu()
    return Generation(
        texts=decode(model, new),
        ids=new,
        prompt_ids=ids,
        prompt_mask=mask,
        logits=torch.stack(list(out.logits), dim=1).cpu() if logits else None,
    )


def left_padded(model: Model, prompts: "str | Sequence[str] | Tensor", mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token ids (B, P) and mask, left-padded: real tokens end at the last column of every row."""
    if isinstance(prompts, Tensor):
        ids = prompts.unsqueeze(0) if prompts.ndim == 1 else prompts
        model.check_ids(ids, "prompt token ids")
        if mask is None:
            return ids, torch.ones_like(ids)
        mask = model.check_mask(mask, ids)
        if not bool(mask[:, -1].all()):
            raise PathlensError(
                "generate: prompt token ids must be left-padded (every row's last column a real token); "
                "pass texts, or ids padded on the left."
            )
        return ids, mask
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise PathlensError("generate: prompts must be a non-empty list of texts, or token ids (batch, pos).")
    right_ids, right_mask = model.tokenize(texts)
    lengths = right_mask.sum(1)
    width = int(right_ids.shape[1])
    ids = torch.full_like(right_ids, pad_id(model))
    mask = torch.zeros_like(right_mask)
    for i, n in enumerate(lengths.tolist()):
        if n == 0:
            raise PathlensError(f"generate: prompt {i} ({texts[i]!r}) has no tokens; give it some text.")
        ids[i, width - n :] = right_ids[i, :n]
        mask[i, width - n :] = 1
    return ids, mask


def pad_id(model: Model) -> int:
    """The id padding is filled with: the tokenizer's pad token, else its end-of-text token, else the model's."""
    tok = model.tokenizer
    for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    config = model.config
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return 0


def decode(model: Model, ids: Tensor) -> list[str]:
    """Each row of generated ids as text (special tokens skipped; 't<id>' tokens for a model without tokenizer)."""
    if model.tokenizer is None:
        return [" ".join(model.to_str_tokens(row)) for row in ids]
    return [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids]


def row_interventions(model: Model, steer: Steer, batch: int, shortest: int, new_tokens: int) -> list[Intervention]:
    """The interventions that give each of `batch` rows its own steering (see `generate`): one `Add` per (site,
    positions) whose vector is (batch, 1, d), restricted to the rows that use it."""
    if steer is None:
        return []
    if isinstance(steer, SteeringVector):
        steer.check(model)
        check_explicit_positions(steer, shortest, new_tokens)
        return steer.interventions()
    if isinstance(steer, Steerable):
        steer.check(model)
        return steer.interventions()
    if isinstance(steer, (str, bytes)) or not isinstance(steer, Sequence):
        raise PathlensError(
            f"generate: steer must be a SteeringVector, a list with one entry per prompt, or None; got "
            f"{type(steer).__name__}."
        )
    if len(steer) != batch:
        raise PathlensError(
            f"generate: steer has {len(steer)} entries but there are {batch} prompts; give one entry (a "
            "SteeringVector, a (vector, scale) pair or None) per prompt."
        )
    groups: dict[tuple[str, str], tuple[Any, dict[int, Tensor]]] = {}
    others: dict[tuple[int, float | None], tuple[Steerable, float | None, list[int]]] = {}
    for row, entry in enumerate(steer):
        if entry is None:
            continue
        vec, scale = entry if isinstance(entry, tuple) else (entry, None)
        if not isinstance(vec, SteeringVector) and isinstance(vec, Steerable):
            vec.check(model)
            if scale is not None:
                check_scale(scale, f"scale of steer[{row}]")
            others.setdefault((id(vec), scale), (vec, scale, []))[2].append(row)
            continue
        if not isinstance(vec, SteeringVector):
            raise PathlensError(
                f"generate: steer[{row}] is a {type(vec).__name__}; give a SteeringVector, a (vector, scale) pair "
                "or None."
            )
        vec.check(model)
        check_explicit_positions(vec, shortest, new_tokens)
        s = vec.scale if scale is None else scale
        check_scale(s, f"scale of steer[{row}]")
        for site in vec.sites:
            key = (site, repr(positions_to_json(vec.positions)))
            groups.setdefault(key, (vec.positions, {}))[1][row] = float(s) * vec.effective(site)
    interventions = []
    for (site, _), (positions, per_row) in groups.items():
        width = next(iter(per_row.values())).shape[0]
        laid_out = torch.zeros(batch, 1, width, dtype=next(iter(per_row.values())).dtype)  # (B, 1, d)
        for row, v in per_row.items():
            laid_out[row, 0] = v
        interventions.append(Intervention(parse_site(site), Add(laid_out), positions=positions, rows=sorted(per_row)))
    for other, scale, rows in others.values():
        interventions += other.interventions(scale, rows=rows)
    return interventions


def check_explicit_positions(vec: SteeringVector, shortest: int, new_tokens: int) -> None:
    """Explicit positions must exist in every row: from -shortest prompt length up to the last generated token."""
    pos = vec.positions
    if pos is None or isinstance(pos, (str, slice)):
        return
    values = torch.as_tensor(pos).reshape(-1)
    bad = values[(values < -shortest) | (values >= shortest + new_tokens)]
    if bad.numel():
        raise PathlensError(
            f"steering positions {bad.tolist()} are out of range: the shortest prompt has {shortest} tokens and "
            f"{new_tokens} are generated, so valid positions are {-shortest}..{shortest + new_tokens - 1}."
        )
