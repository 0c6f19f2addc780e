"""`discover`: a circuit (a `Graph` with kept edges) for a model and task, and its top-K diverse pathways.

Methods:
    "eap" | "eap-ig" | "relp"  score every edge by gradients (`pathlens.attribution.edge_attribution`);
    "patching"                 score every edge exactly: the metric change when that edge alone is patched
                               (one batched row per edge — reference grade, for small graphs);
    "acdc"                     greedy pruning with exact edge patching (Conmy et al. 2023), batched per
                               receiver: receivers from the logits backwards; all incoming edges of a receiver
                               are tested against the current circuit in one batch, and those whose removal
                               moves the metric by less than `threshold` (in units of m(M) − m(∅)) are removed.
For the scoring methods the circuit is the top-`top_k` edges ranked `by` (see `Graph.prune`: "abs" by
|score|, "support" by how much the edge supports the clean behaviour), or, without `top_k`, the smallest
circuit on the faithfulness curve reaching `target` (then narrowed: the smallest of 7 sizes evenly spaced below
it, down to the curve's previous size, that still reaches `target`). The default "auto" measures the curve of
both rankings and keeps the smaller circuit reaching `target`: ranking by support leaves out edges that work against the
behaviour and gives much smaller circuits when the estimates' signs are right (SmolLM2 IOI), while |score|
is robust when they are not (first-order and IG scores of an attention key route can have the wrong sign).
Edges that cannot carry a signal are then dropped (`Graph.without_dangling`, same metric), and a circuit of at
most `refine` edges gets one ACDC pass restricted to its own edges (exact edge patching, `threshold`), which
drops edges whose removal moves the metric by less than `threshold` (cost: one batched row per edge). The returned
Graph's meta records the faithfulness of the circuit, the curve(s), the ranking, the ablation, the direction
and the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, Literal, get_args

import torch

from pathlens.circuits.edge_attribution import edge_attribution
from pathlens.circuits.edge_effects import edge_effects
from pathlens.circuits.edge_patching import DEFAULT_EDGE_BATCH_TOKENS, EdgePatcher
from pathlens.circuits.faithfulness import Curve, faithfulness, faithfulness_curve, top_k_masks, with_endpoints
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.model import Model
from pathlens.patching.spec import Direction, check_option
from pathlens.sites import parse_node
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric, metric_name

DiscoveryMethod = Literal["eap", "eap-ig", "relp", "patching", "acdc"]
DISCOVERY_METHODS: tuple[str, ...] = get_args(DiscoveryMethod)
Ranking = Literal["auto", "abs", "value", "support"]
EXACT_SCORES = ("patching", "acdc")  # Graph.method prefixes of graphs whose scores are exact edge effects


def discover(
    model: Model,
    task: Task,
    method: DiscoveryMethod = "eap-ig",
    top_k: int | None = None,
    target: float = 0.8,
    sizes: list[int] | None = None,
    ablation: str = "patch",
    direction: Direction = "noise",
    metric: Metric | None = None,
    steps: int = 5,
    threshold: float = 0.05,
    max_batch_tokens: int = DEFAULT_EDGE_BATCH_TOKENS,
    by: Ranking = "auto",
    refine: int = 64,
) -> Graph:
    """Find a circuit for `task` on `model` with `method` (see module docstring); returns a pruned Graph."""
    check_option("method", method, DISCOVERY_METHODS)
    check_option("by", by, get_args(Ranking))
    metric = metric or task.metric
    assert metric is not None
    patcher = EdgePatcher(model, task, ablation, direction, metric, max_batch_tokens)
    if method == "acdc":
        graph = _acdc(patcher, edge_attribution(model, task, "eap", direction, metric), threshold)
        circuit, curve, curves, ranking = graph, None, {}, None
    else:
        if method == "patching":
            template = edge_attribution(model, task, "eap", direction, metric)
            graph = replace(edge_effects(patcher), meta=dict(template.meta))
        else:
            graph = edge_attribution(model, task, method, direction, metric, steps=steps)
        rankings = ("abs", "support") if by == "auto" else (by,)
        curves = {r: faithfulness_curve(patcher, graph, sizes, r) for r in rankings}
        ranking, curve, chosen = _choose(curves, target)
        if top_k is None:
            chosen = _between(patcher, graph, curve, ranking, chosen, target)
        circuit = graph.prune(top_k=top_k or chosen, by=ranking).without_dangling()  # type: ignore[arg-type]
        if circuit.n_edges <= refine:
            refined = _acdc(patcher, circuit, threshold, start=circuit.in_circuit).kept
            circuit = replace(circuit, kept=refined).without_dangling()
    score = faithfulness(patcher, circuit)
    circuit.meta.update(
        {
            "discovery": method,
            "ranked_by": ranking,
            "faithfulness": score,
            "ablation": ablation,
            "direction": direction,
            "metric": metric_name(metric),
            "curve": None if curve is None else curve.as_dict(),
            "curves": {r: c.as_dict() for r, c in curves.items()},
        }
    )
    return circuit


def _between(
    patcher: EdgePatcher, graph: Graph, curve: Curve, by: str, size: int, target: float, points: int = 8
) -> int:
    """The smallest circuit reaching `target` between the curve size below `size` and `size` itself: `points`
    evenly spaced sizes in that gap measured in one batch (the curve's sizes are log-spaced, so the gap can be
    large); `size` when none of them reaches the target or the curve has no smaller size."""
    below = [s for s in curve.sizes if s < size]
    if not below or size - below[-1] < 2:
        return size
    candidates = sorted({round(below[-1] + (size - below[-1]) * i / points) for i in range(1, points)} - {size})
    values = patcher.metric_of(top_k_masks(graph, candidates, by))
    span = curve.full - curve.empty
    reaching = [s for s, v in zip(candidates, values.tolist(), strict=True) if (v - curve.empty) / span >= target]
    return reaching[0] if reaching else size


def _choose(curves: dict[str, Curve], target: float) -> tuple[str, Curve, int]:
    """(ranking, its curve, size): the smallest curve size reaching `target` over all rankings (the first
    ranking wins ties), else the size with the best faithfulness."""
    reached = [
        (size, i, ranking)
        for i, (ranking, curve) in enumerate(curves.items())
        for size, f in zip(curve.sizes, curve.faithfulness, strict=True)
        if f >= target
    ]
    if reached:
        size, _, ranking = min(reached)
        return ranking, curves[ranking], size
    best = max(
        (f, -i, size, ranking)
        for i, (ranking, curve) in enumerate(curves.items())
        for size, f in zip(curve.sizes, curve.faithfulness, strict=True)
    )
    return best[3], curves[best[3]], best[2]


def _acdc(patcher: EdgePatcher, template: Graph, threshold: float, start: torch.Tensor | None = None) -> Graph:
    """Batched ACDC (see module docstring) from every edge, or from the edges `start` (S, R) marks; scores hold
    each edge's exact effect when it was tested."""
    valid = template.valid
    current = valid.clone() if start is None else start & valid
    full, empty, (current_metric,) = with_endpoints(patcher, valid, [current])
    span = full - empty
    if abs(span) < 1e-9:
        raise PathlensError("the metric does not change between the full and the empty graph; ACDC has no signal.")
    current_metric = float(current_metric)
    scores = torch.full_like(template.scores, float("nan"))
    for col in reversed(range(len(template.receivers))):
        incoming = torch.nonzero(current[:, col])[:, 0]
        if not incoming.numel():
            continue
        masks = current[None].repeat(len(incoming), 1, 1)
        masks[torch.arange(len(incoming)), incoming, col] = False
        effect = patcher.metric_of(masks) - current_metric
        scores[incoming, col] = effect.float()
        drop = incoming[(effect.abs() / abs(span)) < threshold]
        if drop.numel():
            current[drop, col] = False
            current_metric = float(patcher.metric_of(current[None])[0])
    return Graph(
        template.senders,
        template.receivers,
        scores,
        template.metric,
        "acdc",
        {**template.meta, "threshold": threshold},
        kept=current & valid,
    )


