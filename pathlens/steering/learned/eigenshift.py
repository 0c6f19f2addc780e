"""EigenShift: output-layer steering by shrinking singular components of the unembedding (Shaik, Mazhar,
Srivastava, Akhtar, arXiv 2509.16660; code B-I-T-W-I-S-E-M-I-N-D-S/EigenShift). No training, one SVD.

1. The unembedding W (|V|×d) = UΣVᵀ; the right singular vectors v_k are hidden-space directions ("eigen-choices").
2. Each component is scored by how differently the final normed hidden states h of a concept's texts and of other
   texts use it: the projections a_k = v_kᵀh (the paper's form; the public code's `Vt.T @ h` is V h, not Vᵀh),
   compared by mean difference Δ_k = mean_concept a_k − mean_other a_k, or by AUROC.
3. The k best-scored components get σ_k ← β·σ_k: W′ = UΣ′Vᵀ = W (I − (1 − β) V_S V_Sᵀ).

Since W′h = W h′ with h′ = h − (1 − β) V_S V_Sᵀ h, the edit applies either way, with equal logits up to float
rounding: `edited(model)` returns a deep copy whose unembedding is W′ (a tied unembedding is untied in the copy, the
embedding keeps its weights; the original model is untouched), and `interventions()` / `applied(model)` /
`pathlens.generate(model, prompts, steer=shift)` apply `ScaleSubspace(V_S, β)` at run time to the unembedding's
input: the output of the final norm (`module:<final norm>`), or the last block's resid_post for a model without one.

Where we choose: components are ranked by |Δ| (or |AUROC − 0.5|), not by signed Δ as the paper's code does, since
the sign of a singular vector is arbitrary (the SVD routine decides it) and shrinking σ_k acts on both signs alike.
Hidden states are read at every real position of the given texts (the paper reads one state per generation).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pathlens.arch.base import get_module
from pathlens.errors import PathlensError
from pathlens.hooks import HookSession
from pathlens.interventions import Intervention, ScaleSubspace
from pathlens.model import Model
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import parse_site
from pathlens.steering.vector import check_scale

Score = Literal["mean-diff", "auroc"]
FORMAT = "pathlens.EigenShift"
Texts = Sequence[str] | Tensor


def unembedding_site(model: Model) -> str:
    """The site whose value the unembedding reads: the final norm's output, or the last block's resid_post."""
    final = model.arch.final_norm
    return f"module:{final}" if final is not None else f"L{model.n_layers - 1}.resid_post"


def _unembedding_weight(model: Model) -> Tensor:
    """The unembedding's (vocab, d_model) weight; an error naming the module if it has none."""
    module = get_module(model.hf, model.arch.unembed)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[1] != model.arch.d_model:
        raise PathlensError(
            f"EigenShift needs a linear unembedding ({model.arch.unembed}) with a (vocab, {model.arch.d_model}) "
            f"weight; {type(module).__name__} has none."
        )
    return weight


def unembedding_svd(model: Model) -> tuple[Tensor, Tensor]:
    """Singular values σ (d,) in decreasing order and right singular vectors as rows Vᵀ (d, d) of the unembedding,
    in float64 (from the eigendecomposition of WᵀW, which needs no |V|×d factor U)."""
    w = _unembedding_weight(model).detach().double()  # (V, d)
    evals, evecs = torch.linalg.eigh(w.T @ w)  # ascending
    order = torch.arange(evals.shape[0] - 1, -1, -1)
    return evals[order].clamp_min(0).sqrt(), evecs[:, order].T  # (d,), (d, d)


