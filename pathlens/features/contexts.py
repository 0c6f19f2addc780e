"""Top-activating contexts of a dictionary's latents: where in the text each latent fires most.

`top_contexts` runs the model over token windows with the dictionary spliced in, reads the chosen latents at
every position, and keeps, per latent, the `top` positions where it is largest (at most one per window), each
with the tokens around it and the latent's activation on every one of them (so a page can shade each token).
`pick_latents` chooses which latents to show when a dictionary has thousands: evenly spaced over the live
latents ranked by firing frequency, so frequent and rare ones both appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.features.sae import Dictionary
from pathlens.model import Model
from pathlens.sites import Site


@dataclass(frozen=True)
class LatentContext:
    """One top-activating position of a latent: the tokens of the window around it, the latent's activation on
    each, which of them is the peak, and where it is (window, position)."""

    tokens: list[str]
    activations: list[float]
    peak: int
    window: int
    position: int

    @property
    def value(self) -> float:
        return self.activations[self.peak]

    def __str__(self) -> str:
        """The context as text with the peak token in [[ ]]."""
        return "".join(f"[[{t}]]" if i == self.peak else t for i, t in enumerate(self.tokens))


def pick_latents(frequencies: Tensor, count: int) -> list[int]:
    """`count` live latents (frequency > 0) evenly spaced over the ranking by frequency, most frequent first."""
    live = (frequencies > 0).nonzero().flatten()
    if live.numel() == 0:
        return []
    ranked = live[frequencies[live].argsort(descending=True)]
    at = torch.linspace(0, ranked.numel() - 1, min(count, ranked.numel())).round().long().unique()
    return [int(i) for i in ranked[at]]


def top_contexts(
    model: Model,
    dictionary: Dictionary,
    windows: Tensor,
    latents: Sequence[int],
    site: "Site | str | None" = None,
    target: "Site | str | None" = None,
    top: int = 5,
    before: int = 12,
    after: int = 4,
    chunk: int = 8,
    skip_first: bool = True,
) -> dict[int, list[LatentContext]]:
    """For each latent of `latents`, its `top` contexts over token windows (n, p) (see module docstring). The
    dictionary is spliced at `site` (and `target`; both default to its meta). Position 0 is skipped with
    `skip_first` (as in training)."""
    for i in latents:
        if not 0 <= int(i) < dictionary.width:
            raise PathlensError(f"latent {i} is out of range: the dictionary has {dictionary.width} latents.")
    meta = dictionary.config.meta
    source = site if site is not None else meta.get("site")
    out_site = target if target is not None else (meta.get("target") if dictionary.config.transcoder else None)
    if source is None:
        raise PathlensError("top_contexts: this dictionary does not record its site; pass site='L6.resid_post'.")
    chosen = torch.tensor([int(i) for i in latents], dtype=torch.long)
    parts: list[Tensor] = []
    with torch.no_grad(), model.splice(dictionary, source, target=out_site, name="ctx") as sp:
        for start in range(0, int(windows.shape[0]), chunk):
            f = model.run(windows[start : start + chunk], cache=[sp.latents]).cache[sp.latents]
            parts.append(f[..., chosen].float().cpu())  # (b, p, m)
    acts = torch.cat(parts)  # (n, p, m)
    if skip_first:
        acts[:, 0] = float("-inf")
    per_window, where = acts.max(dim=1)  # (n, m)
    result: dict[int, list[LatentContext]] = {}
    for j, latent in enumerate(chosen.tolist()):
        order = per_window[:, j].argsort(descending=True)[:top]
        contexts = []
        for w in order.tolist():
            value, pos = float(per_window[w, j]), int(where[w, j])
            if not value > 0:
                break
            lo, hi = max(int(skip_first), pos - before), min(int(windows.shape[1]), pos + after + 1)
            contexts.append(
                LatentContext(
                    tokens=model.to_str_tokens(windows[w, lo:hi]),
                    activations=[max(0.0, float(a)) for a in acts[w, lo:hi, j]],
                    peak=pos - lo,
                    window=w,
                    position=pos,
                )
            )
        result[latent] = contexts
    return result
