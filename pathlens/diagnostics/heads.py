"""Head detectors (METHODS §10): how much each attention head's pattern looks like a previous-token, duplicate-token
or induction head, a pattern you give, or Olsson's prefix matching on repeated random tokens.

Every detector reads the heads' attention patterns (the `attn_pattern` site, so grouped-query models score each
query head) and returns `Scores` over (layer, head), the mean over prompts of one score per prompt.

Detection patterns D (lower-triangular, per prompt, TransformerLens' `head_detector` definitions):
previous-token D[i, i−1] = 1; duplicate-token D[i, j] = 1 if tok_j = tok_i and j < i; induction = the duplicate
pattern shifted one column right (D[i, j] = 1 if tok_{j−1} = tok_i), column 0 empty.

Scores of a head with pattern A (n × n, n = the prompt's real tokens), as TransformerLens defines them:
- "mul": Σ(A′ ⊙ D) / ΣA′, where A′ is A with column 0 zeroed (`exclude_bos`) and its diagonal zeroed
  (`exclude_current_token`): the share of the head's (remaining) attention that lands where D says;
- "abs": 1 − round(Σ|A − D|′ / n, 3), the same exclusions applied to |A − D| (1 is a perfect match, −1 the worst).
Prefix matching (Olsson et al. 2022): on [BOS, r_1..r_T, r_1..r_T], the mean attention from each second-copy
position to the token after its first occurrence (T − 1 positions back).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from pathlens.diagnostics.inputs import token_inputs
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention
from pathlens.model import Model
from pathlens.results import Scores

ErrorMeasure = Literal["mul", "abs"]


# ---- detection patterns ----------------------------------------------------------------------------------------


def previous_token_pattern(ids: Tensor) -> Tensor:
    """(b, p) ids → (b, p, p): D[i, i−1] = 1."""
    b, p = ids.shape
    return torch.diag_embed(torch.ones(b, p - 1), offset=-1)


def duplicate_token_pattern(ids: Tensor) -> Tensor:
    """(b, p) ids → (b, p, p): D[i, j] = 1 if tok_j = tok_i and j < i."""
    same = ids[:, :, None] == ids[:, None, :]  # (b, q, k)
    return torch.tril(same.float(), diagonal=-1)


def induction_pattern(ids: Tensor) -> Tensor:
    """(b, p) ids → (b, p, p): the duplicate pattern shifted one column right (D[i, j] = 1 if tok_{j−1} = tok_i),
    column 0 empty, lower-triangular (so D[i, i] = 1 when tok_{i−1} = tok_i, as in TransformerLens)."""
    duplicate = duplicate_token_pattern(ids)
    shifted = torch.zeros_like(duplicate)
    shifted[:, :, 1:] = duplicate[:, :, :-1]
    return torch.tril(shifted)


# ---- scores of given patterns ----------------------------------------------------------------------------------


def similarity(
    attention: Tensor,
    detection: Tensor,
    lengths: Sequence[int] | None = None,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
) -> Tensor:
    """Per prompt and head, how well attention patterns match detection patterns.

    attention: (b, q, H, k) probabilities (the `attn_pattern` site layout); detection: (b, q, k) or (q, k).
    lengths: real tokens of each right-padded prompt (default: all p). Returns (b, H) float64 on the CPU, wherever
    the patterns were computed.
    """
    if error_measure not in ("mul", "abs"):
        raise PathlensError(f"error_measure={error_measure!r}: use 'mul' or 'abs' (TransformerLens' two measures).")
    attention, detection = attention.cpu(), detection.cpu()  # scores are per (prompt, head): reduce on the CPU
    b, p = attention.shape[0], attention.shape[1]
    d = detection if detection.ndim == 3 else detection[None].expand(b, p, p)
    if tuple(d.shape) != (b, p, p):
        raise PathlensError(
            f"detection pattern has shape {tuple(detection.shape)}; give ({p}, {p}) or ({b}, {p}, {p}) for "
            f"attention of shape {tuple(attention.shape)}."
        )
    n = torch.tensor(list(lengths) if lengths is not None else [p] * b, dtype=torch.float64)  # (b,)
    cols = torch.arange(p)
    valid = (cols[None, :, None] < n[:, None, None]) & (cols[None, None, :] < n[:, None, None])  # (b, q, k)
    keep = valid.clone()
    if exclude_bos:
        keep[:, :, 0] = False
    if exclude_current_token:
        keep &= ~torch.eye(p, dtype=torch.bool)[None]
    a = attention.double() * keep[:, :, None, :]  # (b, q, H, k)
    dd = d.double()
    if error_measure == "mul":
        return torch.einsum("bqhk,bqk->bh", a, dd * keep) / a.sum(dim=(1, 3))
    return _abs_scores(attention, d, n.long().tolist(), exclude_bos, exclude_current_token)


def _abs_scores(
    attention: Tensor, detection: Tensor, lengths: list[int], exclude_bos: bool, exclude_current_token: bool
) -> Tensor:
    """The "abs" score per prompt and head, computed the way TransformerLens does it — in the pattern's own dtype,
    one (n, n) matrix at a time, then Python's round to 3 decimals — so that a score sitting on a rounding boundary
    rounds the same way (a float64 sum would flip some of them by 0.001)."""
    b, heads = attention.shape[0], attention.shape[2]
    out = torch.zeros(b, heads, dtype=torch.float64)
    for row, n in enumerate(lengths):
        d = detection[row, :n, :n].to(attention.dtype)
        for head in range(heads):
            diff = (attention[row, :n, head, :n].contiguous() - d).abs()  # (n, n)
            if exclude_bos:
                diff[:, 0] = 0
            if exclude_current_token:
                diff.fill_diagonal_(0)
            out[row, head] = 1 - round((diff.mean() * n).item(), 3)
    return out


# ---- detectors on a model --------------------------------------------------------------------------------------


def attention_patterns(
    model: Model,
    ids: Tensor,
    mask: Tensor,
    interventions: Sequence[Intervention] = (),
    layers: Sequence[int] | None = None,
) -> list[Tensor]:
    """The attention patterns (b, q, H, k) of every layer (or of `layers`), one run."""
    chosen = list(range(model.n_layers)) if layers is None else list(layers)
    sites = [f"L{layer}.pattern" for layer in chosen]
    with torch.no_grad():
        run = model.run(ids, attention_mask=mask, cache=sites, interventions=interventions)
    return [run.cache[s] for s in sites]


def _scores(model: Model, per_prompt: Tensor, kind: str, error_measure: str, meta: Mapping[str, object]) -> Scores:
    """Scores (layer, head) of per-prompt values (L, b, H): their mean over prompts."""
    return Scores(
        values=per_prompt.mean(dim=1).float(),
        dims=("layer", "head"),
        coords={"layer": list(range(model.n_layers)), "head": list(range(model.n_heads))},
        metric=f"{kind}_score" + (f":{error_measure}" if error_measure else ""),
        method="head_detector",
        meta={"model": model.name, "n_prompts": int(per_prompt.shape[1]), **meta},
    )


def pattern_score(
    model: Model,
    ids: object,
    pattern: "Tensor | Callable[[Tensor], Tensor]",
    *,
    attention_mask: Tensor | None = None,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
    interventions: Sequence[Intervention] = (),
    name: str = "pattern",
) -> Scores:
    """How well every head's attention matches `pattern`: a lower-triangular (p, p) or (b, p, p) tensor, or a function
    of the token ids (b, p) → (b, p, p). `ids`: token ids (b, p) or texts (right-padded). Scores (layer, head)."""
    tokens, mask = token_inputs(model, ids, attention_mask)
    detection = pattern(tokens) if callable(pattern) else torch.as_tensor(pattern)
    p = int(tokens.shape[1])
    if detection.shape[-2:] != (p, p) or detection.ndim not in (2, 3):
        raise PathlensError(
            f"pattern has shape {tuple(detection.shape)}; give ({p}, {p}) or ({tokens.shape[0]}, {p}, {p}) for "
            f"these prompts of {p} tokens."
        )
    if not bool((detection.triu(1) == 0).all()):
        raise PathlensError("pattern must be lower-triangular: a causal head cannot attend to later positions.")
    lengths = [int(x) for x in mask.sum(1)]
    patterns = attention_patterns(model, tokens, mask, interventions)
    per_prompt = torch.stack(
        [similarity(a, detection, lengths, exclude_bos, exclude_current_token, error_measure) for a in patterns]
    )  # (L, b, H)
    meta = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token, "error_measure": error_measure}
    return _scores(model, per_prompt, name, error_measure, meta)


def _detector(kind: str, builder: Callable[[Tensor], Tensor]) -> Callable[..., Scores]:
    def detect(
        model: Model,
        ids: object,
        *,
        attention_mask: Tensor | None = None,
        exclude_bos: bool = False,
        exclude_current_token: bool = False,
        error_measure: ErrorMeasure = "mul",
        interventions: Sequence[Intervention] = (),
    ) -> Scores:
        return pattern_score(
            model,
            ids,
            builder,
            attention_mask=attention_mask,
            exclude_bos=exclude_bos,
            exclude_current_token=exclude_current_token,
            error_measure=error_measure,
            interventions=interventions,
            name=kind,
        )

    detect.__name__ = kind
    detect.__doc__ = (
        f"The {kind.replace('_', '-')} score of every head (TransformerLens' '{kind}_head' detection pattern): "
        "Scores (layer, head), the mean over prompts. ids: token ids (b, p) or texts; error_measure 'mul' or "
        "'abs'; exclude_bos / exclude_current_token as in TransformerLens; interventions: applied during the run."
    )
    return detect


previous_token = _detector("previous_token", previous_token_pattern)
duplicate_token = _detector("duplicate_token", duplicate_token_pattern)
induction = _detector("induction", induction_pattern)


# ---- prefix matching -------------------------------------------------------------------------------------------


def repeated_tokens(model: Model, n: int = 8, length: int | None = None, seed: int = 0) -> Tensor:
    """Olsson's probe: (n, [1 +] 2·length) ids [BOS, r_1..r_T, r_1..r_T] with r drawn uniformly (seeded) from the
    vocabulary without special tokens; the BOS is the model's `bos_token_id` when it has one. length: T (default
    25, or less if the model's context is shorter)."""
    config = model.config
    context = getattr(config, "max_position_embeddings", None) if config is not None else None
    if length is None:
        length = 25 if context is None else min(25, (int(context) - 1) // 2)
    if n < 1 or length < 2:
        raise PathlensError(f"repeated_tokens: need n >= 1 and length >= 2, got n={n}, length={length}.")
    bos = getattr(config, "bos_token_id", None) if config is not None else None
    special = set(getattr(model.tokenizer, "all_special_ids", []) or []) | ({bos} if bos is not None else set())
    allowed = torch.tensor([i for i in range(model.vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(seed)
    r = allowed[torch.randint(len(allowed), (n, length), generator=gen)]  # (n, T)
    parts = ([torch.full((n, 1), int(bos))] if bos is not None else []) + [r, r]
    return torch.cat(parts, dim=1)


def prefix_matching(
    model: Model,
    ids: Tensor | None = None,
    *,
    n: int = 8,
    length: int | None = None,
    seed: int = 0,
    interventions: Sequence[Intervention] = (),
) -> Scores:
    """Olsson's prefix-matching score of every head: on repeated random tokens (`ids` of the form [BOS?, r, r], or
    `repeated_tokens(model, n, length, seed)`), the mean attention from each second-copy position t to the token
    after its first occurrence, t − (T − 1). Scores (layer, head)."""
    tokens = repeated_tokens(model, n, length, seed) if ids is None else ids
    model.check_ids(tokens)
    total = int(tokens.shape[1])
    prefix = total % 2
    t_len = (total - prefix) // 2
    if t_len < 2 or not torch.equal(tokens[:, prefix : prefix + t_len], tokens[:, prefix + t_len :]):
        raise PathlensError(
            f"prefix_matching: ids of shape {tuple(tokens.shape)} are not repeated sequences [BOS?, r, r] (the two "
            "halves after an optional first token differ); pass ids=None to draw them with repeated_tokens()."
        )
    patterns = attention_patterns(model, tokens, torch.ones_like(tokens), interventions)
    queries = torch.arange(prefix + t_len, total)  # every second-copy position
    keys = queries - (t_len - 1)
    per_prompt = torch.stack([a.transpose(1, 2)[:, :, queries, keys].double().mean(-1) for a in patterns])  # (L, b, H)
    return _scores(model, per_prompt, "prefix_matching", "", {"repeat_length": t_len, "bos": bool(prefix)})
