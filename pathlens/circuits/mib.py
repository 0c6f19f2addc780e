"""Circuits in the Mechanistic Interpretability Benchmark's format (MIB, 2025, circuit localization track), both ways.

MIB's circuit files follow EAP-IG's graph JSON: `{"cfg": {...}, "nodes": {name: {"in_graph": bool}}, "edges":
{name: {"score": float, "in_graph": bool}}}`. Names, against pathlens' (`pathlens.graph`):

    pathlens          MIB                       pathlens edge              MIB edge
    input             input                     input → L0.H0.q            input->a0.h0<q>
    L3.H2             a3.h2                     L0.H1 → L1.H0.k            a0.h1->a1.h0<k>
    L3.mlp            m3                        input → L0.mlp             input->m0
    logits            logits                    L0.mlp → logits            m0->logits

`cfg` holds `n_layers`, `n_heads`, `parallel_attn_mlp` and `d_model` (MIB's loader needs all four), plus
`n_key_value_heads` and a `pathlens` block (metric, method, meta, whether the graph was pruned, the score dtype)
that makes the round trip exact; MIB's tools ignore both.

Grouped-query attention: MIB evaluates models with their key-value groups ungrouped, so every query head has its
own key and value input (`a1.h0<k>`); pathlens has one per group (`L1.G0.k`). Patching a group's key input
patches the key of every head of the group, so to first order the group edge's effect is the sum of its heads'
edge effects. Export therefore spreads a group edge's score evenly over the heads sharing it (each head's edge
gets score / heads_per_group, so the heads' scores sum to the group's, and the edge is in the circuit for every
head when it is in the group's), and records the exact group score as `group_score` on those edges. Import
collects the heads back into their group: the recorded `group_score`, else the sum of the heads' scores; the group
edge is in the circuit when any head's edge is (a coarser circuit can only keep a group's input whole). A file
whose cfg names no `n_key_value_heads` (MIB's own files) imports with one key / value input per head, exactly.

Nodes: a node is in the graph when it sends an edge of the circuit once dangling edges are dropped
(`Graph.without_dangling`; then it also has an incoming edge, unless it is `input`) — the fixed point MIB's
`prune` reaches before evaluating — and `logits` always is. Edges keep their own `in_graph` as the circuit has
it. Models without MLPs (attention-only) are written without `m{layer}` nodes; MIB's loader treats the missing
entries as outside the circuit.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.results.io import write_text
from pathlens.sites import parse_node

__all__ = ["MIB_FRACTIONS", "from_mib", "mib_sizes", "to_mib"]

#: MIB's edge fractions for the faithfulness curve (0.1 % … 100 % of edges).
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

_MLP_RE = re.compile(r"m(\d+)$")


def mib_sizes(edges_total: int) -> list[int]:
    """Edge counts at MIB's fractions: `int(fraction · edges_total)` (rounded down, as MIB's evaluation does), so
    the smallest fractions of a small graph give 0 edges (the empty circuit)."""
    return [int(f * edges_total) for f in MIB_FRACTIONS]


# ---- structure ------------------------------------------------------------------------------------------


class _Shape:
    """The dimensions of a pathlens edge graph and its names in both vocabularies."""

    def __init__(self, n_layers: int, n_heads: int, n_kv: int, mlp: bool, parallel: bool):
        if n_layers < 1 or n_heads < 1 or n_kv < 1 or n_heads % n_kv:
            raise PathlensError(
                f"MIB graph: n_layers={n_layers}, n_heads={n_heads}, n_key_value_heads={n_kv} do not describe a "
                "model (each must be >= 1 and n_heads a multiple of n_key_value_heads)."
            )
        self.n_layers, self.n_heads, self.n_kv, self.mlp, self.parallel = n_layers, n_heads, n_kv, mlp, parallel
        self.per_group = n_heads // n_kv

    def senders(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"L{layer}.H{h}" for h in range(self.n_heads)] + ([f"L{layer}.mlp"] if self.mlp else [])
        return names

    def receivers(self) -> list[str]:
        letter = "H" if self.n_kv == self.n_heads else "G"
        names: list[str] = []
        for layer in range(self.n_layers):
            names += [f"L{layer}.H{h}.q" for h in range(self.n_heads)]
            names += [f"L{layer}.{letter}{g}.{part}" for part in "kv" for g in range(self.n_kv)]
            names += [f"L{layer}.mlp"] if self.mlp else []
        return [*names, "logits"]

    def valid(self, senders: list[str], receivers: list[str]) -> torch.Tensor:
        """(S, R) bool: a sender writes before the receiver reads (the layout `graph_layout` builds)."""
        order = [_order(s, self.parallel) for s in senders]
        reads = torch.tensor([_read_at(r, self.parallel) for r in receivers])
        return torch.tensor(order)[:, None] < reads[None, :]

    def nodes(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + ([f"m{layer}"] if self.mlp else [])
        return [*names, "logits"]

    def mib_targets(self, receiver: str) -> list[tuple[str, str | None]]:
        """The MIB (child node, q/k/v) pairs one pathlens receiver stands for."""
        node = parse_node(receiver)
        assert node is not None
        if node.kind == "logits":
            return [("logits", None)]
        if node.kind == "mlp":
            return [(f"m{node.layer}", None)]
        index = node.index or 0
        heads = range(index * self.per_group, (index + 1) * self.per_group) if node.grouped else [index]
        return [(f"a{node.layer}.h{h}", node.kind) for h in heads]


def _order(sender: str, parallel: bool) -> float:
    """Position of a sender's write in the forward pass (input first; a layer's heads, then its MLP)."""
    node = parse_node(sender)
    assert node is not None
    if node.kind == "input":
        return -1.0
    return float(node.layer or 0) + (0.5 if node.kind == "mlp" and not parallel else 0.0)


def _read_at(receiver: str, parallel: bool) -> float:
    """Position of a receiver's read: senders whose `_order` is below it feed it."""
    node = parse_node(receiver)
    assert node is not None
    if node.kind == "logits":
        return math.inf
    if node.kind == "mlp" and not parallel:
        return float(node.layer or 0) + 0.25  # after the layer's heads, before its MLP
    return float(node.layer or 0) - 0.25


