"""Tests for `pathlens.paths.top_paths`: exact K-best paths against brute force, diversity, errors."""

from __future__ import annotations

import math
from collections.abc import Hashable
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pathlens.errors import PathlensError
from pathlens.paths import Path, top_paths

Edges = dict[tuple[str, str], float]


# --- brute-force reference ------------------------------------------------------------------------------------


def all_paths(edges: Edges, sources: set[str], sinks: set[str]) -> list[tuple[str, ...]]:
    """Every path with at least one nonzero edge from a source to a sink, by depth-first search."""
    successors: dict[str, list[str]] = {}
    for (u, v), score in edges.items():
        if score != 0:
            successors.setdefault(u, []).append(v)
    found: list[tuple[str, ...]] = []

    def walk(path: tuple[str, ...]) -> None:
        if len(path) > 1 and path[-1] in sinks:
            found.append(path)
        for v in successors.get(path[-1], []):
            walk((*path, v))

    for source in sources:
        walk((source,))
    return found


def product(edges: Edges, nodes: tuple[str, ...]) -> float:
    return math.prod(abs(edges[u, v]) for u, v in zip(nodes, nodes[1:], strict=False))


def by_product(edges: Edges, sources: set[str], sinks: set[str]) -> list[Path]:
    """All paths, best product first: the order `top_paths` promises up to rounding-level ties."""
    paths = [Path(nodes, product(edges, nodes), nodes) for nodes in all_paths(edges, sources, sinks)]
    return sorted(paths, key=lambda p: (-p.score, p.nodes))


def by_exact_log_cost(edges: Edges, sources: set[str], sinks: set[str]) -> list[tuple[str, ...]]:
    """All paths in `top_paths`' documented exact order: the exact sum of the float weights -log|score|, then the
    node tuple. Computed independently with Fractions."""

    def cost(nodes: tuple[str, ...]) -> Fraction:
        return sum((Fraction(-math.log(abs(edges[u, v]))) for u, v in zip(nodes, nodes[1:], strict=False)), Fraction())

    return sorted(all_paths(edges, sources, sinks), key=lambda nodes: (cost(nodes), nodes))


def tied(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def assert_top_k(result: list[Path], reference: list[Path], k: int) -> None:
    """`result` is a top k of `reference`: same scores place by place, and the same paths up to the order within a
    group of tied scores (at the k-th place, any members of the tied group that straddles it)."""
    assert len(result) == min(k, len(reference))
    assert len({p.nodes for p in result}) == len(result)
    for got, want in zip(result, reference, strict=False):
        assert tied(got.score, want.score), (got, want)
    start = 0
    while start < len(result):
        end = start + 1
        while end < len(reference) and tied(reference[end - 1].score, reference[end].score):
            end += 1
        assert {p.nodes for p in result[start:end]} <= {p.nodes for p in reference[start:end]}
        start = end


# --- random DAGs --------------------------------------------------------------------------------------------------

SCORES = st.one_of(
    st.floats(0.05, 3.0),
    st.floats(-3.0, -0.05),
    st.sampled_from([0.5, -0.5, 1.0, 2.0, -2.0]),  # repeated values make exact ties
    st.just(0.0),  # ignored edges
)


@st.composite
def dags(draw: st.DrawFn) -> tuple[Edges, set[str], set[str]]:
    """2-9 nodes named "L<layer>.H<i>", edges a random subset of the pairs that go forward in a random topological
    order, random scores, 1-3 sources and 1-3 sinks (which may overlap)."""
    n = draw(st.integers(2, 9))
    names = [f"L{draw(st.integers(0, 3))}.H{i}" for i in range(n)]
    order = draw(st.permutations(names))
    pairs = [(order[i], order[j]) for i in range(n) for j in range(i + 1, n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)))
    edges = {pair: draw(SCORES) for pair in chosen}
    sources = draw(st.sets(st.sampled_from(names), min_size=1, max_size=3))
    sinks = draw(st.sets(st.sampled_from(names), min_size=1, max_size=3))
    return edges, sources, sinks


def layers(nodes: tuple[str, ...]) -> Hashable:
    """The sequence of layer numbers a path visits: "L3.H1" is in layer 3."""
    return tuple(int(name.split(".")[0][1:]) for name in nodes)


