"""Pooled site activations of a text set, with interventions on and (for training) gradients kept.

Transport steering fits maps between two *distributions* of activations, one sample per sentence (or per token):
`pooled` runs the texts through `model.run` (one session per batch, the steering so far applied), reads the sites
after any intervention on them (the value the model goes on with) and pools each row over its real tokens —
"mean" (Linear-AcT's default), "last" (each row's last real token) or "all" (every real token is a sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention
from pathlens.model import Model

Pooling = Literal["mean", "last", "all"]
POOLINGS = ("mean", "last", "all")


def check_texts(texts: Sequence[str], what: str) -> list[str]:
    """`texts` as a list, or a PathlensError naming `what` if it is empty or not a list of texts."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise PathlensError(f"the {what} set must be a list of texts, got {type(texts).__name__}.")
    if len(texts) < 2:
        raise PathlensError(
            f"the {what} set has {len(texts)} text(s); give at least two (a distribution needs several samples)."
        )
    return list(texts)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise PathlensError(f"pooling {pooling!r} is not one of {list(POOLINGS)}.")


def pool(value: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """(b, p, d) site values and their (b, p) mask → samples (b, d) ("mean", "last") or (real tokens, d) ("all")."""
    m = mask.to(value.device).bool()
    if pooling == "all":
        return value[m]  # (n_real, d)
    if pooling == "last":
        return value[torch.arange(value.shape[0], device=value.device), m.sum(1) - 1]  # (b, d)
    weights = m[..., None].to(value.dtype)  # (b, p, 1)
    return (value * weights).sum(1) / weights.sum(1)  # (b, d)


def pooled(
    model: Model,
    texts: Sequence[str],
    sites: Sequence[str],
    interventions: Sequence[Intervention] = (),
    pooling: str = "mean",
    grad: bool = False,
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Each site's pooled activations (N, d) of `texts` (float32), read after `interventions` (applied at every
    row). With `grad`, the values stay in the autograd graph (the caller freezes the model's parameters)."""
    check_pooling(pooling)
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    for start in range(0, len(texts), batch_size):
        ids, mask = model.tokenize(list(texts[start : start + batch_size]))
        with torch.set_grad_enabled(grad):
            cache = model.run(
                ids,
                attention_mask=mask,
                cache=list(sites),
                interventions=list(interventions),
                grad=grad,
                logits_at=torch.tensor([0]),
            ).cache
        for s in sites:
            out[s].append(pool(cache[s].float(), mask, pooling))  # (b, d)
    return {s: torch.cat(parts) for s, parts in out.items()}
