"""Semi-NMF of MLP activations (METHODS §20; Shafran, Geiger, Geva, arXiv 2506.10920).

A ∈ R^{d×n} — one column per token, here the rows of an activation store — is factorized as A ≈ F Gᵀ with F (d×k)
of mixed sign (the features: directions in the site's space) and G (n×k) ≥ 0 (how much each token uses each
feature). The loop, as in the authors' code (METHODS-VERIFIED §20), for at most `max_iter` iterations:

1. F ← A G (GᵀG + 1e-6·I)⁻¹;
2. winner-take-all on each column of F: keep the entries with |F| ≥ the m-th largest, m = max(1, ⌈sparsity·d⌉);
3. normalize the columns of G to unit ℓ₂ (norms clamped at 1e-8) and fold the norms into F;
4. with P = AᵀF, Q = FᵀF and X± = (|X| ± X)/2: G ← G ⊙ sqrt((P⁺ + GQ⁻) / (P⁻ + GQ⁺ + 1e-6));
5. loss ‖A − FGᵀ‖²_F; a loss below the best by more than `tol` is an improvement; stop after `patience`
   iterations without one; the best F, G are kept.

Init: "random" (G ~ U(0,1) clamped at 1e-6), "svd" (G = V√Σ of the rank-k SVD, clamped at 1e-6) or "knn" (15
k-means iterations on the tokens, G one-hot clamped at 1e-6). F's initial value is never used: step 1 replaces it.

Batched: one pass over the rows per iteration, in chunks of `chunk_rows`, from a tensor or from an
`ActivationStore` (its shards are read again every iteration when the rows do not fit in `max_bytes`, so memory
stays bounded). Step 4 is row-wise, so each chunk's G rows are updated with P = X_c F, and the same pass
accumulates what step 1 of the next iteration needs (AG = Σ X_cᵀ G_c, GᵀG) and the loss through
‖A‖² − 2⟨G, AᵀF⟩ + ⟨FᵀF, GᵀG⟩ (in float64), so no full A, P or reconstruction is ever formed.

Features: `SNMFResult.features(model, store)` gives each feature its top-activating contexts (the tokens around
the rows where its G column is largest) and the tokens it promotes (its residual direction W_down z_i — for an MLP
neuron site — read through `Model.unembed`); `steering_vector(i)` returns a `SteeringVector` adding α·z_i/‖z_i‖ at
the site, as the authors steer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.arch.base import get_blocks, get_module
from pathlens.errors import PathlensError
from pathlens.features.store import ActivationStore
from pathlens.model import Model
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import parse_site
from pathlens.steering.vector import SteeringVector

__all__ = ["FORMAT", "INITS", "Context", "Feature", "SNMFResult", "snmf"]

FORMAT = "pathlens.SNMF"
INITS = ("random", "svd", "knn")
REG = 1e-6
EPS = 1e-6
KMEANS_ITERS = 15
DEFAULT_MAX_BYTES = 2 * 2**30
_RESIDUAL_KINDS = ("embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")

Chunks = Callable[[], Iterator[tuple[int, Tensor]]]
"""Yields (first row, rows (c, d)) over all rows, in order."""


@dataclass(frozen=True)
class Context:
    """One top-activating token of a feature: the text before it, the token, the text after, G's value there."""

    before: str
    token: str
    after: str
    activation: float
    window: int
    position: int

    def __str__(self) -> str:
        return f"{self.before}[[{self.token}]]{self.after}"


@dataclass(frozen=True)
class Feature:
    """A feature's index, its top contexts and the tokens its direction promotes (token, logit)."""

    index: int
    contexts: list[Context]
    promoted: list[tuple[str, float]]


