"""Local Interaction Basis (Bushnaq et al. 2024; METHODS §14): per layer, a basis of the residual stream that is
whitened by the layer's Gram matrix and aligned with what the next layer's features depend on, with the PCA basis
as the baseline; and how many directions of each can be ablated with little loss.

Layers are the residual stream entering each block, resid_pre[0..L−1], and the final residual stream resid_post[L−1];
the output is the logits. Working backwards from the output (row vectors f of width d, over every real position):

1. Gram. G = E[f fᵀ] = U D Uᵀ (not centred), directions with λ < `eps` · λ_max dropped.
2. Jacobian. M′ = E_x Σ_{t′,t} J_{t′t}ᵀ S_{next}ᵀ S_{next} J_{t′t}, with J_{t′t} = ∂f_{next}(t′)/∂f(t) the point
   Jacobian (METHODS' integrated-gradient Jacobian with n_intervals = 0) summed over output and input positions,
   and S_{next} the next layer's scaled feature map (for the logits: their whitened Gram basis, unscaled).
   M = D^{1/2} Uᵀ M′ U D^{1/2} = V Λ Vᵀ, eigenvalues Λ sorted descending.
3. Basis. Features f̂ = C⁺ f with C⁺ = Vᵀ D^{−1/2} Uᵀ (rows are directions; C⁺ G C⁺ᵀ = I: whitened) and
   C = U D^{1/2} V (so C C⁺ projects onto the kept span); S = Λ^{1/2} C⁺ scales each feature by its importance.

Ablation: keep the top-m directions, f ← C_{:, :m} C⁺_{:m} f (LIB: the least important features set to zero) or
f ← μ + P_m P_mᵀ (f − μ) (PCA of the centred activations: the least-variance directions set to their mean), as a
`Replace` at that layer; the loss increase per number of ablated directions, and the most directions whose ablation
raises the loss by at most `tolerance`.

Not done here: the biases folded in as a constant feature, and the integrated-gradient Jacobian (n_intervals > 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.progress import Progress
from torch import Tensor

from pathlens.diagnostics.inputs import token_inputs
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.model import Model
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.sites import Site

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(logits (b, p, V), ids (b, p), mask (b, p)) → scalar loss."""


def next_token_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over real (input, next) pairs."""
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    return nll[keep].mean()


def second_copy_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of the predictable tokens of repeated sequences [BOS?, r, r] (r_2..r_T of the second copy):
    the loss an induction circuit lowers."""
    total = int(ids.shape[1])
    prefix = total % 2
    t_len = (total - prefix) // 2
    at = torch.arange(prefix + t_len, total - 1)  # positions predicting r_2..r_T
    return torch.nn.functional.cross_entropy(logits[:, at].double().transpose(1, 2), ids[:, at + 1])


@dataclass(frozen=True)
class Basis:
    """One layer's basis: `inverse` C⁺ (k, d) maps activations to features, `basis` C (d, k) maps them back;
    `importance` (k,) the eigenvalues Λ (LIB) or variances (PCA), descending; `mean` (d,) subtracted first (PCA)."""

    inverse: Tensor
    basis: Tensor
    importance: Tensor
    mean: Tensor

    def keep(self, m: int, f: Tensor) -> Tensor:
        """`f` (..., d) with every feature but the top `m` ablated (set to zero around `mean`)."""
        centred = f.double() - self.mean
        return (self.mean + (centred @ self.inverse[:m].T) @ self.basis[:, :m].T).to(f.dtype)


