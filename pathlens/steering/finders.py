"""Finders: steering vectors from contrast data, at any site and token position.

Contrast data are two sets of prompts — `positive` (the concept present) and `negative` (absent or opposite),
paired row by row or not. Each finder reads the sites' activations at one token position of every prompt
(`read_activations`: each row's last real token by default, an explicit row-relative position, or the mean over
the row's real tokens) and returns a `SteeringVector` whose metadata records the model, sites, method, data,
position and date, and whose `norms` hold each site's typical activation norm at the read position (for
`normalize=True`).

- `mean_difference` (ActAdd / CAA): mean(positive) − mean(negative); `ab_prompts` builds CAA's A/B form (the
  question followed by the matching vs the other answer letter, read at the letter).
- `pca_direction` (RepE, repeng's pca_diff): first principal component of the paired differences (centred, as a
  PCA is), signed so that positive projects above negative in most pairs, one per site; its length is the mean
  paired difference along it, so it is on the scale of the mean difference.
- `probe_direction`: the weight direction of an L2-regularized logistic regression separating the sets, signed
  and sized the same way.
- `select_layer`: each candidate site's vector scored by how well it separates held-out contrast data.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention
from pathlens.model import Model
from pathlens.sites import parse_site
from pathlens.steering.vector import SteeringVector

ReadAt = int | Literal["last", "mean"]
Method = Literal["mean-diff", "pca", "probe"]


def layer_sites(model: Model, kind: str = "resid_post", layers: Sequence[int] | None = None) -> list[str]:
    """Site names of one kind at the given layers (all layers by default): ["L0.resid_post", ...]."""
    chosen = range(model.n_layers) if layers is None else layers
    return [str(model.resolve(f"L{layer}.{kind}")) for layer in chosen]


def read_activations(
    model: Model,
    prompts: Sequence[str],
    sites: "str | Sequence[str]",
    at: ReadAt = "last",
    batch_size: int = 32,
    interventions: Sequence[Intervention] = (),
) -> dict[str, Tensor]:
    """Each site's activation (N, d) at position `at` of every prompt: "last" (each row's last real token), an
    integer (row-relative; negatives from the row's end), or "mean" (over the row's real tokens); read from runs
    made under `interventions` (e.g. a directional ablation), which must not select rows."""
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise PathlensError("read_activations: sites is empty; name at least one site (e.g. 'L10.resid_post').")
    if isinstance(at, str) and at not in ("last", "mean"):
        raise PathlensError(f"read position {at!r} is not 'last', 'mean' or an integer position.")
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        ids, mask = model.tokenize(chunk)
        lengths = mask.sum(1)  # (b,)
        if isinstance(at, int):
            bad = [i for i, n in enumerate(lengths.tolist()) if not -n <= at < n]
            if bad:
                i = bad[0]
                raise PathlensError(
                    f"read position {at} is outside prompt {start + i} ({chunk[i]!r}, {int(lengths[i])} tokens); "
                    "give a position every prompt has (negative positions count from the end)."
                )
        with torch.no_grad():
            cache = model.run(ids, attention_mask=mask, cache=names, interventions=interventions).cache
        rows = torch.arange(ids.shape[0])
        for name in names:
            value = cache[name].float()  # (b, p, d)
            if at == "mean":
                m = mask[..., None].to(value)
                out[name].append((value * m).sum(1) / m.sum(1))
            else:
                col = lengths - 1 if at == "last" else (torch.full_like(lengths, at) % lengths)
                out[name].append(value[rows, col])
    return {name: torch.cat(parts) for name, parts in out.items()}


def _checked(positive: Sequence[str], negative: Sequence[str], paired: bool) -> None:
    for what, prompts in (("positive", positive), ("negative", negative)):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise PathlensError(f"the {what} contrast set must be a list of texts, got {type(prompts).__name__}.")
        if len(prompts) == 0:
            raise PathlensError(f"the {what} contrast set is empty; give at least one prompt (pairs for PCA).")
    if paired and len(positive) != len(negative):
        raise PathlensError(
            f"paired contrast data: {len(positive)} positive but {len(negative)} negative prompts; give one negative "
            "prompt per positive one."
        )


def _contrast(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    sites: "str | Sequence[str]",
    at: ReadAt,
    paired: bool,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The checked contrast sets' activations at every site: (positive, negative), each site → (N, d)."""
    _checked(positive, negative, paired=paired)
    return read_activations(model, positive, sites, at), read_activations(model, negative, sites, at)