def layer_signature(nodes: tuple[str, ...]) -> Hashable:
    """Diversity signature of a path: its sequence of node types by layer ("L3.head", "L4.k", "L2.mlp", ...)."""
    out = []
    for name in nodes:
        node = parse_node(name)
        out.append(name if node is None or node.layer is None else f"L{node.layer}.{node.kind}")
    return tuple(out)


def pathways(
    patcher: EdgePatcher,
    circuit: Graph,
    k: int = 10,
    signature: Callable[[tuple[str, ...]], Hashable] | None = layer_signature,
    candidates: int = 3,
) -> list[dict[str, Any]]:
    """The top-k diverse input → logits paths through `circuit`, each with its own patching check: the
    normalized faithfulness of the circuit made of that path's edges alone.

    Paths are ranked by the product of |edge score| along them. Scores from gradient estimates (eap, eap-ig,
    relp) can get the size, even the sign, of attention-pattern edges wrong (the induction head's key input),
    so for those circuits the top `candidates`·k diverse paths are re-ranked on exact edge scores — the metric
    change when that edge alone is patched in the full model, as `discover(method="patching")` scores every
    edge — computed for the candidates' edges only (one batched row per edge). Each path reports that exact
    `score` and the `estimate` it was found with."""
    estimated = {path.nodes: path.score for path in circuit.paths(k=candidates * k, signature=signature)}
    if not estimated:
        return []
    ranked = circuit
    if not circuit.method.startswith(EXACT_SCORES):
        ranked = _rescored(patcher, circuit, [_edge_cells(circuit, nodes) for nodes in estimated])
    paths = ranked.paths(k=k, signature=signature)
    masks = []
    for path in paths:
        mask = torch.zeros_like(circuit.valid)
        for i, j in _edge_cells(circuit, path.nodes):
            mask[i, j] = True
        masks.append(mask)
    full, empty, values = with_endpoints(patcher, circuit.valid, masks)
    span = full - empty if abs(full - empty) > 1e-9 else float("nan")
    return [
        {
            "rank": i + 1,
            "nodes": list(path.nodes),
            "score": path.score,
            "estimate": estimated.get(path.nodes),
            "metric": float(values[i]),
            "faithfulness": (float(values[i]) - empty) / span,
        }
        for i, path in enumerate(paths)
    ]


def _edge_cells(graph: Graph, nodes: tuple[str, ...]) -> list[tuple[int, int]]:
    """(sender, receiver) indices of the graph edges along a path (sender → receiver input hops)."""
    return [
        (graph.senders.index(u), graph.receivers.index(v))
        for u, v in zip(nodes, nodes[1:], strict=False)
        if u in graph.senders and v in graph.receivers
    ]


def _rescored(patcher: EdgePatcher, circuit: Graph, paths: list[list[tuple[int, int]]]) -> Graph:
    """The circuit restricted to the edges of `paths`, each scored exactly (`edge_effects`)."""
    edges = torch.zeros_like(circuit.valid)
    for path in paths:
        for i, j in path:
            edges[i, j] = True
    scores = edge_effects(patcher, edges).scores
    return replace(circuit, scores=scores, kept=~torch.isnan(scores), method="patching:edges")