def _mib_node(sender: str) -> str:
    node = parse_node(sender)
    assert node is not None
    if node.kind == "head":
        return f"a{node.layer}.h{node.index}"
    return f"m{node.layer}" if node.kind == "mlp" else node.kind


def _edge_name(parent: str, child: str, part: str | None) -> str:
    return f"{parent}->{child}" if part is None else f"{parent}->{child}<{part}>"


def _shape_of(graph: Graph, parallel: bool | None) -> _Shape:
    """The graph's dimensions, read from its component names (which must be pathlens' own)."""
    kinds: dict[str, set[tuple[int, int]]] = {}
    for name in [*graph.senders, *graph.receivers]:
        node = parse_node(name)
        if node is None:
            raise PathlensError(
                f"to_mib: component {name!r} is not a pathlens edge-graph name (input, L3.H2, L3.mlp, L4.H1.q, "
                "L4.G0.k, logits); only graphs over heads, MLPs, input and logits have an MIB form."
            )
        key = node.kind + ("G" if node.grouped else "")
        kinds.setdefault(key, set()).add((-1 if node.layer is None else node.layer, node.index or 0))
    heads = kinds.get("head", set())
    if not heads:
        raise PathlensError("to_mib: the graph has no attention heads (senders like 'L0.H0'); nothing to export.")
    n_layers = 1 + max(layer for layer, _ in heads)
    n_heads = 1 + max(index for _, index in heads)
    groups = kinds.get("kG", set())
    n_kv = 1 + max(index for _, index in groups) if groups else n_heads
    shape = _Shape(n_layers, n_heads, n_kv, "mlp" in kinds, False)
    if parallel is None:
        sequential = shape.valid(graph.senders, graph.receivers) & ~_Shape(
            n_layers, n_heads, n_kv, shape.mlp, True
        ).valid(graph.senders, graph.receivers)
        parallel = shape.mlp and not bool((graph.valid & sequential).any())
    shape.parallel = parallel
    if graph.senders != shape.senders() or graph.receivers != shape.receivers():
        raise PathlensError(
            f"to_mib: the graph's senders/receivers are not the full layout of a {n_layers}-layer model with "
            f"{n_heads} heads ({n_kv} key-value groups); export a graph from edge_attribution / discover, whose "
            "components follow `graph_layout`."
        )
    outside = graph.valid & ~shape.valid(graph.senders, graph.receivers)
    if bool(outside.any()):
        i, j = (int(x) for x in torch.nonzero(outside)[0])
        raise PathlensError(
            f"to_mib: edge {graph.senders[i]} → {graph.receivers[j]} runs against the forward order of a "
            f"{'parallel' if parallel else 'sequential'} block; pass parallel= to match the model."
        )
    return shape


