"""What every diagnostic accepts as its prompts: text, a list of texts or token ids (b, p), turned into checked
token ids and a 0/1 mask (right-padded: each row's real tokens first)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model


def token_inputs(model: Model, inputs: object, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token ids (b, p) and a 0/1 mask (b, p) for `inputs`: text or texts (tokenized, right-padded) or ids.

    Ids must be right-padded when a mask marks padding (each row's real tokens first), since the diagnostics read
    each row's first `length` positions."""
    if isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and len(inputs) > 0 and all(isinstance(t, str) for t in inputs)
    ):
        ids, mask = model.tokenize(inputs)  # type: ignore[arg-type]
        return ids, mask if attention_mask is None else model.check_mask(attention_mask, ids)
    if not isinstance(inputs, Tensor):
        raise PathlensError(
            f"prompts must be a text, a list of texts or token ids (batch, pos), got {type(inputs).__name__}."
        )
    ids = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
    model.check_ids(ids)
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    mask = model.check_mask(attention_mask, ids)
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(ids.shape[1])[None] < lengths[:, None]).to(mask.dtype)).all()):
        raise PathlensError(
            "attention_mask: the diagnostics need right-padded rows (real tokens first, then padding); "
            "left-padded rows are not supported here."
        )
    return ids, mask
