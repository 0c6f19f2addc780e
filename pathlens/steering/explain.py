"""Why a steering vector works: which heads, MLPs and edges carry its effect on a concept metric.

The steered and the unsteered run see the same prompts; they differ only by the vector's interventions. So the
attribution engine runs with the steered run as the "clean" run (`clean_interventions=`) and the unsteered run
as the corrupted one, in the "denoise" direction: each score estimates how much the concept metric of the
*unsteered* run moves when one component's steered activation is patched in (first order, gradients taken at the
unsteered run: AtP for heads and MLPs, EAP for edges). The vector's own write into the residual stream is a
sender of its own in the edge graph ("intervention:L10.resid_post"), so the pathways it acts through are the
strongest paths from it to the logits (`Graph.paths`).

The concept metric, by default, is the logit difference between the concept's positive and negative token sets
(mean logit of the positive tokens minus that of the negative ones) at each prompt's last token
(`TokenSetDifference`); `CONCEPT_TOKENS` holds the sets for sentiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.attribution.atp import atp
from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.interventions import Positions
from pathlens.model import Model
from pathlens.paths import Path
from pathlens.results import Scores
from pathlens.steering.data import neutral_prompts
from pathlens.steering.evaluate import token_ids
from pathlens.steering.vector import SteeringVector
from pathlens.tasks.base import Task, answer_logits

CONCEPT_TOKENS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sentiment": (
        (" good", " great", " happy", " wonderful", " love", " excellent", " beautiful", " best", " glad", " fun"),
        (" bad", " terrible", " sad", " awful", " hate", " horrible", " worst", " ugly", " angry", " poor"),
    ),
}
"""A concept's (positive, negative) token sets: each string's first token is used."""


class TokenSetDifference:
    """Mean logit of the `positive` token ids minus mean logit of the `negative` ones, at each row's answer position
    (the last real token): (N, P, V) -> (N,). A task metric (`pathlens.tasks.base.Metric`)."""

    name = "token_set_logit_diff"
    __name__ = name

    def __init__(self, positive: Sequence[int], negative: Sequence[int]):
        self.positive = torch.tensor(sorted(set(positive)))
        self.negative = torch.tensor(sorted(set(negative)))
        if self.positive.numel() == 0 or self.negative.numel() == 0:
            raise PathlensError("TokenSetDifference: both token sets need at least one token.")
        shared = set(self.positive.tolist()) & set(self.negative.tolist())
        if shared:
            raise PathlensError(f"TokenSetDifference: tokens {sorted(shared)} are in both sets; remove them from one.")

    def __call__(self, logits: Tensor, task: Task) -> Tensor:
        final = answer_logits(logits, task)  # (N, V)
        pos, neg = self.positive.to(final.device), self.negative.to(final.device)
        return final[:, pos].mean(-1) - final[:, neg].mean(-1)

    def __repr__(self) -> str:
        return f"TokenSetDifference({len(self.positive)} positive, {len(self.negative)} negative tokens)"


def concept_tokens(model: Model, concept: str) -> tuple[list[int], list[int]]:
    """A shipped concept's (positive, negative) token ids on `model`'s tokenizer (`CONCEPT_TOKENS`), without ids
    both sets share (words a small vocabulary maps to one unknown token); an error naming the concept when a set
    is left empty or the concept has no token sets."""
    if concept not in CONCEPT_TOKENS:
        raise PathlensError(
            f"explain: no token sets for concept {concept!r} (known: {sorted(CONCEPT_TOKENS)}); pass "
            "tokens=(positive, negative)."
        )
    positive, negative = (token_ids(model, words) for words in CONCEPT_TOKENS[concept])
    shared = set(positive) & set(negative)
    positive, negative = [t for t in positive if t not in shared], [t for t in negative if t not in shared]
    if not positive or not negative:
        raise PathlensError(
            f"explain: the {concept} token sets share every token on {model.name}'s tokenizer (ids {sorted(shared)}); "
            "pass tokens=(positive, negative) this tokenizer tells apart."
        )
    return positive, negative


def concept_task(
    model: Model,
    prompts: Sequence[str] | Tensor,
    positive: Sequence[str] | Sequence[int],
    negative: Sequence[str] | Sequence[int],
    name: str = "concept",
) -> Task:
    """A task whose clean and corrupted prompts are both `prompts` (texts, right-padded; or ids (N, P)), scored by
    `TokenSetDifference` of the two token sets (strings: each one's first token; or ids) at the last token."""
    pos_ids, neg_ids = token_ids(model, positive), token_ids(model, negative)
    metric = TokenSetDifference(pos_ids, neg_ids)
    if isinstance(prompts, Tensor):
        ids, mask = prompts, torch.ones_like(prompts)
        texts = None
    else:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise PathlensError("explain: prompts must be a non-empty list of texts.")
        ids, mask = model.tokenize(list(prompts))
        texts = list(prompts)
    n = int(ids.shape[0])
    return Task(
        name=name,
        clean_ids=ids,
        corrupt_ids=ids.clone(),
        answer_ids=torch.full((n,), int(metric.positive[0])),
        wrong_ids=torch.full((n,), int(metric.negative[0])),
        answer_pos=mask.sum(1) - 1,
        attention_mask=mask,
        metric=metric,
        prompts=texts,
        corrupt_prompts=texts,
    )


@dataclass
class Explanation:
    """What `explain` returns.

    heads: AtP of each head (layer, head): the concept metric of the unsteered run with that head's steered output
        patched in (first-order estimate); `effect(heads)` subtracts the unsteered metric.
    mlps: the same for each layer's MLP output (layer); None for a model without MLPs.
    graph: EAP edge scores (denoise), with the vector's write(s) as sender(s) "intervention:<site>".
    paths: the strongest paths from the vector's write(s) to the logits through the graph.
    steered_metric / unsteered_metric: the concept metric (batch mean) with and without the vector.
    """

    heads: Scores
    mlps: Scores | None
    graph: Graph
    paths: list[Path]
    steered_metric: float
    unsteered_metric: float
    meta: dict[str, Any] = field(default_factory=dict)

    def effect(self, scores: Scores) -> Tensor:
        """Estimated change of the concept metric (scores minus the unsteered metric)."""
        return scores.values - self.unsteered_metric

    def _ranked(self, scores: Scores) -> Any:
        frame = scores.to_frame()
        order = (frame["value"] - self.unsteered_metric).abs().sort_values(ascending=False, kind="stable").index
        return frame.loc[order]

    def summary(self, k: int = 10) -> dict[str, Any]:
        """JSON-ready: metrics, the top-k heads, MLPs and edges by |effect|, the vector's own edges, and the paths."""
        heads = [
            {"node": f"L{r.layer}.H{r.head}", "effect": float(r.value) - self.unsteered_metric}
            for r in self._ranked(self.heads).head(k).itertuples()
        ]
        mlps = (
            []
            if self.mlps is None
            else [
                {"node": f"L{r.layer}.mlp", "effect": float(r.value) - self.unsteered_metric}
                for r in self._ranked(self.mlps).head(k).itertuples()
            ]
        )
        edges = self.graph.top(k)
        writes = [s for s in self.graph.senders if s.startswith("intervention:")]
        frame = self.graph.to_frame()
        own = frame[frame["sender"].isin(writes)].head(k)
        return {
            **self.meta,
            "steered_metric": self.steered_metric,
            "unsteered_metric": self.unsteered_metric,
            "difference": self.steered_metric - self.unsteered_metric,
            "top_heads": heads,
            "top_mlps": mlps,
            "top_edges": [
                {"sender": r.sender, "receiver": r.receiver, "score": float(r.score)} for r in edges.itertuples()
            ],
            "vector_edges": [
                {"sender": r.sender, "receiver": r.receiver, "score": float(r.score)} for r in own.itertuples()
            ],
            "paths": [{"nodes": list(p.nodes), "score": p.score} for p in self.paths],
        }


def explain(
    model: Model,
    vector: SteeringVector,
    prompts: Sequence[str] | Tensor | None = None,
    *,
    scale: float | None = None,
    concept: str = "sentiment",
    tokens: tuple[Sequence[str] | Sequence[int], Sequence[str] | Sequence[int]] | None = None,
    positions: Positions = "all",
    k: int = 10,
    n_prompts: int = 16,
) -> Explanation:
    """Attribute the steered-minus-unsteered change of a concept metric to heads, MLPs and edges (module docstring).

    prompts: texts or ids (default: the first `n_prompts` shipped neutral prompts). scale: the vector's scale
    (default: its own). tokens: (positive, negative) token sets of the metric (default: `CONCEPT_TOKENS[concept]`).
    positions: where the vector is added in these forwards ("all" by default: every prompt token, as it is added
    to every token of a steered generation). k: how many paths to report.
    """
    vector.check(model)
    if tokens is None:
        tokens = concept_tokens(model, concept)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PathlensError(f"explain: k must be a positive integer (paths to report), got {k!r}.")
    task = concept_task(model, neutral_prompts()[:n_prompts] if prompts is None else prompts, *tokens, name=concept)
    ivs = vector.interventions(scale=scale, positions=positions)
    with torch.no_grad():
        runs = [model.run(task.clean_ids, attention_mask=task.attention_mask, interventions=i) for i in (ivs, [])]
    steered, unsteered = (float(task.metric(run.logits, task).mean()) for run in runs)
    heads = atp(model, task, sites="heads", direction="denoise", clean_interventions=ivs)
    mlps = (
        atp(model, task, sites="mlp_out", direction="denoise", clean_interventions=ivs)
        if model.arch.mlp is not None
        else None
    )
    graph = edge_attribution(model, task, "eap", direction="denoise", clean_interventions=ivs)
    writes = [s for s in graph.senders if s.startswith("intervention:")]
    paths = graph.paths(k, sources=writes) if writes else []
    meta = {
        "model": model.name,
        "concept": concept,
        "sites": vector.sites,
        "scale": vector.scale if scale is None else float(scale),
        "positions": positions,
        "n_prompts": task.n,
        "metric": TokenSetDifference.name,
        "method": "atp/eap:denoise (steered run as clean, unsteered as corrupted)",
    }
    return Explanation(heads, mlps, graph, paths, steered, unsteered, meta)