# ---- export ---------------------------------------------------------------------------------------------


def to_mib(
    graph: Graph, path: str | os.PathLike[str] | None = None, d_model: int | None = None, parallel: bool | None = None
) -> dict[str, Any]:
    """`graph` as an MIB circuit file (the dict; written atomically to `path` when given). `d_model` (MIB's
    loader requires it) defaults to `graph.meta["d_model"]`; `parallel` (attention and MLP read the same residual
    stream) is read from the graph's edges unless given. Only the graph's edges are listed; see the module
    docstring for names, grouped-query attention and node flags."""
    d_model = d_model if d_model is not None else graph.meta.get("d_model")
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
        raise PathlensError(
            f"to_mib: MIB's cfg needs d_model (a positive int), got {d_model!r}; pass d_model=model.arch.d_model."
        )
    shape = _shape_of(graph, parallel)
    valid, kept, scores = graph.valid.tolist(), graph.in_circuit.tolist(), graph.scores.tolist()
    parents = [_mib_node(s) for s in graph.senders]
    sends = {parents[i] for i in torch.nonzero(graph.without_dangling().in_circuit)[:, 0].tolist()}
    edges: dict[str, dict[str, Any]] = {}
    for j, receiver in enumerate(graph.receivers):
        targets = shape.mib_targets(receiver)
        for i in (i for i in range(len(parents)) if valid[i][j]):
            parent, score, in_graph = parents[i], scores[i][j], kept[i][j]
            for child, part in targets:
                entry: dict[str, Any] = {"score": score / len(targets), "in_graph": in_graph}
                if len(targets) > 1:
                    entry["group_score"] = score
                edges[_edge_name(parent, child, part)] = entry
    nodes = {name: {"in_graph": name == "logits" or name in sends} for name in shape.nodes()}
    cfg = {
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "parallel_attn_mlp": shape.parallel,
        "d_model": d_model,
        "n_key_value_heads": shape.n_kv,
        "pathlens": {
            "metric": graph.metric,
            "method": graph.method,
            "meta": graph.meta,
            "pruned": graph.kept is not None,
            "dtype": str(graph.scores.dtype).removeprefix("torch."),
        },
    }
    record = {"cfg": cfg, "nodes": nodes, "edges": edges}
    if path is not None:
        write_text(path, json.dumps(record))
    return record


# ---- import ---------------------------------------------------------------------------------------------