@settings(max_examples=200, deadline=None)
@given(dags(), st.integers(1, 12))
def test_matches_brute_force(dag: tuple[Edges, set[str], set[str]], k: int) -> None:
    edges, sources, sinks = dag
    result = top_paths(edges, sources, sinks, k)
    assert_top_k(result, by_product(edges, sources, sinks), k)
    assert [p.nodes for p in result] == by_exact_log_cost(edges, sources, sinks)[:k]
    for p in result:
        assert p.signature == p.nodes
        assert p.score == product(edges, p.nodes)


@settings(max_examples=200, deadline=None)
@given(dags(), st.integers(1, 6), st.integers(1, 40))
def test_diversity_keeps_first_path_of_each_signature(
    dag: tuple[Edges, set[str], set[str]], k: int, max_candidates: int
) -> None:
    edges, sources, sinks = dag
    expected: list[tuple[str, ...]] = []
    seen: set[Hashable] = set()
    for nodes in by_exact_log_cost(edges, sources, sinks)[:max_candidates]:
        if layers(nodes) not in seen and len(expected) < k:
            seen.add(layers(nodes))
            expected.append(nodes)
    result = top_paths(edges, sources, sinks, k, signature=layers, max_candidates=max_candidates)
    assert [p.nodes for p in result] == expected
    assert [p.signature for p in result] == [layers(nodes) for nodes in expected]


# --- hand-built examples ------------------------------------------------------------------------------------------


def nodes_of(paths: list[Path]) -> list[tuple[str, ...]]:
    return [p.nodes for p in paths]


def test_k_larger_than_path_count_returns_all() -> None:
    edges = {("s", "a"): 0.9, ("s", "b"): -0.5, ("a", "t"): 0.5, ("b", "t"): 0.8, ("a", "b"): 2.0}
    result = top_paths(edges, ["s"], ["t"], k=50)
    assert nodes_of(result) == [("s", "a", "b", "t"), ("s", "a", "t"), ("s", "b", "t")]
    assert [p.score for p in result] == pytest.approx([1.44, 0.45, 0.4])


def test_product_not_sum_decides() -> None:
    # By product: 0.9 * 0.9 = 0.81 beats 3.0 * 0.1 = 0.3. By sum of |score| it would be 1.8 against 3.1.
    edges = {("s", "a"): -0.9, ("a", "t"): 0.9, ("s", "b"): 3.0, ("b", "t"): -0.1}
    result = top_paths(edges, ["s"], ["t"], k=2)
    assert nodes_of(result) == [("s", "a", "t"), ("s", "b", "t")]
    assert [p.score for p in result] == pytest.approx([0.81, 0.3])


def test_scores_above_one_favour_longer_paths() -> None:
    # Weights -log|score| are negative above 1: the three-edge path (27) beats the one-edge path (5).
    edges = {("s", "t"): 5.0, ("s", "a"): 3.0, ("a", "b"): 3.0, ("b", "t"): 3.0}
    assert nodes_of(top_paths(edges, ["s"], ["t"], k=2)) == [("s", "a", "b", "t"), ("s", "t")]


def test_exact_ties_go_to_the_smaller_node_tuple() -> None:
    diamond = {("s", "b"): 0.5, ("b", "t"): 0.25, ("s", "a"): 0.25, ("a", "t"): 0.5}
    assert nodes_of(top_paths(diamond, ["s"], ["t"], k=2)) == [("s", "a", "t"), ("s", "b", "t")]
    # The same scores in the opposite order tie exactly, although float sums of their logs differ in the last bit
    # (-log 1.57 + (-log 1.81 + -log 0.2) < -log 0.2 + (-log 1.81 + -log 1.57)).
    chains = {("s", "z1"): 1.57, ("z1", "z2"): 1.81, ("z2", "t"): 0.2}
    chains |= {("s", "a1"): 0.2, ("a1", "a2"): 1.81, ("a2", "t"): 1.57}
    assert nodes_of(top_paths(chains, ["s"], ["t"], k=2)) == [("s", "a1", "a2", "t"), ("s", "z1", "z2", "t")]
    # A path ending at a sink comes before its own (equally scored) extension through that sink.
    chain = {("s", "m"): 2.0, ("m", "t"): 1.0}
    assert nodes_of(top_paths(chain, ["s"], ["m", "t"], k=2)) == [("s", "m"), ("s", "m", "t")]