def _vector(
    model: Model,
    directions: dict[str, Tensor],
    acts: tuple[dict[str, Tensor], dict[str, Tensor]],
    method: str,
    data: str,
    at: ReadAt,
    **meta: Any,
) -> SteeringVector:
    pos, neg = acts
    norms = {s: float(torch.cat([pos[s], neg[s]]).norm(dim=-1).mean()) for s in directions}
    sites = list(directions)
    record = {
        "model": model.name,
        "site": sites[0] if len(sites) == 1 else sites,
        "method": method,
        "data": data,
        "read_at": at,
        "n_positive": int(next(iter(pos.values())).shape[0]),
        "n_negative": int(next(iter(neg.values())).shape[0]),
        "date": datetime.date.today().isoformat(),
        **meta,
    }
    return SteeringVector({s: v.float() for s, v in directions.items()}, norms=norms, meta=record)


def mean_difference(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    sites: "str | Sequence[str]",
    at: ReadAt = "last",
    data: str = "",
    method: str = "mean-diff",
) -> SteeringVector:
    """Difference in means (ActAdd with one pair, CAA with A/B prompts): mean_pos h − mean_neg h at each site.
    The sets need not be paired or of equal size."""
    pos, neg = _contrast(model, positive, negative, sites, at, paired=False)
    directions = {s: pos[s].mean(0) - neg[s].mean(0) for s in pos}
    return _vector(model, directions, (pos, neg), method, data, at)


def ab_prompts(
    questions: Sequence[str],
    matching: Sequence[str],
    other: Sequence[str],
    template: str = "{question}\nAnswer: ({letter}",
) -> tuple[list[str], list[str]]:
    """CAA's A/B form: each question followed by the letter of the answer that shows the behaviour (positive) and
    by the other letter (negative); read at the last token (the letter) with `mean_difference(..., at="last")`."""
    if not (len(questions) == len(matching) == len(other)):
        raise PathlensError(
            f"ab_prompts: {len(questions)} questions, {len(matching)} matching and {len(other)} other letters; give "
            "one of each per question."
        )
    positive = [template.format(question=q, letter=a) for q, a in zip(questions, matching, strict=True)]
    negative = [template.format(question=q, letter=b) for q, b in zip(questions, other, strict=True)]
    return positive, negative