@dataclass(eq=False)
class SNMFResult:
    """F (d, k): the features (columns, mixed sign); G (n, k) ≥ 0: their codes on the fitted rows; the loss per
    iteration; the site; provenance (model, store, rows, settings, best iteration)."""

    F: Tensor
    G: Tensor
    losses: list[float]
    site: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.F.shape[1])

    def direction(self, index: int) -> Tensor:
        """Feature `index` as a unit vector in the site's space (d,)."""
        self._check_index(index)
        z = self.F[:, index]
        return z / z.norm().clamp_min(torch.finfo(z.dtype).tiny)

    def residual_direction(self, model: Model, index: int) -> Tensor:
        """What feature `index` writes into the residual stream: W_down z_i for an MLP neuron site (the down
        projection without its bias), z_i itself for a residual-width site."""
        self._check_index(index)
        site = parse_site(self.site)
        z = self.F[:, index]
        if site.kind in _RESIDUAL_KINDS:
            return z
        if site.kind == "mlp_post" and site.layer is not None and model.arch.mlp_down is not None:
            block = get_blocks(model.hf, model.arch.blocks)[site.layer]
            down = get_module(block, model.arch.mlp_down)
            weight = next(down.parameters())
            with torch.no_grad():
                x = torch.stack([z, torch.zeros_like(z)]).to(weight)  # (2, d_mlp)
                out = down(x)  # (2, d_model)
            return (out[0] - out[1]).float()
        raise PathlensError(
            f"SNMF on {self.site}: only MLP neuron sites (mlp_post) and residual-width sites have a residual "
            "direction to read promoted tokens from."
        )

    def promoted_tokens(self, model: Model, index: int, top: int = 10) -> list[tuple[str, float]]:
        """The `top` tokens whose logits feature `index`'s residual direction raises most (through the model's
        final norm and unembedding, `Model.unembed`)."""
        direction = self.residual_direction(model, index)
        weight = next(model.hf.parameters())
        with torch.no_grad():
            logits = model.unembed(direction.to(weight)[None, None])[0, 0].float()  # (vocab,)
        values, ids = logits.topk(min(top, logits.numel()))
        return [(tok, float(v)) for tok, v in zip(model.to_str_tokens(ids), values, strict=True)]

    def top_contexts(
        self, store: ActivationStore, index: int, top: int = 8, before: int = 12, after: int = 3, tokenizer: Any = None
    ) -> list[Context]:
        """The `top` rows where feature `index`'s code is largest (at most one per window), with the tokens
        around each; `tokenizer` (default: none, ids shown as t<id>) decodes them."""
        self._check_index(index)
        codes = self.G[:, index]
        order = codes.argsort(descending=True)
        windows, positions = store.origin(order[: min(len(order), top * 20)])
        ids = store.window_ids()
        out: list[Context] = []
        used: set[int] = set()
        for row, window, position in zip(order.tolist(), windows.tolist(), positions.tolist(), strict=False):
            if window in used:
                continue
            used.add(window)
            w = ids[window]
            out.append(
                Context(
                    before=_decode(tokenizer, w[max(0, position - before) : position]),
                    token=_decode(tokenizer, w[position : position + 1]),
                    after=_decode(tokenizer, w[position + 1 : position + 1 + after]),
                    activation=float(codes[row]),
                    window=window,
                    position=position,
                )
            )
            if len(out) == top:
                break
        return out

    def features(
        self, model: Model, store: ActivationStore, top_contexts: int = 8, top_tokens: int = 10
    ) -> list[Feature]:
        """Every feature with its top contexts and promoted tokens."""
        promoted = _can_promote(self.site, model)
        return [
            Feature(
                index=i,
                contexts=self.top_contexts(store, i, top_contexts, tokenizer=model.tokenizer),
                promoted=self.promoted_tokens(model, i, top_tokens) if promoted else [],
            )
            for i in range(self.rank)
        ]

    def steering_vector(self, index: int, scale: float = 1.0) -> SteeringVector:
        """Feature `index` as a steering vector: α·z_i/‖z_i‖ added at the site at every position."""
        return SteeringVector(
            vectors={self.site: self.direction(index).float()},
            scale=scale,
            meta={
                **{k: v for k, v in self.meta.items() if k in ("model", "store")},
                "method": "snmf",
                "feature": index,
            },
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (F, G) and `<path>.json` (site, losses, provenance)."""
        tensors = {"F": self.F.detach().contiguous().cpu(), "G": self.G.detach().contiguous().cpu()}
        save_pair(path, FORMAT, tensors, {"site": self.site, "losses": self.losses, "meta": self.meta})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SNMFResult":
        tensors, header = load_pair(path, FORMAT, ["F", "G"], ["site", "losses", "meta"])
        return cls(
            F=tensors["F"], G=tensors["G"], losses=list(header["losses"]), site=header["site"], meta=header["meta"]
        )

    def _check_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.rank:
            raise PathlensError(
                f"feature {index!r} is out of range: this factorization has {self.rank} (0..{self.rank - 1})."
            )


def snmf(
    data: Tensor | ActivationStore,
    rank: int,
    *,
    site: str | None = None,
    rows: int | None = None,
    sparsity: float = 0.01,
    init: str | Tensor = "random",
    max_iter: int = 500,
    patience: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_rows: int = 8192,
    max_bytes: int = DEFAULT_MAX_BYTES,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, float], None] | None = None,
) -> SNMFResult:
    """Semi-NMF of `data` — a tensor (n, d) of rows (A = dataᵀ), or `site` of an `ActivationStore` (its first
    `rows` rows; the store's windows are already in random order) — at rank `rank`. See the module docstring.
    `init` is "random", "svd", "knn" or a starting G (rows, rank) ≥ 0. `progress(iteration, loss)` is called after
    every iteration."""
    source, n, d, meta = _source(data, site, rows, chunk_rows, max_bytes, dtype)
    _check_settings(rank, n, d, sparsity, init, max_iter, patience, tol)
    gen = torch.Generator().manual_seed(seed)
    G = _initial_codes(init, source, n, d, rank, gen, dtype)  # (n, k)
    norm2, AG, GtG = _first_pass(source, G)
    keep = max(1, math.ceil(sparsity * d))
    eye = torch.eye(rank, dtype=torch.float64)
    best = (math.inf, G.clone(), torch.zeros(d, rank, dtype=dtype), -1)
    losses: list[float] = []
    stale = 0
    for it in range(max_iter):
        F = torch.linalg.solve(GtG + REG * eye, AG.T).T.to(dtype)  # (d, k) = AG (GᵀG + reg·I)⁻¹
        F = _winner_take_all(F, keep)
        norms = GtG.diagonal().sqrt().clamp_min(1e-8).to(dtype)  # (k,) column norms of G
        G /= norms
        F *= norms
        Q = F.T @ F  # (k, k)
        Q_pos, Q_neg = (Q.abs() + Q) / 2, (Q.abs() - Q) / 2
        cross = torch.zeros((), dtype=torch.float64)
        AG = torch.zeros(d, rank, dtype=torch.float64)
        GtG = torch.zeros(rank, rank, dtype=torch.float64)
        for lo, X in source():
            g = G[lo : lo + X.shape[0]]  # (c, k), a view: updated in place
            P = X @ F  # (c, k)
            numerator = (P.abs() + P) / 2 + g @ Q_neg
            denominator = (P.abs() - P) / 2 + g @ Q_pos + EPS
            g.mul_(torch.sqrt(numerator / denominator))
            cross += (g * P).sum(dtype=torch.float64)
            AG += (X.T @ g).double()  # (d, k)
            GtG += (g.T @ g).double()  # (k, k)
        loss = float(norm2 - 2 * cross + (Q.double() * GtG).sum())
        losses.append(loss)
        if progress is not None:
            progress(it, loss)
        if loss < best[0] - tol:
            best, stale = (loss, G.clone(), F.clone(), it), 0
        else:
            stale += 1
            if stale >= patience:
                break
    settings = {
        "rank": rank,
        "sparsity": sparsity,
        "init": init if isinstance(init, str) else "given",
        "max_iter": max_iter,
        "patience": patience,
    }
    meta = {**meta, **settings, "tol": tol, "seed": seed, "best_iteration": best[3], "best_loss": best[0]}
    meta["fraction_variance_unexplained"] = best[0] / max(float(norm2), 1e-30)
    return SNMFResult(F=best[2], G=best[1], losses=losses, site=meta.get("site", site or "rows"), meta=meta)


def _winner_take_all(F: Tensor, keep: int) -> Tensor:
    """Each column of F with only its entries of |F| ≥ the column's `keep`-th largest |F| (ties keep more)."""
    if keep >= F.shape[0]:
        return F
    threshold = F.abs().topk(keep, dim=0).values[-1]  # (k,)
    return F * (F.abs() >= threshold)


def _first_pass(source: Chunks, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """‖A‖², A G (d, k) and GᵀG (k, k), in float64."""
    norm2 = torch.zeros((), dtype=torch.float64)
    AG = torch.zeros(0)
    for lo, X in source():
        part = (X.T @ G[lo : lo + X.shape[0]]).double()  # (d, k)
        AG = part if AG.numel() == 0 else AG + part
        norm2 += X.square().sum(dtype=torch.float64)
    return norm2, AG, (G.T @ G).double()


def _initial_codes(
    init: str | Tensor, source: Chunks, n: int, d: int, k: int, gen: torch.Generator, dtype: torch.dtype
) -> Tensor:
    if isinstance(init, Tensor):
        return init.detach().to(dtype).clone()
    if init == "random":
        return torch.rand(n, k, generator=gen, dtype=dtype).clamp_min(EPS)
    if init == "svd":
        # A = U S Vᵀ: U, S² from the eigendecomposition of A Aᵀ = Σ X_cᵀ X_c (d, d); G = V √S = X U / √S
        gram = torch.zeros(d, d, dtype=torch.float64)
        for _, X in source():
            gram += X.T.double() @ X.double()
        values, vectors = torch.linalg.eigh(gram)  # ascending
        U = vectors[:, -k:].flip(1)  # (d, k)
        S = values[-k:].flip(0).clamp_min(0).sqrt()  # (k,)
        scale = S.sqrt().clamp_min(1e-12)
        G = torch.cat([(X.double() @ U) / scale for _, X in source()])  # (n, k) = V √S
        return G.to(dtype).clamp_min(EPS)
    centres = _kmeans(source, n, d, k, gen)
    labels = torch.cat([_nearest(X.double(), centres) for _, X in source()])  # (n,)
    G = torch.full((n, k), EPS, dtype=dtype)
    G[torch.arange(n), labels] = 1.0
    return G


def _kmeans(source: Chunks, n: int, d: int, k: int, gen: torch.Generator) -> Tensor:
    """k centres (k, d) after `KMEANS_ITERS` Lloyd iterations from k distinct random rows; an empty cluster takes
    a random row."""
    picks = set(torch.randperm(n, generator=gen)[:k].tolist())
    centres = torch.cat([X[[i - lo for i in sorted(picks) if lo <= i < lo + len(X)]] for lo, X in source()]).double()
    for _ in range(KMEANS_ITERS):
        sums = torch.zeros(k, d, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        for _, X in source():
            labels = _nearest(X.double(), centres)
            sums.index_add_(0, labels, X.double())
            counts += torch.bincount(labels, minlength=k).double()
        empty = counts == 0
        centres = sums / counts.clamp_min(1)[:, None]
        if bool(empty.any()):
            rows = torch.randint(0, n, (int(empty.sum()),), generator=gen).tolist()
            centres[empty] = _rows_at(source, rows)
    return centres


def _nearest(X: Tensor, centres: Tensor) -> Tensor:
    distance = (centres * centres).sum(1)[None] - 2 * X @ centres.T  # (c, k), up to ‖x‖² per row
    return distance.argmin(1)


def _rows_at(source: Chunks, rows: list[int]) -> Tensor:
    found: dict[int, Tensor] = {}
    for lo, X in source():
        for r in rows:
            if lo <= r < lo + len(X):
                found[r] = X[r - lo].double()
    return torch.stack([found[r] for r in rows])


def _source(
    data: Tensor | ActivationStore,
    site: str | None,
    rows: int | None,
    chunk_rows: int,
    max_bytes: int,
    dtype: torch.dtype,
) -> tuple[Chunks, int, int, dict[str, Any]]:
    """The rows as chunks, their count and width, and provenance."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise PathlensError(f"chunk_rows={chunk_rows!r}; give a positive number of rows per chunk.")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise PathlensError(f"rows={rows!r}; give a positive number of rows or None (all).")
    if isinstance(data, ActivationStore):
        if site is None:
            if len(data.sites) != 1:
                raise PathlensError(f"store {data.path} holds {data.sites}: pass site= to pick one.")
            site = data.sites[0]
        name = str(parse_site(site))
        data.check(sites=[name])
        n = data.n_rows if rows is None else min(rows, data.n_rows)
        d = data.widths[name]
        meta = {"site": name, "store": str(data.path), "model": data.manifest["model"]["name"], "rows": n}
        if n * d * dtype.itemsize <= max_bytes:
            return _in_memory(data.rows(name, 0, n).to(dtype), chunk_rows), n, d, meta

        def from_store() -> Iterator[tuple[int, Tensor]]:
            for lo in range(0, n, chunk_rows):
                yield lo, data.rows(name, lo, min(n, lo + chunk_rows)).to(dtype)

        return from_store, n, d, meta
    if not isinstance(data, Tensor) or data.ndim != 2 or not data.is_floating_point():
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise PathlensError(f"snmf: data must be a float tensor (rows, d) or an ActivationStore, got {shape}.")
    X = data if rows is None else data[:rows]
    if not bool(torch.isfinite(X).all()):
        raise PathlensError("snmf: the data holds NaN or inf values.")
    return (
        _in_memory(X.detach().to(dtype), chunk_rows),
        int(X.shape[0]),
        int(X.shape[1]),
        {"site": site or "rows", "rows": int(X.shape[0])},
    )


def _in_memory(X: Tensor, chunk_rows: int) -> Chunks:
    def chunks() -> Iterator[tuple[int, Tensor]]:
        for lo in range(0, X.shape[0], chunk_rows):
            yield lo, X[lo : lo + chunk_rows]

    return chunks


def _check_settings(
    rank: int, n: int, d: int, sparsity: float, init: str | Tensor, max_iter: int, patience: int, tol: float
) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
        raise PathlensError(f"rank={rank!r}; give an integer between 1 and the number of rows ({n}).")
    if not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
        raise PathlensError(f"sparsity={sparsity!r}; give the share of each feature's entries kept, in (0, 1].")
    if isinstance(init, Tensor):
        if tuple(init.shape) != (n, rank) or not init.is_floating_point() or bool((init < 0).any()):
            raise PathlensError(
                f"init: a tensor init is the starting G, non-negative floats of shape (rows, rank) = {(n, rank)}, got "
                f"{init.dtype} {tuple(init.shape)}."
            )
    elif init not in INITS:
        raise PathlensError(f"init={init!r}; use one of {', '.join(INITS)} or a starting G (rows, rank).")
    for name, value in (("max_iter", max_iter), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PathlensError(f"{name}={value!r}; give a positive integer.")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise PathlensError(f"tol={tol!r}; give a non-negative number.")
    if n < 1 or d < 1:
        raise PathlensError(f"snmf: no data ({n} rows of width {d}).")


def _can_promote(site: str, model: Model) -> bool:
    s = parse_site(site)
    return s.kind in _RESIDUAL_KINDS or (s.kind == "mlp_post" and model.arch.mlp_down is not None)


def _decode(tokenizer: Any, ids: Tensor) -> str:
    if tokenizer is None:
        return "".join(f"t{int(i)} " for i in ids)
    return str(tokenizer.decode([int(i) for i in ids]))