@dataclass(frozen=True)
class LIB:
    """LIB and PCA bases of every layer, and the ablation curves.

    importance: Scores (basis, site, direction) — Λ (LIB) or variance (PCA) per direction, NaN past the kept ones.
    ablation: Scores (basis, site, ablated) — loss increase with the `ablated` least important directions removed.
    ablatable: Scores (basis, site) — the most directions removable with a loss increase ≤ `tolerance`.
    bases: {basis: {site: Basis}} (saved as safetensors with the Scores).
    """

    importance: Scores
    ablation: Scores
    ablatable: Scores
    bases: dict[str, dict[str, Basis]]

    def table(self) -> pd.DataFrame:
        """Per site: directions kept by the Gram cut, and how many each basis can ablate."""
        frame = self.ablatable.to_frame().pivot(index="site", columns="basis", values="value")
        frame.columns = [f"ablatable_{c}" for c in frame.columns]
        kept = {s: int(b.inverse.shape[0]) for s, b in self.bases["lib"].items()}
        frame.insert(0, "kept_directions", [kept[s] for s in frame.index])
        return frame.reindex(self.ablatable.coords["site"]).reset_index()

    def save(self, folder: str | os.PathLike[str]) -> Path:
        out = Path(os.fspath(folder))
        for name in ("importance", "ablation", "ablatable"):
            getattr(self, name).save(out / name)
        for kind, per_site in self.bases.items():
            for site, b in per_site.items():
                for part in ("inverse", "basis", "importance", "mean"):
                    value = getattr(b, part)
                    dims = (
                        ("direction", "dim")
                        if part == "inverse"
                        else ("dim", "direction")
                        if part == "basis"
                        else (("direction",) if part == "importance" else ("dim",))
                    )
                    coords = {d: list(range(n)) for d, n in zip(dims, value.shape, strict=True)}
                    Scores(value, dims, coords, part, f"lib:{kind}", {"site": site}).save(out / kind / site / part)
        write_text(out / "lib.json", json.dumps({"format": "pathlens.LIB", "sites": self.ablatable.coords["site"]}))
        return out

    def plot(self, path: str | os.PathLike[str] | None = None, title: str | None = None) -> Figure:
        """Loss increase against directions ablated, one panel per site, LIB vs PCA."""
        sites = self.ablation.coords["site"]
        fig = Figure(figsize=(3.2 * len(sites), 3.2), layout="constrained")
        FigureCanvasAgg(fig)
        axes = np.atleast_1d(fig.subplots(1, len(sites), sharey=True))
        grid = self.ablation.coords["ablated"]
        for ax, site in zip(axes, sites, strict=True):
            for kind in self.ablation.coords["basis"]:
                ax.plot(grid, self.ablation.sel(basis=kind, site=site).values.numpy(), marker=".", label=kind)
            ax.axhline(float(self.ablation.meta["tolerance"]), color="0.5", linestyle=":")
            ax.set_title(site, fontsize=9)
            ax.set_xlabel("directions ablated")
        axes[0].set_ylabel("loss increase (nats)")
        axes[0].legend(fontsize=8)
        fig.suptitle(title or f"LIB vs PCA ablation ({self.ablation.meta.get('model', '')})")
        if path is not None:
            fig.savefig(os.fspath(path), dpi=150)
        return fig


def _layer_sites(model: Model) -> list[Site]:
    return [Site("resid_pre", layer) for layer in range(model.n_layers)] + [Site("resid_post", model.n_layers - 1)]