def test_virtual_endpoints_and_single_nodes_never_appear() -> None:
    edges = {("a", "b"): 0.5, ("b", "c"): 0.5}
    result = top_paths(edges, ["a", "b"], ["b", "c"], k=10)
    assert nodes_of(result) == [("a", "b"), ("b", "c"), ("a", "b", "c")]


def test_multiple_sources_and_sinks() -> None:
    edges = {("x1", "h"): 0.5, ("x2", "h"): 0.9, ("h", "y1"): 0.8, ("h", "y2"): 0.1}
    result = top_paths(edges, ["x1", "x2"], ["y1", "y2"], k=3)
    assert nodes_of(result) == [("x2", "h", "y1"), ("x1", "h", "y1"), ("x2", "h", "y2")]


def test_unknown_or_unreachable_names_give_no_paths() -> None:
    edges = {("a", "b"): 0.5, ("c", "d"): 0.0}
    assert top_paths(edges, ["nowhere"], ["b"], k=3) == []
    assert top_paths(edges, ["a"], ["nowhere"], k=3) == []
    assert top_paths(edges, ["b"], ["a"], k=3) == []
    assert top_paths(edges, ["c"], ["d"], k=3) == []  # only a zero-score edge joins them


def test_signature_with_few_candidates_stops_early() -> None:
    edges = {("L0.s", "L1.a"): 0.9, ("L0.s", "L1.b"): 0.8, ("L1.a", "L2.t"): 0.9, ("L1.b", "L2.t"): 0.9}
    edges |= {("L0.s", "L2.t"): 0.1}
    result = top_paths(edges, ["L0.s"], ["L2.t"], k=3, signature=layers)
    assert nodes_of(result) == [("L0.s", "L1.a", "L2.t"), ("L0.s", "L2.t")]
    assert [p.signature for p in result] == [(0, 1, 2), (0, 2)]
    assert nodes_of(top_paths(edges, ["L0.s"], ["L2.t"], k=3, signature=layers, max_candidates=2)) == [
        ("L0.s", "L1.a", "L2.t")
    ]


# --- errors -------------------------------------------------------------------------------------------------------


def test_cycle_is_an_error_naming_a_node_on_it() -> None:
    edges = {("in", "a"): 0.5, ("a", "b"): 0.5, ("b", "c"): 0.5, ("c", "a"): 0.5, ("c", "out"): 0.5}
    with pytest.raises(PathlensError, match=r"cycle through 'a' \(a -> b -> c -> a\).*acyclic"):
        top_paths(edges, ["in"], ["out"], k=1)
    with pytest.raises(PathlensError, match=r"cycle through 'a' \(a -> a\).*acyclic"):
        top_paths({("a", "a"): 2.0}, ["a"], ["a"], k=1)


def test_zero_score_edge_does_not_close_a_cycle() -> None:
    edges = {("a", "b"): 0.5, ("b", "a"): 0.0}
    assert nodes_of(top_paths(edges, ["a"], ["b"], k=1)) == [("a", "b")]


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_is_an_error(k: int) -> None:
    with pytest.raises(PathlensError, match=rf"k must be at least 1 \(got {k}\)"):
        top_paths({("a", "b"): 0.5}, ["a"], ["b"], k=k)


def test_bad_max_candidates_and_non_finite_scores_are_errors() -> None:
    with pytest.raises(PathlensError, match=r"max_candidates must be at least 1"):
        top_paths({("a", "b"): 0.5}, ["a"], ["b"], k=1, signature=layers, max_candidates=0)
    with pytest.raises(PathlensError, match=r"edge 'a' -> 'b' has score nan.*finite"):
        top_paths({("a", "b"): math.nan}, ["a"], ["b"], k=1)
    with pytest.raises(PathlensError, match=r"edge 'a' -> 'b' has score inf.*finite"):
        top_paths({("a", "b"): math.inf}, ["a"], ["b"], k=1)
