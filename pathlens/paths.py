"""The k strongest source-to-sink paths through a DAG of scored edges, optionally kept diverse.

An attribution graph scores each edge u -> v between model components with a signed number: how much u
contributes to v. A path's strength is the product of the magnitudes of its edge scores, so that one weak link
makes the whole path weak, whatever the sign of each step. `top_paths` returns the strongest paths, best first.

How: with edge weight w = -log|score|, the strongest path is the shortest one, and Yen's algorithm lists
loopless paths in increasing length. Because |score| may exceed 1, weights may be negative, so Dijkstra does not
apply; the graph is a DAG, so one dynamic programme over a topological order gives every node's shortest way to
a sink instead. In a DAG a path never returns to the nodes before a spur node and the edges Yen's algorithm bans
all leave the spur node, so each spur path is one choice among the spur node's exits followed by that
precomputed shortest way: Yen's algorithm at the cost of a scan of out-edges per spur.

A virtual super-source precedes every source and every sink may exit to a virtual super-sink; both are implicit
(the empty root, and "stop here") and never appear in the output.

Ranking is exact: each weight is a float, and weights are summed as exact fixed-point integers, so a path's
cost is the same however it is split into root and spur, which Yen's algorithm needs. Paths are ordered by that
cost, then by node tuple (smaller first, and a path before its own extensions). Consequences: paths with the
same edge scores in a different order tie and are ordered by node tuple; paths whose products differ only by
rounding (about 1e-15 relative) may come in either order.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from pathlens.errors import PathlensError

__all__ = ["Path", "top_paths"]

# Every finite double is an integer multiple of 2**-1074, so scaling by 2**1074 turns it into an exact integer.
_FIXED_POINT_ONE = 1 << 1074

# A cost and the node tuple that the cost belongs to.
_Ranked = tuple[int, tuple[str, ...]]


@dataclass(frozen=True)
class Path:
    """One source-to-sink path.

    nodes: the node names from a source to a sink (at least two: a path has at least one edge).
    score: the product of |edge score| along the path.
    signature: the value of `top_paths`' signature function on `nodes`, or `nodes` itself when none was given.
    """

    nodes: tuple[str, ...]
    score: float
    signature: Hashable


def top_paths(
    edges: Mapping[tuple[str, str], float],
    sources: Iterable[str],
    sinks: Iterable[str],
    k: int,
    signature: Callable[[tuple[str, ...]], Hashable] | None = None,
    max_candidates: int = 10_000,
) -> list[Path]:
    """The k loopless source-to-sink paths with the highest product of |edge score|, best first.

    edges: u -> v with a signed, finite score; the graph must be acyclic. Edges scored 0 are ignored.
    sources, sinks: where paths start and end. A path has at least one edge and may pass through other sources
        and sinks on its way. Names that are in no nonzero edge match nothing, so they yield no paths (an empty
        list if none of the names is known), rather than an error.
    k: how many paths to return; fewer when the graph has fewer paths.
    signature: the diversity rule, as in K-Paths: paths are examined in score order and one is kept only if its
        signature (e.g. the sequence of layers it visits) differs from those of all paths kept so far. This stops
        the top k from being k near-copies of one route.
    max_candidates: with a signature, examine at most this many paths, so a graph whose paths all share a few
        signatures does not enumerate every path; fewer than k paths may be returned.

    Ties are broken by the node tuple (see the module docstring for what counts as a tie).
    Raises PathlensError for k < 1, max_candidates < 1, a non-finite score, or a cycle.
    """
    if k < 1:
        raise PathlensError(f"k must be at least 1 (got {k}); pass the number of paths you want")
    if max_candidates < 1:
        raise PathlensError(f"max_candidates must be at least 1 (got {max_candidates})")
    scores = _nonzero_scores(edges)
    ranked = _ranked_paths(_Completions(scores, frozenset(sources), frozenset(sinks)))
    if signature is None:
        return [_path(nodes, scores, nodes) for nodes in itertools.islice(ranked, k)]
    kept: list[Path] = []
    seen: set[Hashable] = set()
    for nodes in itertools.islice(ranked, max_candidates):
        key = signature(nodes)
        if key not in seen:
            seen.add(key)
            kept.append(_path(nodes, scores, key))
            if len(kept) == k:
                break
    return kept


def _path(nodes: tuple[str, ...], scores: Mapping[tuple[str, str], float], key: Hashable) -> Path:
    return Path(nodes, math.prod(abs(scores[u, v]) for u, v in zip(nodes, nodes[1:], strict=False)), key)


def _nonzero_scores(edges: Mapping[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """The edges with a nonzero score, after checking every score is finite (a log-weight needs one)."""
    for (u, v), score in edges.items():
        if not math.isfinite(score):
            raise PathlensError(f"edge {u!r} -> {v!r} has score {score}; edge scores must be finite numbers")
    return {edge: float(score) for edge, score in edges.items() if score != 0}


def _fixed_point(x: float) -> int:
    """x * 2**1074 as an exact integer, so that a sum of weights is exact, whatever the order of the additions."""
    numerator, denominator = x.as_integer_ratio()
    return numerator * (_FIXED_POINT_ONE // denominator)


class _Completions:
    """The best way to finish a path whose beginning (its root) is fixed, given the next steps it may not take.

    "Best" is the lowest total cost, then the smallest node tuple. Built from one dynamic programme over a reverse
    topological order: for every node, the best way from it to a sink, either stopping (a sink) or following one
    edge and then that node's best way.
    """

    def __init__(self, scores: Mapping[tuple[str, str], float], sources: frozenset[str], sinks: frozenset[str]) -> None:
        self._weights = {edge: _fixed_point(-math.log(abs(score))) for edge, score in scores.items()}
        self._successors: dict[str, list[str]] = {}
        for u, v in scores:
            self._successors.setdefault(u, []).append(v)
            self._successors.setdefault(v, [])
        self._sinks = sinks
        # node -> (cost of its best way to a sink, the next node on it, or None for "stop here")
        self._best: dict[str, tuple[int, str | None]] = {}
        for u in reversed(_topological_order(self._successors)):
            choice = self._best_exit(u, 0, may_stop=True, banned=frozenset())
            if choice is not None:
                self._best[u] = choice
        # source -> its best path with at least one edge, with that path's cost
        self._starts: dict[str, _Ranked] = {}
        for source in sources & self._successors.keys():
            start = self.extend((source,), 0, frozenset())
            if start is not None:
                self._starts[source] = start

    def weight(self, u: str, v: str) -> int:
        return self._weights[u, v]

    def extend(self, root: tuple[str, ...], root_cost: int, banned: Iterable[str | None]) -> _Ranked | None:
        """The best path that begins with `root` (cost `root_cost`) and whose next step is not in `banned`.

        A step is a node name, or None for "stop here" (allowed at a sink once the path has an edge). The empty
        root stands for the super-source: its steps are the sources. None if no such path exists.
        """
        if not root:
            keys = [(cost, nodes) for source, (cost, nodes) in self._starts.items() if source not in banned]
            return min(keys, default=None)
        choice = self._best_exit(root[-1], root_cost, may_stop=len(root) > 1, banned=banned)
        if choice is None:
            return None
        cost, step = choice
        nodes = list(root)
        while step is not None:
            nodes.append(step)
            step = self._best[step][1]
        return cost, tuple(nodes)

    def _best_exit(
        self, u: str, cost_so_far: int, may_stop: bool, banned: Iterable[str | None]
    ) -> tuple[int, str | None] | None:
        """The cheapest first step out of u toward a sink and the total cost through it; ties go to the smaller
        node tuple, so stopping (a prefix) beats going on and a smaller next node beats a larger one."""
        keys: list[tuple[int, int, str]] = [
            (cost_so_far + self._weights[u, v] + self._best[v][0], 1, v)
            for v in self._successors[u]
            if v in self._best and v not in banned
        ]
        if may_stop and u in self._sinks and None not in banned:
            keys.append((cost_so_far, 0, ""))
        if not keys:
            return None
        cost, goes_on, v = min(keys)
        return cost, v if goes_on else None


def _ranked_paths(completions: _Completions) -> Iterator[tuple[str, ...]]:
    """Every source-to-sink path in increasing cost (then node tuple) order, lazily: Yen's algorithm.

    Each path taken from the candidate heap spawns, for every prefix (root) of it, the best path that shares
    that root but then takes a step no path found so far has taken after that root. The found paths are kept in
    a trie, whose node for a root holds exactly those steps.
    """
    first = completions.extend((), 0, frozenset())
    if first is None:
        return
    heap: list[_Ranked] = [first]
    queued = {first[1]}
    trie: dict[str | None, dict] = {}
    while heap:
        _, path = heapq.heappop(heap)
        yield path
        branch = trie
        root_cost = 0
        for i in range(len(path) + 1):
            if i >= 2:
                root_cost += completions.weight(path[i - 2], path[i - 1])
            step = path[i] if i < len(path) else None
            branch.setdefault(step, {})
            candidate = completions.extend(path[:i], root_cost, branch)
            if candidate is not None and candidate[1] not in queued:
                queued.add(candidate[1])
                heapq.heappush(heap, candidate)
            branch = branch[step]


def _topological_order(successors: Mapping[str, list[str]]) -> list[str]:
    """The nodes in an order where every edge goes forward (Kahn's algorithm); PathlensError on a cycle."""
    indegree = dict.fromkeys(successors, 0)
    for targets in successors.values():
        for v in targets:
            indegree[v] += 1
    order = [u for u, d in indegree.items() if d == 0]
    for u in order:  # grows while iterating: a node is appended once all its predecessors are in order
        for v in successors[u]:
            indegree[v] -= 1
            if indegree[v] == 0:
                order.append(v)
    if len(order) < len(successors):
        cycle = _a_cycle({u: targets for u, targets in successors.items() if indegree[u] > 0})
        raise PathlensError(
            f"edges contain a cycle through {cycle[0]!r} ({' -> '.join(cycle)}); paths need an acyclic graph "
            "(a DAG): remove one of these edges or set its score to 0"
        )
    return order


def _a_cycle(stuck: Mapping[str, list[str]]) -> list[str]:
    """A cycle among the nodes Kahn's algorithm could not order, as u -> ... -> u.

    Each such node has a predecessor among them, so walking backwards from one must revisit a node.
    """
    predecessors: dict[str, list[str]] = {u: [] for u in stuck}
    for u, targets in stuck.items():
        for v in targets:
            if v in stuck:
                predecessors[v].append(u)
    walk = [min(stuck)]
    while walk[-1] not in walk[:-1]:
        walk.append(min(predecessors[walk[-1]]))
    start = walk.index(walk[-1])
    return walk[start:][::-1]
