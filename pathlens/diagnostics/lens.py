"""Logit lens (nostalgebraist 2020; METHODS §22): read every layer's residual stream as if it were the last.

At layer ℓ and position t the lens logits are `Model.unembed(resid_post[ℓ][t])` — the model's own final norm,
unembedding and final soft-cap (the one function the cone runner also uses), so the last layer's lens is exactly
the model's logits. Per (prompt, layer, position) the lens reports its top-k tokens with their probabilities and,
given a target token, the target's rank (1 = top-1) and probability.

`logit_lens(model, prompts, targets=...)` returns a `Lens`: a table of `Scores` over (prompt, layer, pos[, rank]),
saved as safetensors + JSON per Scores, with `.table()` for one position's layer-by-layer readout and `.plot()`
for the classic picture (top-1 token per layer and position, coloured by the target's probability).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from pathlens.diagnostics.inputs import token_inputs
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.results.io import write_text

_PARTS = ("top_id", "top_prob", "target_rank", "target_prob")


@dataclass(frozen=True)
class Lens:
    """The logit lens of a batch of prompts.

    top_id / top_prob: Scores (prompt, layer, pos, rank): the k most likely token ids (as floats; exact below 2²⁴)
        and their probabilities under the lens at every layer and position, most likely first.
    target_rank / target_prob: Scores (prompt, layer, pos): the target token's rank (1 = top-1; ties count in its
        favour) and probability; NaN where a position has no target (padding, the last token under next-token
        targets).
    The meta of every part holds the prompt tokens (`meta["tokens"]`, one list per prompt), the target ids and the
    text of every token id that appears (`meta["token_text"]`).
    """

    top_id: Scores
    top_prob: Scores
    target_rank: Scores
    target_prob: Scores

    @property
    def meta(self) -> dict:
        return self.top_id.meta

    @property
    def layers(self) -> list[int]:
        return list(self.top_id.coords["layer"])

    def token_text(self, token_id: int) -> str:
        """The text of a token id seen by this lens (top-k or target), or `t{id}` if unknown."""
        return str(self.meta["token_text"].get(str(int(token_id)), f"t{int(token_id)}"))

    def top1(self) -> Tensor:
        """The top-1 token id per (prompt, layer, pos): a long tensor."""
        return self.top_id.values[..., 0].long()

    def table(self, prompt: int = 0, pos: int = -1) -> pd.DataFrame:
        """Layer-by-layer readout at one position of one prompt: top-k tokens with probabilities, the target's rank
        and probability. `pos` counts the prompt's own tokens (negative: from its last real token)."""
        n = len(self.meta["tokens"][prompt])
        column = pos if pos >= 0 else n + pos
        if not 0 <= column < n:
            raise PathlensError(f"table(pos={pos}): prompt {prompt} has {n} tokens (valid: 0..{n - 1} or -{n}..-1).")
        ids = self.top_id.values[prompt, :, column].long()  # (L, k)
        probs = self.top_prob.values[prompt, :, column]  # (L, k)
        rows = []
        for i, layer in enumerate(self.layers):
            row: dict[str, object] = {"layer": layer}
            for r in range(ids.shape[1]):
                row[f"top{r + 1}"] = self.token_text(int(ids[i, r]))
                row[f"p{r + 1}"] = float(probs[i, r])
            row["target_rank"] = float(self.target_rank.values[prompt, i, column])
            row["target_prob"] = float(self.target_prob.values[prompt, i, column])
            rows.append(row)
        return pd.DataFrame(rows)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write each part as `<folder>/<part>.safetensors` + `.json` (atomically) and `lens.json` naming them."""
        out = Path(os.fspath(folder))
        for name in _PARTS:
            getattr(self, name).save(out / name)
        write_text(out / "lens.json", json.dumps({"format": "pathlens.Lens", "parts": list(_PARTS)}, indent=2))
        return out

    @staticmethod
    def load(folder: str | os.PathLike[str]) -> Lens:
        """Read a lens written by `save`."""
        out = Path(os.fspath(folder))
        if not (out / "lens.json").is_file():
            raise PathlensError(f"{out} holds no lens.json; pass the folder a Lens was saved to.")
        return Lens(**{name: Scores.load(out / name) for name in _PARTS})

    def plot(self, path: str | os.PathLike[str] | None = None, prompt: int = 0, title: str | None = None) -> Figure:
        """Layers (rows) × positions (columns) of one prompt: each cell shows the lens' top-1 token and is coloured
        by the target's probability (by the top-1 probability where there is no target)."""
        tokens = self.meta["tokens"][prompt]
        n = len(tokens)
        top = self.top1()[prompt, :, :n].numpy()  # (L, n)
        colour = self.target_prob.values[prompt, :, :n].numpy()
        colour = np.where(np.isnan(colour), self.top_prob.values[prompt, :, :n, 0].numpy(), colour)
        height = max(3.0, 0.28 * len(self.layers) + 1.5)
        fig = Figure(figsize=(max(5.0, 0.75 * n + 2.0), height), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(colour, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="target probability (top-1 probability where no target)")
        fontsize = 6 if n > 12 else 7
        for i in range(top.shape[0]):
            for j in range(n):
                text = self.token_text(int(top[i, j])).replace("\n", "\\n")[:8]
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=fontsize, color="k" if colour[i, j] < 0.6 else "w"
                )
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.set_xticks(range(n), [t.replace("\n", "\\n")[:10] for t in tokens], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("layer (resid_post)")
        ax.set_xlabel("position (input token)")
        ax.set_title(title or f"logit lens, prompt {prompt} ({self.top_id.meta.get('model', '')})")
        if path is not None:
            fig.savefig(os.fspath(path), dpi=150)
        return fig


def _targets(targets: Tensor | Sequence[int] | str | None, ids: Tensor, mask: Tensor) -> Tensor:
    """Target id per (prompt, pos) (b, p), −1 where there is none."""
    b, p = ids.shape
    real = mask.bool()
    if targets is None or (isinstance(targets, str) and targets == "next"):
        out = torch.full((b, p), -1, dtype=torch.long)
        out[:, :-1] = ids[:, 1:]
        out[:, :-1] = torch.where(real[:, 1:], out[:, :-1], -1)
        return out
    if isinstance(targets, str):
        raise PathlensError(f"targets={targets!r}: use 'next', a (b,) tensor of ids, a (b, p) tensor or None.")
    t = torch.as_tensor(targets).long()
    if t.ndim == 1 and t.numel() == b:
        t = t[:, None].expand(b, p)
    if tuple(t.shape) != (b, p):
        raise PathlensError(
            f"targets has shape {tuple(t.shape)}; give one id per prompt ({b},) or one per position ({b}, {p})."
        )
    return torch.where(real, t, -1)


def logit_lens(
    model: Model,
    prompts: object,
    targets: Tensor | Sequence[int] | str | None = "next",
    k: int = 5,
    attention_mask: Tensor | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> Lens:
    """The logit lens at every layer and position of `prompts` (text, texts or token ids (b, p), right-padded).

    targets: "next" (the next input token, the default), one id per prompt (b,) scored at every position (e.g. the
        answer of a task), one per position (b, p) (−1: none), or None (same as "next").
    k: how many top tokens to keep per cell. layers: which layers' resid_post to read (default: all).
    The model runs once per `batch_size` prompts, caching only resid_post; the lens logits of one layer at a time
    are reduced to top-k, rank and probability, so no (layer, pos, vocab) tensor is kept.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PathlensError(f"k={k!r}: pass a positive number of top tokens.")
    ids, mask = token_inputs(model, prompts, attention_mask)
    chosen = list(range(model.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in chosen:
        if not 0 <= layer < model.n_layers:
            raise PathlensError(f"layers: {layer} is out of range; this model has layers 0..{model.n_layers - 1}.")
    target = _targets(targets, ids, mask)  # (b, p)
    b, p = ids.shape
    top_id = torch.zeros(b, len(chosen), p, k, dtype=torch.float64)
    top_prob = torch.zeros(b, len(chosen), p, k)
    rank = torch.full((b, len(chosen), p), float("nan"))
    prob = torch.full((b, len(chosen), p), float("nan"))
    sites = [f"L{layer}.resid_post" for layer in chosen]
    with torch.no_grad():
        for start in range(0, b, batch_size):
            rows = slice(start, start + batch_size)
            run = model.run(ids[rows], attention_mask=mask[rows], cache=sites)
            t = target[rows]  # (B, p)
            has = t >= 0
            for i, site in enumerate(sites):
                logits = model.unembed(run.cache[site]).float()  # (B, p, V)
                logp = logits.log_softmax(-1)
                values, index = logp.topk(k, dim=-1)  # (B, p, k)
                top_id[rows, i] = index.double()
                top_prob[rows, i] = values.exp()
                picked = logits.gather(-1, t.clamp(min=0)[..., None])  # (B, p, 1)
                better = (logits > picked).sum(-1).float() + 1.0  # (B, p)
                rank[rows, i] = torch.where(has, better, float("nan"))
                lp = logp.gather(-1, t.clamp(min=0)[..., None])[..., 0].exp()
                prob[rows, i] = torch.where(has, lp, float("nan"))
    seen = set(top_id.long().unique().tolist()) | set(target[target >= 0].unique().tolist())
    meta = {
        "model": model.name,
        "k": k,
        "tokens": [model.to_str_tokens(ids[i, : int(mask[i].sum())]) for i in range(b)],
        "targets": target.tolist(),
        "token_text": {str(i): model.to_str_tokens([i])[0] for i in sorted(seen)},
    }
    coords = {"prompt": list(range(b)), "layer": chosen, "pos": list(range(p))}
    ranked = {**coords, "rank": list(range(1, k + 1))}
    dims3, dims4 = ("prompt", "layer", "pos"), ("prompt", "layer", "pos", "rank")
    return Lens(
        top_id=Scores(top_id, dims4, ranked, metric="token_id", method="logit_lens", meta=meta),
        top_prob=Scores(top_prob, dims4, ranked, metric="probability", method="logit_lens", meta=meta),
        target_rank=Scores(rank, dims3, coords, metric="target_rank", method="logit_lens", meta=meta),
        target_prob=Scores(prob, dims3, coords, metric="target_probability", method="logit_lens", meta=meta),
    )