def final_hidden(model: Model, texts: Texts, batch_size: int = 32) -> Tensor:
    """The unembedding's input (the final normed hidden state) at every real position of `texts` (N_tokens, d).
    texts: a list of texts, or token ids (N, P) (every position real)."""
    site = unembedding_site(model)
    if isinstance(texts, Tensor):
        ids = texts.unsqueeze(0) if texts.ndim == 1 else texts
        model.check_ids(ids, "texts")
        batches = [
            (ids[i : i + batch_size], torch.ones_like(ids[i : i + batch_size])) for i in range(0, len(ids), batch_size)
        ]
    else:
        if isinstance(texts, str) or len(texts) == 0 or not all(isinstance(t, str) for t in texts):
            raise PathlensError("EigenShift: texts must be a non-empty list of texts or token ids (batch, pos).")
        batches = [model.tokenize(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    states = []
    for ids, mask in batches:
        with torch.no_grad():
            value = model.run(ids, attention_mask=mask, cache=site).cache[site]  # (b, p, d)
        states.append(value[mask.bool()].double())
    return torch.cat(states)


def _auroc(pos: Tensor, neg: Tensor) -> Tensor:
    """AUROC of each column separating `pos` (n, d) above `neg` (m, d): the Mann–Whitney U / (n·m), ties as 1/2."""
    both = torch.cat([pos, neg])  # (n + m, d)
    sorted_vals, order = both.sort(dim=0)
    ranks = torch.empty_like(both)
    ranks.scatter_(0, order, torch.arange(1, both.shape[0] + 1, dtype=both.dtype)[:, None].expand_as(both))
    for col in range(both.shape[1]):  # average the ranks of ties (rare with float states)
        values, inverse = torch.unique(sorted_vals[:, col], return_inverse=True)
        if values.numel() < both.shape[0]:
            mean_rank = torch.zeros_like(values).index_add_(0, inverse, ranks[order[:, col], col])
            count = torch.zeros_like(values).index_add_(0, inverse, torch.ones_like(inverse, dtype=both.dtype))
            ranks[order[:, col], col] = (mean_rank / count)[inverse]
    n, m = pos.shape[0], neg.shape[0]
    return (ranks[:n].sum(0) - n * (n + 1) / 2) / (n * m)


@dataclass(frozen=True, eq=False)
class Components:
    """The unembedding's singular components and their concept scores.

    sigma (d,) and vt (d, d) (rows = right singular vectors, σ decreasing); scores (d,) Δ_k or AUROC_k; how the
    scores were made; strength (d,) the ranking key (|Δ| or |AUROC − 0.5|); meta: model, data sizes."""

    sigma: Tensor
    vt: Tensor
    scores: Tensor
    how: Score
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def strength(self) -> Tensor:
        return (self.scores - 0.5).abs() if self.how == "auroc" else self.scores.abs()

    def ranked(self) -> Tensor:
        """Component indices, most concept-specific first."""
        return torch.argsort(self.strength, descending=True, stable=True)

    def select(self, k: int, beta: float = 0.0, model: Model | None = None) -> "EigenShift":
        """The EigenShift scaling the `k` top-ranked components' singular values by `beta`."""
        d = int(self.sigma.shape[0])
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= d:
            raise PathlensError(f"EigenShift: k must be an integer in 0..{d} (components to scale), got {k!r}.")
        chosen = self.ranked()[:k]
        site = self.meta.get("site") if model is None else unembedding_site(model)
        return EigenShift(
            basis=self.vt[chosen].T.contiguous(),  # (d, k)
            beta=beta,
            components=tuple(int(i) for i in chosen),
            site=str(site),
            meta={**self.meta, "how": self.how, "k": k},
            sigma=self.sigma[chosen].contiguous(),  # (k,)
            scores=self.scores[chosen].contiguous(),  # (k,)
        )


def _states(model: Model, data: Texts, what: str) -> Tensor:
    """Final normed hidden states (N, d) in float64: read from texts / token ids, or given as a float tensor."""
    if isinstance(data, Tensor) and data.is_floating_point():
        if data.ndim != 2 or data.shape[1] != model.arch.d_model or data.shape[0] == 0:
            raise PathlensError(
                f"EigenShift: {what} states must be (N, {model.arch.d_model}) with N ≥ 1, got {tuple(data.shape)}."
            )
        return data.double()
    return final_hidden(model, data)


def components(model: Model, concept: Texts, other: Texts, how: Score = "mean-diff") -> Components:
    """Score every singular component of the unembedding by how differently the final normed hidden states of
    `concept` and of `other` project on it (module docstring). Each is texts (every real position is read), token
    ids (N, P), or the states themselves, a float (N, d_model) tensor (e.g. only the states that produced a
    concept word, as the paper reads them)."""
    if how not in ("mean-diff", "auroc"):
        raise PathlensError(f"EigenShift: unknown score {how!r}; use 'mean-diff' or 'auroc'.")
    sigma, vt = unembedding_svd(model)
    a_concept = _states(model, concept, "concept") @ vt.T  # (n, d) projections a_k = v_kᵀ h
    a_other = _states(model, other, "other") @ vt.T  # (m, d)
    scores = a_concept.mean(0) - a_other.mean(0) if how == "mean-diff" else _auroc(a_concept, a_other)
    meta = {
        "model": model.name,
        "method": "eigenshift",
        "site": unembedding_site(model),
        "n_concept_states": int(a_concept.shape[0]),
        "n_other_states": int(a_other.shape[0]),
    }
    return Components(sigma, vt, scores, how, meta)


@dataclass(frozen=True, eq=False)
class EigenShift:
    """Scale the singular values of the unembedding's components `basis` (d, k) (their right singular vectors, as
    columns) by `beta`; apply as a copy (`edited`) or at run time (`interventions`, `applied`, `steer=` of
    `pathlens.generate`). components: their indices in the SVD (σ decreasing); site: the unembedding's input."""

    basis: Tensor
    beta: float
    components: tuple[int, ...]
    site: str
    meta: dict[str, Any] = field(default_factory=dict)
    sigma: Tensor | None = None
    scores: Tensor | None = None

    def __post_init__(self) -> None:
        check_scale(self.beta, "beta")
        if not isinstance(self.basis, Tensor) or self.basis.ndim != 2:
            raise PathlensError("EigenShift: basis must be a (d, k) tensor of right singular vectors.")
        if len(self.components) != self.basis.shape[1]:
            raise PathlensError(
                f"EigenShift: {len(self.components)} component indices for {self.basis.shape[1]} basis columns; "
                "give one index per column."
            )
        for name, value in (("sigma", self.sigma), ("scores", self.scores)):
            if value is not None and (not isinstance(value, Tensor) or tuple(value.shape) != (self.k,)):
                raise PathlensError(f"EigenShift: {name} must be a ({self.k},) tensor, one per selected component.")
        parse_site(self.site)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (the selected right singular vectors `basis` (d, k), and their singular values
        and concept scores when known) and `<path>.json` (β, component indices, site, provenance in `meta`)."""
        tensors = {"basis": self.basis.detach().contiguous().cpu()}
        for name, value in (("sigma", self.sigma), ("scores", self.scores)):
            if value is not None:
                tensors[name] = value.detach().contiguous().cpu()
        header = {
            "beta": float(self.beta),
            "components": list(self.components),
            "site": self.site,
            "has": sorted(tensors),
            "meta": self.meta,
        }
        save_pair(path, FORMAT, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "EigenShift":
        """Read what `save` wrote (checksums checked); the tensors come back bit-identical."""
        names = ["basis", *(n for n in ("sigma", "scores") if n in _saved_tensor_names(path))]
        tensors, header = load_pair(path, FORMAT, names, ["beta", "components", "site", "has", "meta"])
        return cls(
            basis=tensors["basis"],
            beta=float(header["beta"]),
            components=tuple(int(i) for i in header["components"]),
            site=str(header["site"]),
            meta=dict(header["meta"]),
            sigma=tensors.get("sigma"),
            scores=tensors.get("scores"),
        )

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    def with_beta(self, beta: float) -> "EigenShift":
        return replace(self, beta=beta)

    def check(self, model: Model) -> None:
        """Raise PathlensError unless `model` has this shift's width and unembedding site."""
        _unembedding_weight(model)
        if self.basis.shape[0] != model.arch.d_model:
            raise PathlensError(
                f"EigenShift: its directions have {self.basis.shape[0]} entries but {model.name}'s unembedding reads "
                f"{model.arch.d_model}; score the components on this model."
            )
        model.resolve(self.site, write=True)

    def interventions(self) -> list[Intervention]:
        """The run-time form: ScaleSubspace(basis, beta) on the unembedding's input (none when k = 0)."""
        if self.k == 0:
            return []
        return [Intervention(parse_site(self.site), ScaleSubspace(self.basis.float(), float(self.beta)))]

    def generation_interventions(self, model: Model, ids: Tensor, mask: Tensor) -> list[Intervention]:
        """For `pathlens.generate(model, prompts, steer=shift)`."""
        self.check(model)
        return self.interventions()

    @contextmanager
    def applied(self, model: Model) -> Iterator[HookSession]:
        """Every forward of `model.hf` inside the block reads its logits through W′; hooks removed at the end."""
        self.check(model)
        with model.session(self.interventions()) as session:
            yield session

    def edited(self, model: Model) -> Model:
        """A deep copy of `model` whose unembedding is W′ = W (I − (1 − β) B Bᵀ) (computed in float64); a tied
        unembedding is untied in the copy. The original is untouched."""
        self.check(model)
        hf = copy.deepcopy(model.hf)
        unembed = get_module(hf, model.arch.unembed)
        embed = get_module(hf, model.arch.embed)
        weight = unembed.weight
        assert isinstance(weight, Tensor)
        w = weight.detach().double()  # (V, d)
        basis = self.basis.to(device=w.device, dtype=torch.float64)  # (d, k)
        new = (w - (1.0 - float(self.beta)) * (w @ basis) @ basis.T).to(weight.dtype)
        if getattr(embed, "weight", None) is weight:
            unembed.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
            config = getattr(hf, "config", None)
            if config is not None:
                config.tie_word_embeddings = False
        else:
            with torch.no_grad():
                weight.copy_(new)
        return Model(hf, model.tokenizer, arch=model.arch, name=f"{model.name} (eigenshift k={self.k}, β={self.beta})")


def _saved_tensor_names(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names a saved pair's JSON lists under "has" (empty if unreadable: `load_pair` then names the
    problem)."""
    base = Path(os.fspath(path)).expanduser()
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    try:
        has = json.loads(base.with_name(base.name + ".json").read_text(encoding="utf-8")).get("has")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in has] if isinstance(has, list) else []


def eigenshift(
    model: Model, concept: Texts, other: Texts, k: int, beta: float = 0.0, how: Score = "mean-diff"
) -> EigenShift:
    """Score the unembedding's components on `concept` vs `other` texts and scale the `k` most concept-specific
    singular values by `beta` (see module docstring)."""
    return components(model, concept, other, how).select(k, beta, model)