def from_mib(source: str | os.PathLike[str] | dict[str, Any]) -> Graph:
    """A `Graph` from an MIB circuit file (a path, or the loaded dict): scores and `kept` from the edges (edges
    the file does not list are not edges of the graph, NaN); metric, method and meta from the file's `pathlens`
    block when it has one (files pathlens wrote round-trip exactly), else metric "unknown" and method "mib"."""
    where = "the MIB dict" if isinstance(source, dict) else os.fspath(source)
    record = source if isinstance(source, dict) else _read(where)
    for key in ("cfg", "nodes", "edges"):
        if not isinstance(record.get(key), dict):
            raise PathlensError(f"from_mib: {where} has no {key!r} object; an MIB circuit file has cfg, nodes, edges.")
    cfg, nodes, entries = record["cfg"], record["nodes"], record["edges"]
    shape = _Shape(
        _cfg_int(cfg, "n_layers", where),
        _cfg_int(cfg, "n_heads", where),
        _cfg_int(cfg, "n_key_value_heads", where, default=cfg.get("n_heads")),
        any(_MLP_RE.match(name) for name in nodes),
        bool(cfg.get("parallel_attn_mlp", False)),
    )
    block = cfg.get("pathlens") if isinstance(cfg.get("pathlens"), dict) else {}
    senders, receivers = shape.senders(), shape.receivers()
    structure = shape.valid(senders, receivers)
    parents = [_mib_node(s) for s in senders]
    dtype = getattr(torch, str(block.get("dtype", "float32")), None)
    scores = torch.full((len(senders), len(receivers)), math.nan, dtype=torch.float64)
    kept = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    used: set[str] = set()
    for j, receiver in enumerate(receivers):
        targets = shape.mib_targets(receiver)
        for i in torch.nonzero(structure[:, j])[:, 0].tolist():
            names = [_edge_name(parents[i], child, part) for child, part in targets]
            found = [entries[n] for n in names if n in entries]
            if not found:
                continue
            if len(found) < len(names):
                missing = next(n for n in names if n not in entries)
                raise PathlensError(
                    f"from_mib: {where} lists some heads of a key-value group's edge but not {missing!r}; list every "
                    "head's edge, or drop n_key_value_heads from cfg to import per head."
                )
            used.update(names)
            scores[i, j], kept[i, j] = _collect(found, names[0], where)
    if len(used) < len(entries):
        unknown = sorted(set(entries) - used)
        raise PathlensError(
            f"from_mib: {where} names {len(unknown)} edge(s) that a {shape.n_layers}-layer, {shape.n_heads}-head "
            f"{'parallel' if shape.parallel else 'sequential'} model does not have, e.g. {unknown[0]!r}; check the "
            "file's cfg (n_layers, n_heads, parallel_attn_mlp) and edge names (parent->child<q|k|v>)."
        )
    graph_kept = kept if block.get("pruned", True) else None
    meta = dict(block.get("meta", {"source": where}))
    meta.setdefault("heads_per_group", shape.per_group)
    return Graph(
        senders,
        receivers,
        scores.to(dtype if isinstance(dtype, torch.dtype) else torch.float32),
        str(block.get("metric", "unknown")),
        str(block.get("method", "mib")),
        meta,
        graph_kept,
    )


def _read(path: str) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PathlensError(
            f"from_mib: cannot read {path} as JSON ({err}); give the path of an MIB circuit file."
        ) from err
    if not isinstance(record, dict):
        raise PathlensError(f"from_mib: {path} holds a {type(record).__name__}, not an MIB circuit object.")
    return record


def _cfg_int(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool):
        raise PathlensError(f"from_mib: cfg[{key!r}] in {where} must be an int, got {value!r}.")
    return value


def _collect(found: list[Any], name: str, where: str) -> tuple[float, bool]:
    """(score, in_graph) of one pathlens edge from its MIB edges (one, or one per head of a key-value group)."""
    for entry in found:
        if not isinstance(entry, dict) or not isinstance(entry.get("in_graph"), bool):
            raise PathlensError(f"from_mib: edge {name!r} in {where} needs a boolean 'in_graph' and a 'score'.")
        if isinstance(entry.get("score"), bool) or not isinstance(entry.get("score"), (int, float)):
            raise PathlensError(f"from_mib: edge {name!r} in {where} has score {entry.get('score')!r}, not a number.")
    group = {entry.get("group_score") for entry in found}
    if len(found) > 1 and len(group) == 1 and isinstance(next(iter(group)), (int, float)):
        score = float(next(iter(group)))  # type: ignore[arg-type]
    else:
        score = math.fsum(float(entry["score"]) for entry in found)
    return score, any(entry["in_graph"] for entry in found)
