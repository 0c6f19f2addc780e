"""Commitment layer (METHODS §22, a reconstruction of "Distributional Semantics Tracing"): the layer after which a
prompt's prediction is settled.

Per prompt of a task, at the answer position, on one of its two runs R ("clean" by default, or "corrupt"):

- `stable_top1`: the first layer ℓ such that the logit lens' top-1 token at every layer ≥ ℓ is the final one
  (the top-1 no longer changes);
- `answer_top1`: the first layer from which the task's answer is the lens' top-1 at every later layer (NaN if it
  is not the model's final top-1);
- `lens_prefers`: the first layer from which the lens ranks answer vs wrong the way the model finally does;
- `patch_settled`: the first layer ℓ such that, for every ℓ' ≥ ℓ, the other run O's context no longer restores
  O's answer: in the hybrid run whose answer position carries R's resid_post[ℓ'] and whose other positions carry
  O, the fraction `restored(ℓ') = (m_hybrid − m_R) / (m_O − m_R)` stays below `threshold`;
- `commitment`: the METHODS §22 proxy, the first ℓ* meeting both `lens_prefers` and `patch_settled`.

The hybrid is one activation patch through the patching engine (`pathlens.patching.patch`): base run O, the answer
position of resid_post[ℓ] patched from R. Because attention is causal and the answer position is the last real
token, this is the same forward as "patching the clean state of every other position after ℓ" into R (the
wording of §22): positions before the answer never read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching import patch
from pathlens.patching.spec import Direction
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.tasks.base import Task

MEASURES = ("stable_top1", "answer_top1", "lens_prefers", "patch_settled", "commitment")
_PARTS = ("per_prompt", "answer_rank", "lens_logit_diff", "restored")


@dataclass(frozen=True)
class Commitment:
    """Per-prompt commitment layers and the per-layer curves they come from.

    per_prompt: Scores (prompt, measure) — the layers of `MEASURES` (NaN where a condition never holds).
    answer_rank: Scores (prompt, layer) — the answer's lens rank at the answer position (1 = top-1).
    lens_logit_diff: Scores (prompt, layer) — lens logit(answer) − logit(wrong) at the answer position.
    restored: Scores (prompt, layer) — the fraction of O's metric that O's context restores (see module doc).
    """

    per_prompt: Scores
    answer_rank: Scores
    lens_logit_diff: Scores
    restored: Scores

    def summary(self) -> pd.DataFrame:
        """One row per measure: how many prompts have it, and its mean, median, min and max layer."""
        rows = []
        for j, name in enumerate(self.per_prompt.coords["measure"]):
            v = self.per_prompt.values[:, j].double().numpy()
            ok = v[~np.isnan(v)]
            stats = (ok.mean(), np.median(ok), ok.min(), ok.max()) if ok.size else (np.nan,) * 4
            rows.append(
                {"measure": name, "prompts": int(ok.size), "of": int(v.size)}
                | dict(zip(("mean", "median", "min", "max"), (float(s) for s in stats), strict=True))
            )
        return pd.DataFrame(rows)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        out = Path(os.fspath(folder))
        for name in _PARTS:
            getattr(self, name).save(out / name)
        write_text(out / "commitment.json", json.dumps({"format": "pathlens.Commitment", "parts": list(_PARTS)}))
        return out

    @staticmethod
    def load(folder: str | os.PathLike[str]) -> Commitment:
        out = Path(os.fspath(folder))
        if not (out / "commitment.json").is_file():
            raise PathlensError(f"{out} holds no commitment.json; pass the folder a Commitment was saved to.")
        return Commitment(**{name: Scores.load(out / name) for name in _PARTS})

    def plot(self, path: str | os.PathLike[str] | None = None, title: str | None = None) -> Figure:
        """Per layer: the share of prompts whose answer is the lens' top-1, and the mean restored fraction, with the
        median commitment and answer-top-1 layers marked."""
        layers = self.answer_rank.coords["layer"]
        top1 = (self.answer_rank.values == 1).float().mean(0).numpy()
        restored = torch.nanmean(self.restored.values.double(), dim=0).numpy()
        fig = Figure(figsize=(7.0, 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(layers, top1, marker="o", label="answer is lens top-1 (share of prompts)")
        ax.plot(layers, restored, marker="s", label="other run's context restores (mean fraction)")
        summary = self.summary().set_index("measure")
        for name, style in (("commitment", "--"), ("answer_top1", ":")):
            median = summary.loc[name, "median"]
            if not np.isnan(median):
                ax.axvline(median, linestyle=style, color="0.3", label=f"median {name} layer = {median:g}")
        ax.set_xlabel("layer (resid_post)")
        ax.set_ylim(min(-0.05, float(np.nanmin(restored)) - 0.05), max(1.05, float(np.nanmax(restored)) + 0.05))
        ax.legend(fontsize=7, loc="center left")
        ax.set_title(title or f"commitment ({self.per_prompt.meta.get('task', '')}, {self.per_prompt.meta['run']} run)")
        if path is not None:
            fig.savefig(os.fspath(path), dpi=150)
        return fig


def first_settled(condition: Tensor) -> Tensor:
    """Per row of a (N, L) boolean tensor, the first column from which it is true through the last column; NaN if
    the last column is false. E.g. [F, T, F, T, T] → 3."""
    # a suffix is all-true when the reversed cumulative product is 1
    suffix_true = condition.flip(-1).long().cumprod(-1).flip(-1).bool()  # (N, L)
    count = suffix_true.sum(-1)  # (N,) length of the all-true suffix
    first = (condition.shape[-1] - count).double()
    return torch.where(count > 0, first, torch.tensor(float("nan"), dtype=torch.float64))


def _lens_at_answer(model: Model, task: Task, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lens top-1 id (N, L), answer rank (N, L) and logit(answer) − logit(wrong) (N, L) at each answer position."""
    sites = [f"L{layer}.resid_post" for layer in range(model.n_layers)]
    rows = torch.arange(task.n)
    with torch.no_grad():
        run = model.run(ids, attention_mask=task.attention_mask, cache=sites)
        hidden = torch.stack([run.cache[s][rows, task.answer_pos] for s in sites], dim=1)  # (N, L, d_model)
        logits = model.unembed(hidden).double()  # (N, L, V)
    answer = logits.gather(-1, task.answer_ids[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]  # (N, L)
    wrong = logits.gather(-1, task.wrong_ids[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    rank = (logits > answer[..., None]).sum(-1) + 1
    return logits.argmax(-1), rank, answer - wrong


def _restored(model: Model, task: Task, run: str) -> Tensor:
    """(N, L): per prompt and layer, the fraction of the other run's metric its context restores when the answer
    position's resid_post[ℓ] comes from `run` — one patching sweep per prompt (its own normalization)."""
    direction: Direction = "noise" if run == "corrupt" else "denoise"  # base = the other run, source = `run`
    out = torch.full((task.n, model.n_layers), float("nan"), dtype=torch.float64)
    for i in range(task.n):
        one = task.rows([i])
        pos = int(one.answer_pos[0])
        scores = patch(model, one, sites="resid_post", positions=[pos], direction=direction, progress=False)
        patched = scores.values.reshape(model.n_layers).double()
        clean_m, corrupt_m = float(scores.meta["clean_metric"]), float(scores.meta["corrupt_metric"])
        base, source = (clean_m, corrupt_m) if run == "corrupt" else (corrupt_m, clean_m)
        if abs(base - source) > 1e-9:
            out[i] = (patched - source) / (base - source)
    return out


def commitment(
    model: Model, task: Task, run: Literal["clean", "corrupt"] = "clean", threshold: float = 0.5
) -> Commitment:
    """Commitment layers of every prompt of `task` on its `run` ("clean" or "corrupt"); see the module doc.

    threshold: the restored fraction below which the other run's context counts as no longer restoring its answer.
    """
    if run not in ("clean", "corrupt"):
        raise PathlensError(f"run={run!r}: use 'clean' or 'corrupt' (the run whose commitment is measured).")
    if not 0.0 < threshold < 1.0:
        raise PathlensError(f"threshold={threshold!r}: pass a fraction strictly between 0 and 1, e.g. 0.5.")
    task.check_vocab(model.vocab_size)
    ids = task.clean_ids if run == "clean" else task.corrupt_ids
    top1, rank, diff = _lens_at_answer(model, task, ids)
    restored = _restored(model, task, run)
    final_sign = diff[:, -1:].sign()
    prefers = (diff.sign() == final_sign) & (final_sign != 0)
    settled = restored < threshold  # NaN compares False: an undefined fraction never settles
    stable = first_settled(top1 == top1[:, -1:])
    answer_top1 = first_settled(rank == 1)
    lens_prefers = first_settled(prefers)
    patch_settled = first_settled(settled)
    both = torch.maximum(lens_prefers, patch_settled)  # NaN if either is
    per_prompt = torch.stack([stable, answer_top1, lens_prefers, patch_settled, both], dim=1)
    layers = list(range(model.n_layers))
    meta = {"model": model.name, "task": task.name, "run": run, "threshold": threshold, "n_prompts": task.n}
    grid = {"prompt": list(range(task.n)), "layer": layers}
    return Commitment(
        per_prompt=Scores(
            per_prompt,
            ("prompt", "measure"),
            {"prompt": grid["prompt"], "measure": list(MEASURES)},
            "layer",
            "commitment",
            meta,
        ),
        answer_rank=Scores(rank.double(), ("prompt", "layer"), grid, "answer_rank", "logit_lens", meta),
        lens_logit_diff=Scores(diff, ("prompt", "layer"), grid, "logit_diff", "logit_lens", meta),
        restored=Scores(restored, ("prompt", "layer"), grid, "restored_fraction", f"patch:{run}-answer-pos", meta),
    )