def _gram(f: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Eigenvectors U (d, k) and eigenvalues D (k,) of E[f fᵀ] over rows of f (N, d), descending, λ ≥ eps · λ_max."""
    g = f.T @ f / f.shape[0]  # (d, d)
    values, vectors = torch.linalg.eigh(g)
    order = values.argsort(descending=True)
    values, vectors = values[order], vectors[:, order]
    kept = values >= eps * values[0]
    return vectors[:, kept], values[kept]


def _forward_from(model: Model, site: Site, x: Tensor, ids: Tensor, mask: Tensor, target: Site | None) -> Tensor:
    """The next layer's activations (or, `target` None, the logits) as a function of `x` at `site`."""
    cache = [] if target is None else [target]
    run = model.run(ids, attention_mask=mask, interventions=[Intervention(site, Replace(x))], cache=cache, grad=True)
    return run.logits if target is None else run.cache[target]


def _interaction(
    model: Model,
    site: Site,
    target: Site | None,
    scaled: Tensor,
    ids: Tensor,
    mask: Tensor,
    base: Tensor,
    chunk: int = 64,
) -> Tensor:
    """M′ = Σ_x Σ_{t′,t} J_{t′t}ᵀ SᵀS J_{t′t} / N_tokens: one vector-Jacobian product per output position and
    feature, `chunk` of them batched into one backward."""
    x = base.detach().double().requires_grad_(True)
    with torch.enable_grad():
        out = _forward_from(model, site, x.to(base.dtype), ids, mask, target)  # (b, p, d_out)
        features = out.double() @ scaled.T  # (b, p, k_out)
        real = mask.bool()
        b, p, k_out = features.shape
        m = torch.zeros(base.shape[-1], base.shape[-1], dtype=torch.float64)
        outputs = [(t_out, k) for t_out in range(p) for k in range(k_out)]
        for start in range(0, len(outputs), chunk):
            part = outputs[start : start + chunk]
            probes = torch.zeros(len(part), b, p, k_out, dtype=torch.float64)  # one output feature per probe
            for i, (t_out, k) in enumerate(part):
                probes[i, :, t_out, k] = real[:, t_out].double()
            (grads,) = torch.autograd.grad(features, x, probes, retain_graph=True, is_grads_batched=True)
            grads = grads[:, real]  # (probes, n_real, d): rows are apart, so each row's grad is its own
            m += torch.einsum("ntd,nte->de", grads, grads)
    return m / float(real.sum())


def lib(
    model: Model,
    prompts: object,
    *,
    attention_mask: Tensor | None = None,
    loss: Loss = next_token_loss,
    eps: float = 1e-5,
    tolerance: float = 0.05,
    grid: Sequence[int] | None = None,
    sites: Sequence[Site | str] | None = None,
    progress: bool = False,
) -> LIB:
    """LIB and PCA bases of every residual-stream layer of `model` on `prompts` (ids (b, p) or texts), and the loss
    increase (under `loss`, default next-token cross-entropy) when the least important directions are ablated.

    grid: numbers of ablated directions to try (default: 0, powers of two and multiples of d/8 up to d).
    sites: a subset of the layers (resid_pre[l] or the final resid_post); the Jacobians still run from the output
    back through every later layer.
    Cost: one backward per (output position, output feature) per layer — meant for small models.
    """
    ids, mask = token_inputs(model, prompts, attention_mask)
    layers = _layer_sites(model)
    chosen = layers if sites is None else [model.resolve(s) for s in sites]
    for wanted in chosen:
        if wanted not in layers:
            raise PathlensError(
                f"sites: {wanted} is not a LIB layer; use resid_pre[0..L-1] or L{model.n_layers - 1}.resid_post."
            )
    with torch.no_grad():
        run = model.run(ids, attention_mask=mask, cache=layers)
        base_loss = float(loss(run.logits, ids, mask))
    real = mask.bool()
    # the output basis: the logits' whitened Gram basis, unscaled
    u, d = _gram(run.logits.double()[real], eps)
    scaled_next = (u / d.sqrt()).T  # (k, V)
    bases: dict[str, dict[str, Basis]] = {"lib": {}, "pca": {}}
    needed = layers[layers.index(min(chosen, key=layers.index)) :]
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task("LIB: Jacobians from the output back", total=len(needed))
        for i in range(len(needed) - 1, -1, -1):
            site = needed[i]
            target = needed[i + 1] if i + 1 < len(needed) else None
            f = run.cache[site].double()
            u, dvals = _gram(f[real], eps)
            m_prime = _interaction(model, site, target, scaled_next, ids, mask, run.cache[site])
            half = u * dvals.sqrt()  # (d, k) = U D^{1/2}
            values, vectors = torch.linalg.eigh(half.T @ m_prime @ half)
            order = values.argsort(descending=True)
            values, vectors = values[order].clamp(min=0.0), vectors[:, order]
            inverse = vectors.T @ (u / dvals.sqrt()).T  # (k, d) = Vᵀ D^{-1/2} Uᵀ
            bases["lib"][str(site)] = Basis(
                inverse, half @ vectors, values, torch.zeros(f.shape[-1], dtype=torch.float64)
            )
            scaled_next = values.sqrt()[:, None] * inverse  # S = Λ^{1/2} C⁺
            mean = f[real].mean(0)
            cov = (f[real] - mean).T @ (f[real] - mean) / real.sum()
            pvals, pvecs = torch.linalg.eigh(cov)
            porder = pvals.argsort(descending=True)
            bases["pca"][str(site)] = Basis(pvecs[:, porder].T, pvecs[:, porder], pvals[porder], mean)
            bar.advance(job)
    width = int(run.cache[layers[0]].shape[-1])
    default = [2**j for j in range(int(np.log2(width)) + 1)] + [width * i // 8 for i in range(1, 8)]
    steps = sorted({0, width, *(grid or default)})
    curves = torch.full((2, len(chosen), len(steps)), float("nan"), dtype=torch.float64)
    importance = torch.full((2, len(chosen), width), float("nan"), dtype=torch.float64)
    counts = torch.zeros(2, len(chosen), dtype=torch.float64)
    with torch.no_grad():
        for b, kind in enumerate(("lib", "pca")):
            for s, site in enumerate(chosen):
                basis = bases[kind][str(site)]
                k = int(basis.inverse.shape[0])
                importance[b, s, :k] = basis.importance
                for j, ablated in enumerate(steps):
                    kept = max(k - ablated, 0) if kind == "lib" else max(width - ablated, 0)
                    patched = basis.keep(kept, run.cache[site])
                    logits = model.run(
                        ids, attention_mask=mask, interventions=[Intervention(site, Replace(patched))]
                    ).logits
                    curves[b, s, j] = float(loss(logits, ids, mask)) - base_loss
                ok = [a for a, c in zip(steps, curves[b, s].tolist(), strict=True) if c <= tolerance]
                counts[b, s] = max(ok) if ok else 0
    names = [str(s) for s in chosen]
    meta = {"model": model.name, "tolerance": tolerance, "eps": eps, "base_loss": base_loss, "tokens": int(real.sum())}
    return LIB(
        importance=Scores(
            importance,
            ("basis", "site", "direction"),
            {"basis": ["lib", "pca"], "site": names, "direction": list(range(width))},
            "importance",
            "lib",
            meta,
        ),
        ablation=Scores(
            curves,
            ("basis", "site", "ablated"),
            {"basis": ["lib", "pca"], "site": names, "ablated": steps},
            "loss_increase",
            "lib",
            meta,
        ),
        ablatable=Scores(
            counts, ("basis", "site"), {"basis": ["lib", "pca"], "site": names}, "directions", "lib", meta
        ),
        bases={kind: {k: v for k, v in per.items() if k in names} for kind, per in bases.items()},
    )
