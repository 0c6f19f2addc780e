"""`discover`: a circuit (a `Graph` with kept edges) for a model and task, and its top-K diverse pathways.

Methods:
    "eap" | "eap-ig" | "relp"  score every edge by gradients (`pathlens.attribution.edge_attribution`);
    "patching"                 score every edge exactly: the metric change when that edge alone is patched
                               (one batched row per edge — reference grade, for small graphs);
    "acdc"                     greedy pruning with exact edge patching (Conmy et al. 2023): receivers from the
                               logits backwards, the edges into each receiver from the nearest sender back;
                               an edge is removed when removing it, with every earlier removal kept, moves the
                               metric by less than `threshold` (in units of m(M) − m(∅)). The circuit is the
                               one this sequential walk gives (`tests/test_discover.py` checks it against a
                               one-edge-at-a-time reference); the walk is batched by speculation, so a receiver
                               usually costs one batched call (`_prune_receiver`). The inputs of a component
                               that no longer sends anything are removed without a call (their effect is 0).
For the scoring methods the circuit is the top-`top_k` edges ranked `by` (see `Graph.prune`: "abs" by
|score|, "support" by how much the edge supports the clean behaviour), or, without `top_k`, the smallest
circuit on the faithfulness curve reaching `target` (then narrowed: the smallest of 7 sizes evenly spaced below
it, down to the curve's previous size, that still reaches `target`). The default "auto" measures the curve of
both rankings and keeps the smaller circuit reaching `target`: ranking by support leaves out edges that work
against the behaviour and gives much smaller circuits when the estimates' signs are right (SmolLM2 IOI), while
|score| is robust when they are not (first-order and IG scores of an attention key route can have the wrong
sign). Edges that cannot carry a signal are then dropped (`Graph.without_dangling`, same metric), and a circuit
of at most `refine` edges gets one ACDC pass restricted to its own edges (`threshold`), kept only if the refined
circuit's exact faithfulness still reaches `target` (each removal moves the metric by less than `threshold`,
but their sum can be large).

The promise: the returned circuit reaches `target` (exact normalized faithfulness), or it is the best circuit the
search found, flagged `meta["reached_target"] = False` with a warning naming the target and the figure reached
(ACDC's circuit is what its `threshold` gives; an explicit `top_k` is the size asked for). The returned Graph's
meta records the faithfulness, the target and whether it was reached, the curve(s), the ranking, the ablation,
the direction and the metric.

Where the work runs: the scoring methods' independent evaluations (the exact edge scores of "patching", the
faithfulness curves, the sizes tried below the chosen one) run on `executor=` ("ray" or an executor object, see
`circuits.edge_work`) when one is given, bit-identical to a local run with the same torch threads per process;
ACDC's decisions are sequential (each depends on the last), so ACDC, the refinement pass and the single-circuit
checks always run in this process. Memory: `max_memory=` (bytes or a string such as "2GB") bounds the edge
attribution and the edge patcher, run one after the other, instead of `max_batch_tokens`.

Direction: "noise" by default (`pathlens.patching.spec.DEFAULT_DIRECTION`, the default of every method): the
clean prompts run and every edge outside the circuit carries its corrupted value — what ACDC, EAP-IG and MIB's
circuit track measure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, Literal, get_args

import torch

from pathlens.circuits.edge_attribution import EdgeMethod, edge_attribution
from pathlens.circuits.edge_effects import edge_effects
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.circuits.edge_work import metric_of
from pathlens.circuits.faithfulness import Curve, faithfulness, faithfulness_curve, top_k_masks, with_endpoints
from pathlens.circuits.layout import graph_layout, post_norms
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.budget import edge_patch_cost
from pathlens.patching.executor import Executor, resolved_executor
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, check_option
from pathlens.sites import parse_node
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric, metric_name

DiscoveryMethod = Literal["eap", "eap-ig", "relp", "patching", "acdc"]
DISCOVERY_METHODS: tuple[str, ...] = get_args(DiscoveryMethod)
Ranking = Literal["auto", "abs", "value", "support"]
EXACT_SCORES = ("patching", "acdc")  # Graph.method prefixes of graphs whose scores are exact edge effects
TARGET_TOLERANCE = 1e-6  # a circuit whose faithfulness is this far below the target reaches it (float32 rounding)


def discover(
    model: Model,
    task: Task,
    method: DiscoveryMethod = "eap-ig",
    top_k: int | None = None,
    target: float = 0.8,
    sizes: list[int] | None = None,
    ablation: str = "patch",
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
    steps: int = 5,
    threshold: float = 0.05,
    max_batch_tokens: int | None = None,
    by: Ranking = "auto",
    refine: int = 64,
    max_memory: int | str | None = None,
    executor: "str | Executor | None" = None,
) -> Graph:
    """Find a circuit for `task` on `model` with `method` (see module docstring); returns a pruned Graph.

    max_batch_tokens: tokens per edge-patched forward (default: `EdgePatcher`'s); max_memory: instead, a budget
    for the whole call (edge attribution, then the patcher); passing both raises. executor: where the scoring
    methods' independent evaluations run (None / "local", "ray", or an executor object; module docstring)."""
    check_option("method", method, DISCOVERY_METHODS)
    check_option("by", by, get_args(Ranking))
    if method == "acdc" and executor not in (None, "local"):
        raise PathlensError(
            "method='acdc' decides edge by edge (each decision depends on the last), so it runs in this process; "
            "drop executor=, or use a scoring method (eap, eap-ig, relp, patching) whose evaluations it spreads."
        )
    if max_memory is not None:
        _check_budget(model, task, max_batch_tokens, max_memory)
    metric = metric or task.metric
    assert metric is not None
    scoring: EdgeMethod = "eap" if method in EXACT_SCORES else method  # type: ignore[assignment]
    estimate = edge_attribution(model, task, scoring, direction, metric, steps=steps, max_memory=max_memory)
    patcher = EdgePatcher(model, task, ablation, direction, metric, max_batch_tokens, max_memory)
    if method == "acdc":
        circuit = _acdc(patcher, estimate, threshold)
        curve, curves, ranking, score = None, {}, None, faithfulness(patcher, circuit)
    else:
        with resolved_executor(executor) as runner:
            graph = estimate
            if method == "patching":
                graph = replace(edge_effects(patcher, executor=runner), meta=dict(estimate.meta))
            rankings = ("abs", "support") if by == "auto" else (by,)
            curves = {r: faithfulness_curve(patcher, graph, sizes, r, runner) for r in rankings}
            ranking, curve, chosen = _choose(curves, target)
            if top_k is None:
                chosen = _between(patcher, graph, curve, ranking, chosen, target, runner)
        circuit = graph.prune(top_k=top_k or chosen, by=ranking).without_dangling()  # type: ignore[arg-type]
        score = faithfulness(patcher, circuit)
        if circuit.n_edges <= refine:
            circuit, score = _refined(patcher, circuit, score, threshold, target)
    reached = score >= target - TARGET_TOLERANCE
    if not reached:
        warnings.warn(
            f"discover(method={method!r}) found no circuit reaching the target faithfulness {target:g}: the circuit "
            f"returned ({circuit.n_edges} edges) reaches {score:.3f}, flagged meta['reached_target'] = False. "
            "Widen the search: a lower `threshold` (acdc), more `sizes` or no `top_k` (scoring methods).",
            stacklevel=2,
        )
    circuit.meta.update(
        {
            "discovery": method,
            "ranked_by": ranking,
            "faithfulness": score,
            "target": target,
            "reached_target": reached,
            "ablation": ablation,
            "direction": direction,
            "metric": metric_name(metric),
            "curve": None if curve is None else curve.as_dict(),
            "curves": {r: c.as_dict() for r, c in curves.items()},
        }
    )
    return circuit


def _check_budget(model: Model, task: Task, max_batch_tokens: int | None, max_memory: int | str) -> None:
    """Raise before any forward if `max_memory` comes with `max_batch_tokens` or cannot hold one row of edge
    patching (`patching.budget.edge_patch_cost`, as `EdgePatcher` sizes its forwards)."""
    if max_batch_tokens is not None:
        raise PathlensError("pass max_memory= (bytes) or max_batch_tokens= (tokens per forward), not both.")
    senders = len(graph_layout(model).senders)
    cost = edge_patch_cost(model, task.n, task.seq_len, senders, post_norms(model) is not None)
    cost.rows_for(parse_bytes(max_memory))


def _refined(
    patcher: EdgePatcher, circuit: Graph, score: float, threshold: float, target: float
) -> tuple[Graph, float]:
    """(circuit, its faithfulness) after one ACDC pass over the circuit's own edges, if the refined circuit
    still reaches `target` (measured exactly); else the circuit unchanged, with `score` its faithfulness.
    ACDC's threshold bounds each removal's effect, not their sum, so a pass can fall below the target."""
    kept = _acdc(patcher, circuit, threshold, start=circuit.in_circuit).kept
    refined = replace(circuit, kept=kept).without_dangling()
    if refined.n_edges == circuit.n_edges:
        return circuit, score
    refined_score = faithfulness(patcher, refined)
    return (refined, refined_score) if refined_score >= target - TARGET_TOLERANCE else (circuit, score)


def _between(
    patcher: EdgePatcher,
    graph: Graph,
    curve: Curve,
    by: str,
    size: int,
    target: float,
    executor: Executor | None = None,
    points: int = 8,
) -> int:
    """The smallest circuit reaching `target` between the curve size below `size` and `size` itself: `points`
    evenly spaced sizes in that gap measured in one batch (the curve's sizes are log-spaced, so the gap can be
    large); `size` when none of them reaches the target or the curve has no smaller size."""
    below = [s for s in curve.sizes if s < size]
    if not below or size - below[-1] < 2:
        return size
    candidates = sorted({round(below[-1] + (size - below[-1]) * i / points) for i in range(1, points)} - {size})
    values = metric_of(patcher, top_k_masks(graph, candidates, by), executor)
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
    """ACDC (see module docstring) from every edge, or from the edges `start` (S, R) marks: the circuit that
    sequential ACDC returns, each decision one batched call in the common case (`_prune_receiver`). Scores hold
    each edge's exact effect when its decision was made (0 for the inputs of a component that sends nothing)."""
    valid = template.valid
    current = valid.clone() if start is None else start & valid
    full, empty, (current_metric,) = with_endpoints(patcher, valid, [current])
    span = full - empty
    if abs(span) < 1e-9:
        raise PathlensError("the metric does not change between the full and the empty graph; ACDC has no signal.")
    metric = float(current_metric)
    scores = torch.full_like(template.scores, float("nan"))
    feeds = _feeds(template)
    for col in reversed(range(len(template.receivers))):
        incoming = torch.nonzero(current[:, col])[:, 0].flip(0)  # the senders nearest the receiver first
        if not incoming.numel():
            continue
        if feeds[col].numel() and not current[feeds[col]].any():
            scores[incoming, col] = 0.0  # the component sends nothing: removing its inputs changes nothing
            current[incoming, col] = False
            continue
        guess = template.scores[incoming, col].abs() < threshold * abs(span)  # NaN: guess kept
        metric = _prune_receiver(patcher, current, col, incoming, guess, metric, threshold * abs(span), scores)
    return Graph(
        template.senders,
        template.receivers,
        scores,
        template.metric,
        "acdc",
        {**template.meta, "threshold": threshold},
        kept=current & valid,
    )


def _feeds(graph: Graph) -> list[torch.Tensor]:
    """Per receiver, the sender rows of the component it feeds (a head, a key-value group's heads, an MLP);
    empty for the logits."""
    index = {name: i for i, name in enumerate(graph.senders)}
    return [
        torch.tensor([index[node] for node in graph.receiver_nodes(r) if node in index], dtype=torch.long)
        for r in graph.receivers
    ]


def _prune_receiver(
    patcher: EdgePatcher,
    current: torch.Tensor,
    col: int,
    candidates: torch.Tensor,
    guess: torch.Tensor,
    metric: float,
    tolerance: float,
    scores: torch.Tensor,
) -> float:
    """Sequential ACDC over the edges `candidates` → receiver `col`, in order: each edge is removed from
    `current` (in place) when removing it, with every earlier removal kept, moves the metric by less than
    `tolerance`. Returns the metric of the circuit left.

    Batched by speculation: one call evaluates every remaining candidate, row i assuming the decisions
    `guess` (True = removed) for the candidates before it. The rows are valid up to the first candidate whose
    decision differs from its guess; their decisions are committed, the guesses of the rest are renewed from
    their (now stale) rows, and the rest is evaluated again. With good guesses a receiver costs one call."""
    first = 0
    while first < len(candidates):
        rest, assumed = candidates[first:], guess[first:]
        n = len(rest)
        earlier = torch.ones(n, n, dtype=torch.bool).tril(-1) & assumed[None]
        masks = current[None].repeat(n, 1, 1)
        masks[:, rest, col] = ~(earlier | torch.eye(n, dtype=torch.bool))
        values = patcher.metric_of(masks).tolist()
        effects, before = [], metric  # before: the metric of the state row i assumes
        for value, removed in zip(values, assumed.tolist(), strict=True):
            effects.append(value - before)
            before = value if removed else before
        decided = [abs(e) < tolerance for e in effects]
        wrong = next((i for i in range(n) if decided[i] != bool(assumed[i])), n - 1)
        for i in range(wrong + 1):  # rows up to the first wrong guess assumed the true state
            scores[rest[i], col] = effects[i]
            if decided[i]:
                current[rest[i], col] = False
                metric = values[i]
        guess = torch.tensor([False] * (first + wrong + 1) + decided[wrong + 1 :], dtype=torch.bool)
        first += wrong + 1
    return metric


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
    scores = edge_effects(patcher, edges=edges).scores
    return replace(circuit, scores=scores, kept=~torch.isnan(scores), method="patching:edges")
