"""The evaluation card of a dictionary, measured on held-out token windows.

    l0              mean number of active latents per token
    fve             fraction of variance explained: 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (ȳ the mean over the tokens)
    ce_clean        next-token cross-entropy of the unmodified model
    ce_spliced      the same with the site replaced by the reconstruction (the dictionary spliced in and its
                    error term zeroed)
    ce_zero         the same with the site zero-ablated
    ce_recovered    (ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 is a perfect dictionary (SAELens
                    `ce_loss_score`)
    kl              mean KL(clean ‖ spliced) of the next-token distributions (SAELens `kl_div_score` compares it
                    with zero ablation; the card reports the divergence itself)
    dead_fraction   latents that never fire on the held-out tokens
    dense_fraction  latents that fire on more than 10% of them

Token statistics skip each window's first position when `skip_first` (as training does); cross-entropy counts
every predicted position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.features.sae import Dictionary
from pathlens.interventions import Ablate, Intervention
from pathlens.model import Model
from pathlens.sites import Site

DENSE_FREQUENCY = 0.1


@dataclass(frozen=True)
class EvaluationCard:
    """The figures of one dictionary on held-out tokens (see module docstring); `frequencies` (width,) is each
    latent's firing frequency (for the density histogram), not part of `as_dict`."""

    name: str
    kind: str
    site: str
    target: str
    width: int
    tokens: int
    l0: float
    fve: float
    mse: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    kl: float
    dead_fraction: float
    dense_fraction: float
    frequencies: Tensor = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("frequencies")
        return out

    def text(self) -> str:
        """The card as aligned text lines."""
        d = self.as_dict()
        return "\n".join(f"{k:>15}  {v:.4g}" if isinstance(v, float) else f"{k:>15}  {v}" for k, v in d.items())


def evaluate(
    model: Model,
    dictionary: Dictionary,
    windows: Tensor,
    site: "Site | str | None" = None,
    target: "Site | str | None" = None,
    name: str = "dictionary",
    chunk: int = 8,
    skip_first: bool = True,
) -> EvaluationCard:
    """The evaluation card of `dictionary` at `site` (and `target` for a transcoder; both default to the sites in
    its meta) on token windows (n, p), `chunk` windows per forward."""
    meta = dictionary.config.meta
    source = model.resolve(site if site is not None else meta.get("site", ""))
    out = source
    if dictionary.config.transcoder or target is not None:
        out = model.resolve(target if target is not None else meta.get("target", ""))
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise PathlensError(f"evaluate: windows must be token ids (n >= 1, p >= 2), got shape {tuple(windows.shape)}.")
    first = 1 if skip_first else 0
    sums: dict[str, float] = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0, "sq": 0.0, "l0": 0.0}
    fired = torch.zeros(dictionary.width, dtype=torch.float64)
    ys: list[Tensor] = []
    n_tokens = n_pred = 0
    with torch.no_grad(), model.splice(dictionary, source, target=None if out == source else out, name="ev") as sp:
        for start in range(0, int(windows.shape[0]), chunk):
            ids = windows[start : start + chunk]
            clean = model.run(ids, cache=[out, sp.latents, sp.error])
            spliced = model.run(ids, interventions=[Intervention(sp.error, Ablate("zero"))])
            zero = model.run(ids, interventions=[Intervention(out, Ablate("zero"))])
            labels = ids[:, 1:].to(clean.logits.device)
            logp_clean = _log_probs(clean.logits)
            logp_spliced = _log_probs(spliced.logits)
            sums["ce_clean"] += _nll(logp_clean, labels)
            sums["ce_spliced"] += _nll(logp_spliced, labels)
            sums["ce_zero"] += _nll(_log_probs(zero.logits), labels)
            sums["kl"] += float((logp_clean.exp() * (logp_clean - logp_spliced)).sum())
            n_pred += labels.numel()
            f = clean.cache[sp.latents][:, first:].float()  # (b, p', width)
            err = clean.cache[sp.error][:, first:].float()  # (b, p', d_out)
            active = (f > 0).reshape(-1, dictionary.width)
            fired += active.sum(0).double().cpu()
            sums["l0"] += float(active.sum())
            sums["sq"] += float(err.pow(2).sum())
            ys.append(clean.cache[out][:, first:].float().reshape(-1, err.shape[-1]))
            n_tokens += active.shape[0]
    y = torch.cat(ys)  # (tokens, d_out)
    total = float((y - y.mean(0)).pow(2).sum())
    ce_clean, ce_spliced, ce_zero = (sums[k] / n_pred for k in ("ce_clean", "ce_spliced", "ce_zero"))
    gap = ce_zero - ce_clean
    frequencies = (fired / max(n_tokens, 1)).float()
    return EvaluationCard(
        name=name,
        kind=dictionary.kind + (" transcoder" if dictionary.config.transcoder else ""),
        site=str(source),
        target=str(out),
        width=dictionary.width,
        tokens=n_tokens,
        l0=sums["l0"] / max(n_tokens, 1),
        fve=1.0 - sums["sq"] / total if total > 0 else float("nan"),
        mse=sums["sq"] / max(n_tokens, 1),
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        ce_zero=ce_zero,
        ce_recovered=(ce_zero - ce_spliced) / gap if gap != 0 else float("nan"),
        kl=sums["kl"] / n_pred,
        dead_fraction=float((frequencies == 0).float().mean()),
        dense_fraction=float((frequencies > DENSE_FREQUENCY).float().mean()),
        frequencies=frequencies,
    )


def _log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities of the next token at every position but the last (b, p − 1, vocab)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll(logp: Tensor, labels: Tensor) -> float:
    return float(-logp.gather(-1, labels[..., None]).sum())
