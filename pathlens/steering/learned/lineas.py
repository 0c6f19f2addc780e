"""LinEAS (Rodriguez et al., "End-to-end Learning of Activation Steering with a Distributional Loss"): per-site
diagonal affine maps trained jointly, end to end, so that the steered source activations are distributed as the
target's, with a sparse-group-lasso that chooses the sites and units that need to move.

Each chosen site s gets x ← (1 + δ_s) ⊙ x + b_s (δ = ω − 1; identity at start). One training step:
1. source activations ξ_s: the source texts run with *every* current map applied (`model.run` with grad; each site
   read after its own map, i.e. the value the model goes on with), pooled per text (mean over real tokens);
2. loss C = Σ_s Δ(ξ_s, η_s), with η_s the *unsteered* model's pooled activations of the target texts (computed
   once) and Δ the per-coordinate 1-D squared W2 distance averaged over the site's units (`ot.wasserstein2`:
   sorted source against the target's matched quantiles) — METHODS.md's default; the official code's mean over
   sites instead of the sum only rescales the penalties by the number of sites;
3. an Adam step on (δ, b) (the model's parameters are frozen for the duration and restored afterwards);
4. a proximal step at threshold τ = the step's learning rate (cosine-decayed to lr·1e-3, as the official code):
   soft-threshold every entry at τ·l1, then shrink each group — δ_s and b_s separately — by
   max(0, 1 − τ·group·√d_s / ‖v‖₂) (sparse group lasso). Deviations the penalty dominates become exactly 0, so a
   zero means "no intervention" and the steer reports which sites and units stay active.
Training is deterministic given `seed` (which draws the minibatches when the source set is larger than
`batch_size`); the model is bit-identical afterwards, with no gradient left on it.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Affine, Intervention
from pathlens.model import Model
from pathlens.sites import parse_site
from pathlens.steering.learned.activations import check_pooling, check_texts, pooled
from pathlens.steering.learned.ot import matched_quantiles, wasserstein2
from pathlens.steering.learned.transport import AffineMap, TransportSteer, check_strength
from pathlens.steering.vector import site_width

Params = dict[str, tuple[Tensor, Tensor]]
"""site -> (δ (d,), b (d,)): the deviation of each map from the identity."""


def prox_sparse_group(v: Tensor, l1: float, group: float) -> Tensor:
    """The sparse-group-lasso proximal step on one group `v` (d,): soft-threshold each entry at `l1`, then scale the
    group by max(0, 1 − group·√d / ‖v‖₂). Entries with |v| ≤ l1, and whole groups whose norm after the first step is
    at most group·√d, come out exactly 0."""
    shrunk = v.sign() * (v.abs() - l1).clamp_min(0)
    if group <= 0:
        return shrunk
    norm = float(shrunk.norm())
    limit = group * math.sqrt(v.numel())
    return torch.zeros_like(v) if norm <= limit else shrunk * (1 - limit / norm)


def train_maps(
    source_fn: Callable[[Params, int], dict[str, Tensor]],
    targets: Mapping[str, Tensor],
    *,
    steps: int,
    lr: float,
    l1: float = 0.0,
    group: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.99),
) -> tuple[Params, list[float]]:
    """The LinEAS optimisation, independent of any model: `source_fn(params, step)` returns each site's source
    samples (n, d) with the current maps applied (in the autograd graph); `targets` each site's target samples
    (M, d). Returns the trained (δ, b) per site and the loss before each step."""
    params: Params = {
        s: (torch.zeros(t.shape[1], requires_grad=True), torch.zeros(t.shape[1], requires_grad=True))
        for s, t in targets.items()
    }
    leaves = [p for pair in params.values() for p in pair]
    opt = torch.optim.Adam(leaves, lr=lr, betas=betas)
    floor = 1e-3
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * k / max(steps, 1)))
    )
    matched: dict[str, Tensor] = {}
    losses: list[float] = []
    for step in range(steps):
        samples = source_fn(params, step)
        loss = torch.zeros(())
        for s, z in samples.items():
            if s not in matched or matched[s].shape[0] != z.shape[0]:
                matched[s] = matched_quantiles(targets[s].detach().float(), z.shape[0])
            loss = loss + wasserstein2(z, matched[s])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        tau = opt.param_groups[0]["lr"]
        opt.step()
        with torch.no_grad():
            for p in leaves:
                p.copy_(prox_sparse_group(p, tau * l1, tau * group))
        schedule.step()
        losses.append(float(loss.detach()))
    return {s: (d.detach(), b.detach()) for s, (d, b) in params.items()}, losses


@contextmanager
def frozen(model: Model) -> Iterator[None]:
    """The model's parameters with requires_grad off inside the block (no gradient is computed or left on them);
    every flag is restored afterwards, also after an exception."""
    flags = [(p, p.requires_grad) for p in model.hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def map_interventions(params: Params) -> list[Intervention]:
    """One Affine (1 + δ, b) per site at every position: the maps as they are during training."""
    return [Intervention(parse_site(s), Affine(1 + d, b), positions="all") for s, (d, b) in params.items()]


def _check_number(value: object, what: str, positive: bool = False) -> float:
    number = check_strength(value, what)
    if number < 0 or (positive and number == 0):
        raise PathlensError(f"lineas: {what} must be {'positive' if positive else 'non-negative'}, got {value!r}.")
    return number


def lineas(
    model: Model,
    source: Sequence[str],
    target: Sequence[str],
    sites: Sequence[str] | str,
    *,
    steps: int = 200,
    lr: float = 1e-2,
    l1: float = 0.0,
    group: float = 0.0,
    pooling: str = "mean",
    batch_size: int = 32,
    seed: int = 0,
    strength: float = 1.0,
    data: str = "",
) -> TransportSteer:
    """Train LinEAS maps at `sites` moving the `source` set's activations onto the `target` set's (unpaired, any
    sizes of at least two); see the module docstring. `l1` and `group` are the sparse-group-lasso weights (0: no
    sparsity). Returns a `TransportSteer` at `strength` whose meta holds the losses, the training time and the
    active units per site."""
    src, tgt = check_texts(source, "source"), check_texts(target, "target")
    check_pooling(pooling)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PathlensError(f"lineas: steps must be a positive integer, got {steps!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise PathlensError(f"lineas: batch_size must be an integer of at least 2, got {batch_size!r}.")
    lr = _check_number(lr, "lr", positive=True)
    l1, group = _check_number(l1, "l1"), _check_number(group, "group")
    names = [sites] if isinstance(sites, str) else list(sites)
    if not names:
        raise PathlensError("lineas: sites is empty; name at least one site (e.g. 'L10.mlp_out').")
    resolved = [str(model.resolve(s, write=True)) for s in names]
    if len(set(resolved)) != len(resolved):
        raise PathlensError(f"lineas: sites {names} name a site twice; give each site once.")
    for s in resolved:
        site_width(model, parse_site(s))
    started = time.perf_counter()
    targets = pooled(model, tgt, resolved, pooling=pooling, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)

    def source_fn(params: Params, step: int) -> dict[str, Tensor]:
        chosen = src
        if len(src) > batch_size:
            chosen = [src[i] for i in torch.randperm(len(src), generator=gen)[:batch_size].tolist()]
        return pooled(model, chosen, resolved, map_interventions(params), pooling, grad=True, batch_size=batch_size)

    with frozen(model):
        params, losses = train_maps(source_fn, targets, steps=steps, lr=lr, l1=l1, group=group)
    seconds = time.perf_counter() - started
    maps = [AffineMap(s, 1 + d, b) for s, (d, b) in params.items()]
    steer = TransportSteer(maps, strength, "all")
    active = steer.active_units()
    meta = {
        "model": model.name,
        "method": "lineas",
        "sites": resolved,
        "pooling": pooling,
        "n_source": len(src),
        "n_target": len(tgt),
        "steps": steps,
        "lr": lr,
        "l1": l1,
        "group": group,
        "batch_size": batch_size,
        "seed": seed,
        "loss_start": losses[0],
        "loss_end": losses[-1],
        "losses": losses,
        "seconds": seconds,
        "active_units": int(active["active"].sum()),
        "total_units": int(active["width"].sum()),
        "active_sites": [str(r["site"]) for r in active.to_dict(orient="records") if r["active"] > 0],
        "data": data,
        "date": datetime.date.today().isoformat(),
    }
    return TransportSteer(maps, strength, "all", meta)