def _signed(direction: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """`direction` (unit) flipped so that positive projects above negative in most pairs (or, unpaired, on
    average), and sized by the mean difference along it."""
    if pos.shape[0] == neg.shape[0]:
        above = int(((pos - neg) @ direction > 0).sum())
        flip = above * 2 < pos.shape[0]
    else:
        flip = float((pos.mean(0) - neg.mean(0)) @ direction) < 0
    direction = -direction if flip else direction
    size = float((pos.mean(0) - neg.mean(0)) @ direction)
    return direction * abs(size)


def pca_direction(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    sites: "str | Sequence[str]",
    at: ReadAt = "last",
    data: str = "",
) -> SteeringVector:
    """RepE control vector (repeng's pca_diff), one per site: the first principal component of the paired
    differences h(pos_i) − h(neg_i), signed to follow the contrast, at the size of the mean difference along it."""
    pos, neg = _contrast(model, positive, negative, sites, at, paired=True)
    directions = {}
    for s in pos:
        diffs = (pos[s] - neg[s]).double()  # (N, d)
        centred = diffs - diffs.mean(0) if diffs.shape[0] > 1 else diffs
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        directions[s] = _signed(vh[0], pos[s].double(), neg[s].double())
    return _vector(model, directions, (pos, neg), "pca", data, at)


def _logistic_weights(x: Tensor, y: Tensor, l2: float, steps: int) -> Tensor:
    """Weights (d,) of an L2-regularized logistic regression on standardized features, mapped back to the
    original coordinates (w / std)."""
    w, _, _, std = _fit_logistic(x, y, l2, steps)
    return w / std


def _fit_logistic(x: Tensor, y: Tensor, l2: float, steps: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An L2-regularized logistic regression on standardized features: weights (d,) and bias on the standardized
    scale, and the mean and std (d,) that standardize."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=z.dtype, requires_grad=True)
    b = torch.zeros((), dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)  # type: ignore[no-untyped-call]
    return w.detach(), b.detach(), mean, std


def probe_accuracy(
    positive: Tensor, negative: Tensor, folds: int = 4, l2: float = 1e-2, steps: int = 200, seed: int = 0
) -> float:
    """Held-out accuracy of a logistic probe freshly trained to tell `positive` (N, d) from `negative` (M, d)
    activations: `folds`-fold cross-validation over a seeded shuffle; paired sets (N == M) keep each pair in one
    fold, so a probe is never tested on the twin of a training prompt. Chance is 0.5 for balanced sets."""
    n, m = int(positive.shape[0]), int(negative.shape[0])
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= min(n, m):
        raise PathlensError(
            f"probe_accuracy: folds must be an integer in 2..{min(n, m)} (the smaller set), got {folds}."
        )
    g = torch.Generator().manual_seed(seed)
    pos_fold = torch.randperm(n, generator=g) % folds
    neg_fold = pos_fold.clone() if n == m else torch.randperm(m, generator=g) % folds
    correct = 0
    for k in range(folds):
        x = torch.cat([positive[pos_fold != k], negative[neg_fold != k]]).double()
        y = torch.cat([torch.ones(int((pos_fold != k).sum())), torch.zeros(int((neg_fold != k).sum()))]).double()
        w, b, mean, std = _fit_logistic(x, y, l2, steps)
        for acts, label in ((positive[pos_fold == k], True), (negative[neg_fold == k], False)):
            predicted = ((acts.double() - mean) / std) @ w + b > 0
            correct += int((predicted == label).sum())
    return correct / (n + m)


def probe_direction(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    sites: "str | Sequence[str]",
    at: ReadAt = "last",
    data: str = "",
    l2: float = 1e-2,
    steps: int = 200,
) -> SteeringVector:
    """A logistic probe's direction at each site (positive = 1): the unit weight vector, signed to follow the
    contrast and sized by the mean difference along it."""
    pos, neg = _contrast(model, positive, negative, sites, at, paired=False)
    directions = {}
    for s in pos:
        x = torch.cat([pos[s], neg[s]]).double()
        y = torch.cat([torch.ones(pos[s].shape[0]), torch.zeros(neg[s].shape[0])]).double()
        w = _logistic_weights(x, y, l2, steps)
        if float(w.norm()) == 0.0:
            raise PathlensError(f"probe_direction: the probe at {s} learned nothing (zero weights); add contrast data.")
        directions[s] = _signed(w / w.norm(), pos[s].double(), neg[s].double())
    return _vector(model, directions, (pos, neg), "probe", data, at, l2=l2)


FINDERS: dict[str, Callable[..., SteeringVector]] = {
    "mean-diff": mean_difference,
    "pca": pca_direction,
    "probe": probe_direction,
}


def find(
    model: Model,
    method: str,
    positive: Sequence[str],
    negative: Sequence[str],
    sites: "str | Sequence[str]",
    at: ReadAt = "last",
    data: str = "",
) -> SteeringVector:
    """The finder named `method` ("mean-diff", "pca" or "probe")."""
    if method not in FINDERS:
        raise PathlensError(f"unknown steering method {method!r}; use one of {sorted(FINDERS)}.")
    return FINDERS[method](model, positive, negative, sites, at=at, data=data)


def separation(vec: SteeringVector, site: str, pos: Tensor, neg: Tensor) -> dict[str, float]:
    """How well `vec`'s direction at `site` separates held-out activations: accuracy of the threshold halfway
    between the two sets' mean projections, and d' (difference of mean projections over their pooled std)."""
    direction = vec.vectors[site].double()
    direction = direction / direction.norm()
    p, n = pos.double() @ direction, neg.double() @ direction
    threshold = (p.mean() + n.mean()) / 2
    correct = int((p > threshold).sum()) + int((n <= threshold).sum())
    pooled = torch.cat([p - p.mean(), n - n.mean()]).std().clamp_min(1e-12)
    return {"accuracy": correct / (p.numel() + n.numel()), "d_prime": float((p.mean() - n.mean()) / pooled)}


def select_layer(
    model: Model,
    train: tuple[Sequence[str], Sequence[str]],
    held_out: tuple[Sequence[str], Sequence[str]],
    kind: str = "resid_post",
    layers: Sequence[int] | None = None,
    method: str = "mean-diff",
    at: ReadAt = "last",
    effect: Callable[[SteeringVector], float] | None = None,
) -> pd.DataFrame:
    """Score each layer's vector (found on `train`) by how well it separates `held_out` contrast data, and — when
    `effect` is given (e.g. a concept score of steered generations) — by its steering effect. Rows sorted best
    first by d' (then effect); columns layer, site, accuracy, d_prime[, effect]."""
    sites = layer_sites(model, kind, layers)
    _checked(*held_out, paired=False)
    vec = find(model, method, train[0], train[1], sites, at=at)
    pos = read_activations(model, held_out[0], sites, at)
    neg = read_activations(model, held_out[1], sites, at)
    rows = []
    for site in sites:
        row: dict[str, Any] = {"layer": parse_site(site).layer, "site": site}
        row.update(separation(vec, site, pos[site], neg[site]))
        if effect is not None:
            one = SteeringVector({site: vec.vectors[site]}, norms={site: vec.norms[site]}, meta=vec.meta)
            row["effect"] = float(effect(one))
        rows.append(row)
    table = pd.DataFrame(rows)
    order = ["d_prime", "effect"] if effect is not None else ["d_prime"]
    return table.sort_values(order, ascending=False, ignore_index=True)
