"""`Graph`: scored edges between model components — the result type of edge attribution, and a circuit.

Senders are the components that write into the residual stream: "input" (the residual stream entering layer
0: token, and position, embeddings), heads "L3.H2", MLPs "L3.mlp". Receivers are the inputs that read from it:
a head's query "L4.H1.q", a key/value "L4.H1.k" (with grouped-query attention, per key-value group: "L4.G0.k"),
an MLP's input "L4.mlp", and "logits" (the final residual stream). An edge (sender, receiver) exists when the
sender writes before the receiver reads; `scores` holds NaN elsewhere.

A `Graph` is also a circuit: `kept` marks the edges in it (`prune` chooses them); every other edge is
patched when the circuit is evaluated. `paths` enumerates the top-K diverse routes from the input to the
logits (`pathlens.paths`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.paths import top_paths
from pathlens.results.display import diverging_colour, html_block, html_table, line_svg, provenance
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import Node, parse_node

_FORMAT_NAME = "pathlens.Graph"
_REPR_EDGES = 5
_HTML_EDGES = 12
_HEADER_KEYS = ("senders", "receivers", "metric", "method", "meta")


@dataclass
class Graph:
    """Edge scores (S, R) between `senders` and `receivers`, NaN where there is no edge; `kept` (S, R) bool
    marks the circuit (None: every edge). `meta` holds at least `heads_per_group` (query heads per key-value
    group) and, from attribution, `base_metric` and `direction`."""

    senders: list[str]
    receivers: list[str]
    scores: Tensor
    metric: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    kept: Tensor | None = None

    def __post_init__(self) -> None:
        shape = (len(self.senders), len(self.receivers))
        if tuple(self.scores.shape) != shape:
            raise PathlensError(f"Graph: scores have shape {tuple(self.scores.shape)}, expected {shape}.")
        if self.kept is not None:
            if tuple(self.kept.shape) != shape or self.kept.dtype != torch.bool:
                raise PathlensError(f"Graph: kept must be a bool tensor of shape {shape}.")
            if bool((self.kept & ~self.valid).any()):
                raise PathlensError("Graph: kept marks a pair of components that is not an edge (NaN score).")

    # ---- structure ----------------------------------------------------------------------------------

    @property
    def valid(self) -> Tensor:
        """(S, R) bool: which (sender, receiver) pairs are edges."""
        return ~torch.isnan(self.scores)

    @property
    def in_circuit(self) -> Tensor:
        """(S, R) bool: the edges of the circuit (all edges when nothing was pruned)."""
        return self.valid if self.kept is None else self.kept

    @property
    def edges_total(self) -> int:
        return int(self.valid.sum())

    @property
    def n_edges(self) -> int:
        return int(self.in_circuit.sum())

    def receiver_nodes(self, receiver: str) -> list[str]:
        """The component(s) a receiver input belongs to: "L4.H1.q" → ["L4.H1"]; a key-value group's input
        feeds every query head of the group; "L4.mlp" → ["L4.mlp"], or the latents and error of an SAE spliced on
        its output (`meta["feeds"]`); "logits" → ["logits"]."""
        fed = self.meta.get("feeds", {}).get(receiver)
        if fed is not None:
            return list(fed)
        node = parse_node(receiver)
        if node is None or node.kind not in ("q", "k", "v") or node.index is None:
            return [receiver]
        if not node.grouped:
            return [str(Node("head", node.layer, node.index))]
        per_group = int(self.meta.get("heads_per_group", 1))
        heads = range(node.index * per_group, (node.index + 1) * per_group)
        return [str(Node("head", node.layer, h)) for h in heads]

    # ---- tables -------------------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """One row per edge: sender, receiver, score, in_circuit; ordered by |score|, largest first."""
        rows, cols = torch.nonzero(self.valid, as_tuple=True)
        frame = pd.DataFrame(
            {
                "sender": [self.senders[i] for i in rows.tolist()],
                "receiver": [self.receivers[j] for j in cols.tolist()],
                "score": self.scores[rows, cols].tolist(),
                "in_circuit": self.in_circuit[rows, cols].tolist(),
            }
        )
        order = frame["score"].abs().sort_values(ascending=False, kind="stable").index
        return frame.loc[order].reset_index(drop=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k edges of largest |score|."""
        return self.to_frame().head(k)

    def node_scores(self) -> pd.Series:
        """Per sender, the sum of its outgoing edge scores: with EAP, the first-order effect of patching the
        sender's whole output (its AtP score), because its output reaches every later input additively."""
        totals = torch.nan_to_num(self.scores, nan=0.0).sum(dim=1)
        return pd.Series(totals.tolist(), index=self.senders, name="score")

    # ---- circuits -----------------------------------------------------------------------------------

    def prune(
        self,
        top_k: int | None = None,
        threshold: float | None = None,
        by: Literal["abs", "value", "support"] = "abs",
    ) -> Graph:
        """The circuit of the `top_k` edges (or those ranking ≥ `threshold`); a new Graph with `kept` set, scores
        unchanged. Ranked by |score| ("abs"), by signed score ("value"), or by how much the edge supports the
        clean behaviour ("support": the score oriented by `meta["direction"]` — with "noise" a score is the
        metric change when the edge is corrupted, so helpful edges score negative; with "denoise" positive).
        "support" leaves out edges that work against the behaviour (e.g. negative name movers in IOI), so such
        circuits can score a normalized faithfulness above 1."""
        if (top_k is None) == (threshold is None):
            raise PathlensError("prune: give exactly one of top_k= or threshold=.")
        if by not in ("abs", "value", "support"):
            raise PathlensError(f"prune: by must be 'abs', 'value' or 'support', got {by!r}.")
        rank = self.scores.abs() if by == "abs" else self.scores
        if by == "support":
            direction = self.meta.get("direction")
            if direction not in ("noise", "denoise"):
                raise PathlensError(
                    "prune(by='support') needs meta['direction'] ('noise' or 'denoise', set by edge attribution) "
                    "to orient the scores; use by='abs' or by='value' for this graph."
                )
            rank = -rank if direction == "noise" else rank
        rank = torch.where(self.valid, rank, torch.full_like(rank, -torch.inf))
        if top_k is not None:
            if top_k < 0:
                raise PathlensError(f"prune: top_k must be >= 0, got {top_k}.")
            kept = torch.zeros_like(self.valid)
            count = min(int(top_k), self.edges_total)
            if count:
                flat = torch.topk(rank.flatten(), count).indices
                kept.view(-1)[flat] = True
        else:
            kept = self.valid & (rank >= float(threshold))  # type: ignore[arg-type]
        return replace(self, kept=kept)

    def without_dangling(self) -> Graph:
        """The circuit without edges that cannot carry a signal, removed until none is left: edges out of a
        component none of whose inputs is in the circuit (its output is then the ablated one, so the edge
        changes nothing) and edges into a receiver whose component sends nothing (the logits always count).
        Edge patching gives the same metric with and without them."""
        feeds = torch.zeros(len(self.receivers), len(self.senders), dtype=torch.bool)
        index = {name: i for i, name in enumerate(self.senders)}
        for j, receiver in enumerate(self.receivers):
            for node in self.receiver_nodes(receiver):
                if node in index:
                    feeds[j, index[node]] = True
        is_input = torch.tensor([name not in self._components() for name in self.senders])
        is_logits = torch.tensor([r == "logits" for r in self.receivers])
        kept = self.in_circuit.clone()
        while True:
            fed = (kept.any(dim=0)[:, None] & feeds).any(dim=0) | is_input
            sends = (feeds & kept.any(dim=1)[None]).any(dim=1) | is_logits
            pruned = kept & fed[:, None] & sends[None]
            if torch.equal(pruned, kept):
                return replace(self, kept=kept)
            kept = pruned

    def _components(self) -> set[str]:
        """Senders that have inputs of their own (heads, MLPs): every node some receiver feeds."""
        return {node for receiver in self.receivers for node in self.receiver_nodes(receiver)}

    def nodes_in_circuit(self) -> list[str]:
        """Components touched by a kept edge, as senders or as receivers."""
        rows, cols = torch.nonzero(self.in_circuit, as_tuple=True)
        nodes = {self.senders[i] for i in rows.tolist()}
        for j in cols.tolist():
            nodes.update(self.receiver_nodes(self.receivers[j]))
        return sorted(nodes)

    # ---- paths and networkx ---------------------------------------------------------------------------

    def path_edges(self) -> dict[tuple[str, str], float]:
        """The circuit as a DAG for path search: sender → receiver input (the edge score) → component (1.0)."""
        edges: dict[tuple[str, str], float] = {}
        rows, cols = torch.nonzero(self.in_circuit, as_tuple=True)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            receiver = self.receivers[j]
            edges[(self.senders[i], receiver)] = float(self.scores[i, j])
            for node in self.receiver_nodes(receiver):
                if node != receiver:
                    edges[(receiver, node)] = 1.0
        return edges

    def paths(
        self,
        k: int = 10,
        sources: Sequence[str] = ("input",),
        sinks: Sequence[str] = ("logits",),
        signature: Callable[[tuple[str, ...]], Hashable] | None = None,
    ) -> list[Any]:
        """The k highest-scoring loopless paths (product of |edge score|) from `sources` to `sinks` through the
        circuit, with an optional diversity rule (`pathlens.paths.top_paths`). Receiver inputs appear
        in the paths ("L4.H1.k"), so a route through a head's key differs from one through its query."""
        return top_paths(self.path_edges(), sources, sinks, k, signature=signature)

    def to_networkx(self) -> Any:
        """A networkx MultiDiGraph of the circuit: component nodes (with `layer`), one edge per kept edge with
        `score` and `input` (q / k / v / mlp / logits)."""
        import networkx as nx

        g = nx.MultiDiGraph()
        for name in [*self.senders, "logits"]:
            g.add_node(name, layer=_layer_of(name))
        rows, cols = torch.nonzero(self.in_circuit, as_tuple=True)
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            receiver = self.receivers[j]
            for node in self.receiver_nodes(receiver):
                g.add_node(node, layer=_layer_of(node))
                g.add_edge(self.senders[i], node, score=float(self.scores[i, j]), input=receiver.rsplit(".", 1)[-1])
        return g

    # ---- pictures -----------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike[str], title: str = "", max_edges: int = 200, max_nodes: int = 50) -> None:
        """PNG of the circuit, laid out like the HTML report's circuit view: one row per layer (input on top,
        logits at the bottom), a layer's heads side by side by index, its MLP to their right half a row lower.
        Node size grows with importance (the summed |score| of the node's kept edges); edges are coloured by
        the sign of their score (red +, blue −), width by |score|. Drawn: the strongest kept edges, as many as
        keep the drawn nodes (input and logits included) at most `max_nodes`, and at most `max_edges`; the ten
        most important drawn components are named."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        frame = self.to_frame()
        edges = [
            (sender, receiver, score, self.receiver_nodes(receiver))
            for sender, receiver, score, kept in frame.itertuples(index=False)
            if kept
        ]
        importance: dict[str, float] = {}
        for sender, _, score, targets in edges:
            for name in (sender, *targets):
                importance[name] = importance.get(name, 0.0) + abs(score)
        drawn, nodes = [], {"input", "logits"}
        for edge in edges[:max_edges]:
            touched = nodes | {edge[0], *edge[3]}
            if len(touched) > max_nodes:
                break
            drawn.append(edge)
            nodes = touched
        parsed = [parse_node(n) for n in [*self.senders, *self.receivers]]
        n_layers = 1 + max((p.layer for p in parsed if p is not None and p.layer is not None), default=-1)
        n_heads = 1 + max(
            (p.index for p in parsed if p is not None and p.kind == "head" and p.index is not None), default=-1
        )
        middle = n_heads / 2

        def place(name: str) -> tuple[float, float]:
            node = parse_node(name)
            if node is None or node.layer is None:
                return middle, (float(n_layers) if name == "logits" else -1.0)
            if node.kind == "mlp":
                return float(n_heads), node.layer + 0.45
            return float(node.index or 0), float(node.layer)

        position = {name: place(name) for name in nodes}
        largest = max((importance.get(n, 0.0) for n in nodes - {"input", "logits"}), default=0.0) or 1.0
        size = {n: 2.5 + 7.5 * importance.get(n, 0.0) / largest for n in nodes}  # marker radius in points
        strongest = max((abs(e[2]) for e in drawn), default=1.0) or 1.0
        fig = Figure(figsize=(7.5, max(3.0, 1.2 + 0.26 * (n_layers + 2))), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for sender, receiver, score, targets in reversed(drawn):  # strongest drawn last, on top
            for target in targets:
                (x0, y0), (x1, y1) = position[sender], position[target]
                ax.annotate(
                    "",
                    xy=(x1, y1),
                    xytext=(x0, y0),
                    arrowprops={
                        "arrowstyle": "-|>",
                        "color": "#c0392b" if score > 0 else "#2166ac",
                        "lw": 0.4 + 2.6 * abs(score) / strongest,
                        "alpha": 0.75,
                        "shrinkA": size[sender] + 1,
                        "shrinkB": size[target] + 1,
                        "linestyle": {"k": "--", "v": ":"}.get(receiver.rsplit(".", 1)[-1], "-"),
                        "connectionstyle": f"arc3,rad={0.2 if abs(y1 - y0) > 1 else 0.0}",
                    },
                )
        components = sorted(nodes - {"input", "logits"}, key=lambda n: -importance.get(n, 0.0))
        for name in components:
            x, y = position[name]
            ax.plot(x, y, "o", ms=2 * size[name], mfc="#e8eef5", mec="#333333", mew=0.8, zorder=3)
        for name in components[:10]:
            x, y = position[name]
            ax.text(x + 0.12, y - 0.3, name, fontsize=6.5, zorder=4)
        for name in ("input", "logits"):
            x, y = position[name]
            ax.text(x, y, name, ha="center", va="center", fontsize=8, zorder=4, bbox={"boxstyle": "round", "fc": "w"})
        ax.set_xlim(-0.7, n_heads + 0.7)
        ax.set_ylim(n_layers + 0.7, -1.7)
        ax.set_yticks(range(n_layers), [f"L{layer}" for layer in range(n_layers)], fontsize=6)
        ax.set_xticks(range(n_heads + 1), [f"H{h}" for h in range(n_heads)] + ["MLP"], fontsize=7)
        ax.xaxis.tick_top()
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        heading = title or f"{self.method}: {self.n_edges} of {self.edges_total} edges"
        ax.set_title(f"{heading}\n(the {len(drawn)} strongest edges; red +, blue −; size: importance)", fontsize=9)
        fig.savefig(os.fspath(path), dpi=130)

    # ---- display ------------------------------------------------------------------------------------

    def _display_edges(self, k: int) -> tuple[str, pd.DataFrame]:
        """(caption, the k strongest edges): of the circuit when it was pruned, else of the whole graph."""
        frame = self.to_frame()
        if self.kept is not None:
            return f"top {k} circuit edges by |score|", frame[frame["in_circuit"]].head(k)
        return f"top {k} edges by |score|", frame.head(k)

    def _summary(self) -> str:
        circuit = f"{self.n_edges} in the circuit" if self.kept is not None else "not pruned"
        return (
            f"{len(self.senders)} senders x {len(self.receivers)} receivers, {self.edges_total} edges ({circuit}), "
            f"method={self.method!r}, metric={self.metric!r}"
        )

    def __repr__(self) -> str:
        lines = [f"Graph({self._summary()})"]
        origin = provenance(self.method, self.metric, self.meta)[2:]
        if origin:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in origin))
        caption, top = self._display_edges(_REPR_EDGES)
        if len(top):
            lines.append(f"  {caption}:")
            lines += [f"    {r.sender} -> {r.receiver}: {r.score:+.4g}" for r in top.itertuples()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Jupyter view: sizes and provenance, the faithfulness curve discovery measured (when in `meta`) as an
        inline SVG, and the strongest edges as a table coloured by sign; every name escaped."""
        caption, top = self._display_edges(_HTML_EDGES)
        largest = float(top["score"].abs().max()) if len(top) else 0.0
        parts = []
        curve = self.meta.get("curve")
        if isinstance(curve, dict) and {"sizes", "faithfulness", "edges_total"} <= curve.keys():
            xs = [size / curve["edges_total"] for size in curve["sizes"]]
            parts.append(line_svg(xs, curve["faithfulness"], "fraction of edges kept", "faithfulness"))
        parts.append(
            html_table(
                ["sender", "receiver", "in circuit", "score"],
                [[r.sender, r.receiver, r.in_circuit, f"{r.score:+.4g}"] for r in top.itertuples()],
                (diverging_colour(float(v), largest) for v in top["score"]),
            )
        )
        return html_block(
            f"Graph: {self._summary()} — {caption}", provenance(self.method, self.metric, self.meta), *parts
        )

    # ---- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """`<path>.safetensors` (scores, kept) and `<path>.json` (names, metric, method, meta), written atomically."""
        tensors = {"scores": self.scores.contiguous(), "kept": self.in_circuit.contiguous()}
        header = {
            "senders": self.senders,
            "receivers": self.receivers,
            "metric": self.metric,
            "method": self.method,
            "meta": self.meta,
            "pruned": self.kept is not None,
        }
        save_pair(path, _FORMAT_NAME, tensors, header)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Graph:
        tensors, header = load_pair(path, _FORMAT_NAME, ("scores", "kept"), _HEADER_KEYS)
        return Graph(
            senders=list(header["senders"]),
            receivers=list(header["receivers"]),
            scores=tensors["scores"],
            metric=header["metric"],
            method=header["method"],
            meta=header["meta"],
            kept=tensors["kept"] if header.get("pruned") else None,
        )


def _layer_of(node: str) -> int:
    """Layer of a component name for layout: input → -1, logits → a large number."""
    if node == "input":
        return -1
    if node == "logits":
        return 1 << 20
    parsed = parse_node(node)
    return -1 if parsed is None or parsed.layer is None else parsed.layer
