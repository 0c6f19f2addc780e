"""The report's readable circuit view: one SVG with the edge view and, beside it, the node-level view.

Layout: one row per layer (input on top, logits at the bottom), the heads of a layer side by side by index and
the layer's MLP to their right, half a row lower (it reads after the heads). The same rows carry the node-level
view on the right: every head and MLP of the model as a dot on a (layer × head) grid, with no edges.

- Node size shows importance: the summed |score| of the component's edges in the circuit (in and out, every
  kept edge, not just the drawn ones); area ∝ importance.
- Edge colour shows the sign of the score, i.e. of the edge's effect on the metric; the legend says what each
  sign means for the patching direction the scores were computed with. Width ∝ |score|.
- The top pathways (rows of `pathlens.circuits.discover.pathways`) get a gold halo and stay visible.
- A slider sets how many edges are drawn (the strongest by |score|); the page's script hides the other edges
  and the nodes no drawn edge touches. `?edges=N` in the page's URL (or `?edges=all`) sets it on load.
- Default: the most edges whose components (with input, logits and the pathways' nodes) number at most
  `NODE_BUDGET`, so the first view can be read; the full circuit stays in the files.
- Hover: every node and edge has a `<title>` with its name, score, rank and whether the score is an exact
  effect or an estimate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from pathlens.circuits.discover import EXACT_SCORES
from pathlens.graph import Graph
from pathlens.report.markup import esc, html_table, signed
from pathlens.sites import parse_node

__all__ = [
    "HIGHLIGHTED_PATHWAYS",
    "LABELLED_NODES",
    "MAX_DRAWN_EDGES",
    "NEGATIVE",
    "NODE_BUDGET",
    "POSITIVE",
    "SCRIPT",
    "CircuitView",
    "circuit_section",
    "circuit_view",
    "radius",
]

MAX_DRAWN_EDGES = 300
"""The slider's range: at most this many of the strongest kept edges are in the page (plus pathway edges)."""
NODE_BUDGET = 50
"""The default view shows the most edges whose components (input and logits included) number at most this."""
POSITIVE, NEGATIVE = "#c0392b", "#2166ac"
PATHWAY = "#f2b632"
_TINT = {POSITIVE: "#f6d5d1", NEGATIVE: "#d3e2f1"}
_MAX_EDGE_ROWS = 25
_DASH = {"q": "", "k": "6 3", "v": "1.5 2.5"}
_PORT = {"q": -0.7, "k": 0.0, "v": 0.7}
_LAYER_RE = re.compile(r"^L(\d+)\.")
_LATENT_RE = re.compile(r"^L\d+\.[a-z0-9_]+\.(F\d+|err)$")  # a spliced dictionary's latent or error node
# geometry (px): row height, slot width of the edge view, cell width of the node view, radii, margins
HIGHLIGHTED_PATHWAYS = 3
"""How many of the top pathways get a halo (all of them are listed in the pathways table)."""
LABELLED_NODES = 10
"""The most important components are labelled with their names (every node has a tooltip)."""
_ROW, _CELL, _EDGE_PANEL = 20.0, 14.0, 620.0
_R_MIN, _R_MAX, _DOT_MAX = 2.5, 10.0, 6.2
_LEFT, _TOP, _GAP = 40.0, 48.0, 44.0

SCRIPT = """
(function () {
  "use strict";
  document.querySelectorAll(".circuit-view").forEach(function (view) {
    var svg = view.querySelector("svg.circuit");
    var slider = view.querySelector("input.edge-count");
    var keepPaths = view.querySelector("input.keep-paths");
    var status = view.querySelector("output.edge-status");
    var lines = svg.querySelectorAll(".edge, .halo");
    var edges = svg.querySelectorAll(".edge");
    var nodes = svg.querySelectorAll("g.node");
    function show(element, on) {
      if (on) { element.removeAttribute("display"); } else { element.setAttribute("display", "none"); }
    }
    function visible(line, limit) {
      return Number(line.getAttribute("data-rank")) <= limit || (keepPaths.checked && line.hasAttribute("data-path"));
    }
    function update() {
      var limit = Number(slider.value), used = {}, ranks = {}, nEdges = 0, nNodes = 0;
      lines.forEach(function (line) { show(line, visible(line, limit)); });
      edges.forEach(function (edge) {
        if (visible(edge, limit)) {
          used[edge.getAttribute("data-from")] = true;
          used[edge.getAttribute("data-to")] = true;
          ranks[edge.getAttribute("data-rank")] = true;
        }
      });
      nEdges = Object.keys(ranks).length;
      nodes.forEach(function (node) {
        var on = node.hasAttribute("data-always") || used[node.getAttribute("data-node")] === true;
        show(node, on);
        if (on) { nNodes += 1; }
      });
      svg.setAttribute("data-shown-edges", String(nEdges));
      svg.setAttribute("data-shown-nodes", String(nNodes));
      status.textContent = nEdges + " edges, " + nNodes + " nodes shown";
    }
    var asked = new URLSearchParams(window.location.search).get("edges");
    if (asked === "all") { slider.value = slider.max; } else if (asked !== null && isFinite(Number(asked))) {
      slider.value = asked;
    }
    slider.addEventListener("input", update);
    keepPaths.addEventListener("change", update);
    update();
    nodes.forEach(function (node) {
      var name = node.getAttribute("data-node");
      node.addEventListener("mouseenter", function () {
        svg.classList.add("focus");
        edges.forEach(function (edge) {
          if (edge.getAttribute("data-from") === name || edge.getAttribute("data-to") === name) {
            edge.classList.add("hi");
          }
        });
      });
      node.addEventListener("mouseleave", function () {
        svg.classList.remove("focus");
        edges.forEach(function (edge) { edge.classList.remove("hi"); });
      });
    });
  });
})();
"""

STYLE = """
.circuit-view .controls { display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; align-items: center; margin: 0.3rem 0; }
.circuit-view input.edge-count { width: 18rem; vertical-align: middle; }
.legend span.swatch { display: inline-block; width: 1.6em; height: 0.35em; vertical-align: middle; margin: 0 0.3em; }
svg.circuit .edge { transition: opacity 0.1s; }
svg.circuit.focus .edge, svg.circuit.focus .halo { opacity: 0.07; }
svg.circuit.focus .edge.hi { opacity: 1; }
svg.circuit text.head { font-size: 10px; fill: #666; }
svg.circuit text.panel { font-size: 12px; font-weight: 600; fill: #333; }
svg.circuit text.name { font-size: 10px; fill: #222; paint-order: stroke; stroke: #fff; stroke-width: 3px; }
"""


@dataclass(frozen=True)
class ViewEdge:
    """One kept edge in the page: its rank among kept edges by |score| (1 = strongest), names and pathways."""

    rank: int
    sender: str
    receiver: str
    targets: tuple[str, ...]  # the component(s) the receiver input belongs to
    score: float
    pathways: tuple[int, ...] = ()  # ranks of the top pathways that run through it


@dataclass(frozen=True)
class ViewNode:
    """A component's place and weight: row (layer; MLPs half a row after their layer's heads), slot in the
    row, importance (summed |score| of its kept edges) and net (summed score of its kept outgoing edges)."""

    name: str
    row: float
    slot: float
    importance: float
    net: float
    kept_edges: int


@dataclass
class CircuitView:
    """What the view draws: every component, the edges in the page (strongest first) and the default count."""

    nodes: dict[str, ViewNode]
    edges: list[ViewEdge]
    n_layers: int
    n_heads: int
    n_slots: int  # heads (0..H-1), then the MLP slot, then any other components
    kept: int  # edges in the circuit
    slider_max: int  # the strongest this many kept edges are in the page (and any pathway edge beyond them)
    default_edges: int = 0  # the slider's starting value

    @property
    def slot_width(self) -> float:
        """Horizontal room per head: the edge panel spreads over about `_EDGE_PANEL` px."""
        return min(64.0, max(34.0, _EDGE_PANEL / max(self.n_slots, 1)))

    def x(self, slot: float) -> float:
        """The x of a slot's centre in the edge panel."""
        return _LEFT + (slot + 0.5) * self.slot_width

    @property
    def pathway_nodes(self) -> set[str]:
        return {name for edge in self.edges if edge.pathways for name in (edge.sender, *edge.targets)}

    def shown(self, limit: int, keep_paths: bool = True) -> tuple[list[ViewEdge], set[str]]:
        """The edges drawn with the slider at `limit` and the nodes they touch (with input and logits)."""
        edges = [e for e in self.edges if e.rank <= limit or (keep_paths and e.pathways)]
        nodes = {"input", "logits"} & set(self.nodes)
        for edge in edges:
            nodes.add(edge.sender)
            nodes.update(edge.targets)
        return edges, nodes


def circuit_view(
    graph: Graph,
    pathways: Sequence[Mapping[str, Any]] = (),
    max_edges: int = MAX_DRAWN_EDGES,
    node_budget: int = NODE_BUDGET,
) -> CircuitView:
    """The view of `graph`'s circuit: node places and importances, the `max_edges` strongest kept edges (and
    every edge of the first `HIGHLIGHTED_PATHWAYS` `pathways`), and the default edge count (the most whose nodes
    number ≤ `node_budget`).

    A key or value input shared by a group of query heads (grouped-query attention) feeds every head of the
    group; its edge is drawn to (and counted for) the heads of the group that send on in the circuit, or to all
    of them when none does — a head whose output is not in the circuit cannot carry what it reads."""
    frame = graph.to_frame()
    kept = frame[frame["in_circuit"]].reset_index(drop=True)
    on_path = _pathway_edges(graph, pathways[:HIGHLIGHTED_PATHWAYS])
    sending = set(kept["sender"])
    importance: dict[str, float] = {}
    net: dict[str, float] = {}
    counts: dict[str, int] = {}
    edges = []
    for rank, (sender, receiver, score) in enumerate(kept[["sender", "receiver", "score"]].itertuples(index=False), 1):
        group = graph.receiver_nodes(receiver)
        targets = tuple(n for n in group if n in sending) or tuple(group)
        for name in (sender, *targets):
            importance[name] = importance.get(name, 0.0) + abs(score)
            counts[name] = counts.get(name, 0) + 1
        net[sender] = net.get(sender, 0.0) + score
        paths = tuple(on_path.get((sender, receiver), ()))
        if rank <= max_edges or paths:
            edges.append(ViewEdge(rank, sender, receiver, targets, float(score), paths))
    names = dict.fromkeys(["input", *graph.senders, *(n for r in graph.receivers for n in graph.receiver_nodes(r))])
    parsed = {name: parse_node(name) for name in names}
    n_layers = 1 + max((p.layer for p in parsed.values() if p is not None and p.layer is not None), default=-1)
    n_heads = 1 + max(
        (p.index for p in parsed.values() if p is not None and p.kind == "head" and p.index is not None), default=-1
    )
    has_mlp = any(p is not None and p.kind == "mlp" for p in parsed.values())
    outside = [n for n, p in parsed.items() if p is None or p.kind not in ("input", "logits", "mlp", "head")]
    # other components (a spliced dictionary's latents and error, of which a graph may hold thousands) get a slot
    # only when the circuit touches them; the rest are left out of the picture
    others = [n for n in outside if n in counts]
    parsed = {n: p for n, p in parsed.items() if n not in outside or n in counts}
    latent_slot: dict[str, int] = {}  # a layer's latents side by side after the MLP slot, in the order met
    per_layer: dict[str, int] = {}
    for name in others:
        if _LATENT_RE.match(name):
            layer_name = name.split(".", 1)[0]
            latent_slot[name] = per_layer.get(layer_name, 0)
            per_layer[layer_name] = latent_slot[name] + 1
    latent_width = max(per_layer.values(), default=0)
    free = [n for n in others if n not in latent_slot]
    middle = (n_heads + has_mlp - 1) / 2
    nodes = {}
    for name, node in parsed.items():
        layer = node.layer if node is not None and node.layer is not None else -1
        if name in others:
            match = _LAYER_RE.match(name)
            after_heads = 0.45 if name in latent_slot else 0.0  # latents write where their MLP does
            row = float(match[1]) + after_heads if match else -1.0
            offset = latent_slot[name] if name in latent_slot else latent_width + free.index(name)
            slot = float(n_heads + has_mlp + offset)
        elif node is not None and node.kind in ("input", "logits"):
            row, slot = (-1.0 if node.kind == "input" else float(n_layers)), middle
        elif node is not None and node.kind == "mlp":
            row, slot = layer + 0.45, float(n_heads)
        else:
            row, slot = float(layer), float(node.index if node is not None and node.index is not None else 0)
        nodes[name] = ViewNode(name, row, slot, importance.get(name, 0.0), net.get(name, 0.0), counts.get(name, 0))
    n_slots = n_heads + int(has_mlp) + latent_width + len(free)
    view = CircuitView(nodes, edges, n_layers, n_heads, n_slots, len(kept), min(len(kept), max_edges))
    view.default_edges = _default_edges(view, node_budget)
    return view


def _pathway_edges(graph: Graph, pathways: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[int]]:
    """(sender, receiver input) → the ranks of the pathways whose hops include that edge."""
    senders, receivers = set(graph.senders), set(graph.receivers)
    on_path: dict[tuple[str, str], list[int]] = {}
    for pathway in pathways:
        hops = [str(n) for n in pathway.get("nodes", ())]
        for u, v in zip(hops, hops[1:], strict=False):
            if u in senders and v in receivers:
                on_path.setdefault((u, v), []).append(int(pathway.get("rank", 0)))
    return on_path


def _default_edges(view: CircuitView, budget: int) -> int:
    """The largest edge count whose drawn nodes (with input, logits and the pathways' nodes) number ≤ `budget`."""
    _, seen = view.shown(0)
    best = 0
    for edge in view.edges:
        if edge.rank > best + 1:
            break
        seen = seen | {edge.sender, *edge.targets}
        if len(seen) > budget:
            break
        best = edge.rank
    return best


# ---- the section ----------------------------------------------------------------------------------------


def circuit_section(graph: Graph, pathways: Sequence[Mapping[str, Any]] = ()) -> str:
    """Caption, legend, the edge-count control, the SVG (edge view and node view) and the strongest edges."""
    view = circuit_view(graph, pathways)
    parts = [graph.method, f"metric {graph.metric}", f"{graph.n_edges} of {graph.edges_total} edges kept"]
    if isinstance(graph.meta.get("faithfulness"), Real):
        parts.append(f"faithfulness {graph.meta['faithfulness']:.3f}")
    if graph.meta.get("reached_target") is False:
        parts.append(f"below its target {graph.meta.get('target')}: the best circuit found")
    if graph.meta.get("linearised_post_norms"):
        parts.append(f"edges linearised: {graph.meta.get('linearisation', 'post-sublayer norm scales held fixed')}")
    caption = f'<p class="caption">{esc(" · ".join(parts))}</p>'
    if not view.edges:
        return caption + "\n<p>No edges kept.</p>"
    shown_edges, shown_nodes = view.shown(view.default_edges)
    how = (
        f"Opens on the {view.default_edges} strongest edges (the most whose components, with input, logits and the "
        f"highlighted pathways', number at most {NODE_BUDGET}); the slider reaches the "
        f"{view.slider_max} strongest of the {view.kept} kept edges, and the full circuit is in "
        "the saved files (circuit.safetensors, edges.csv)."
    )
    controls = (
        '<div class="controls">'
        f'<label>edges shown <input class="edge-count" type="range" min="1" max="{view.slider_max}" '
        f'value="{max(view.default_edges, 1)}" aria-label="number of edges shown, strongest first"></label>'
        f'<output class="edge-status">{len({e.rank for e in shown_edges})} edges, {len(shown_nodes)} nodes '
        "shown</output>"
        '<label><input class="keep-paths" type="checkbox" checked> always show the highlighted pathways</label>'
        "</div>"
    )
    rows = [
        [
            (esc(edge.rank), True),
            (f'<span class="token">{esc(edge.sender)}</span>', False),
            (f'<span class="token">{esc(edge.receiver)}</span>', False),
            (esc(signed(edge.score)), True),
        ]
        for edge in view.edges[:_MAX_EDGE_ROWS]
    ]
    table = html_table(["rank", "sender", "receiver", "score"], rows)
    return (
        f'<div class="circuit-view">\n{caption}\n<p class="caption legend">{_legend(graph, bool(pathways))}</p>\n'
        f'{controls}\n<div class="scroll">{_svg(graph, view)}</div>\n<p class="caption">{esc(how)}</p>\n</div>\n'
        f"<h3>Strongest kept edges</h3>\n{table}"
    )


def _sign_meaning(graph: Graph) -> tuple[str, str]:
    """What a positive and a negative score mean for the metric under the graph's patching direction."""
    metric = graph.metric
    direction = graph.meta.get("direction")
    if direction == "noise":
        return (
            f"corrupting the edge raises {metric} (it works against the behaviour)",
            f"corrupting the edge lowers {metric} (it carries the behaviour)",
        )
    if direction == "denoise":
        return (
            f"restoring the edge's clean value raises {metric} (it carries the behaviour)",
            f"restoring the edge's clean value lowers {metric} (it works against the behaviour)",
        )
    return f"the edge raises {metric}", f"the edge lowers {metric}"


def _exactness(graph: Graph) -> str:
    """Whether the graph's scores are exact edge effects or estimates, for tooltips and the legend."""
    if graph.method.startswith(EXACT_SCORES):
        return "exact effect: the edge alone patched in the full model"
    return f"{graph.method} estimate; exact effect not measured"


def _direction(graph: Graph) -> str:
    """The patching direction in words."""
    direction = graph.meta.get("direction")
    if direction == "noise":
        return "direction noise: clean run, one edge at a time given its corrupted-run value"
    if direction == "denoise":
        return "direction denoise: corrupted run, one edge at a time given its clean-run value"
    return "patching direction not recorded"


def _legend(graph: Graph, has_pathways: bool) -> str:
    """The legend: what each edge colour means for the metric, then widths, line styles, nodes and halos."""
    positive, negative = _sign_meaning(graph)
    swatch = '<span class="swatch" style="background:{}"></span>'
    parts = [
        f"{swatch.format(NEGATIVE)}score &lt; 0: {esc(negative)}",
        f"{swatch.format(POSITIVE)}score &gt; 0: {esc(positive)}",
    ]
    if has_pathways:
        parts.append(f"{swatch.format(PATHWAY)}the top {HIGHLIGHTED_PATHWAYS} pathways (see Pathways)")
    notes = (
        f"Scores: {_exactness(graph)} ({_direction(graph)}). Edge width ∝ |score|; into a head: query solid, key "
        "dashed, value dotted. Node radius ∝ importance, the summed |score| of its circuit edges; fill: sign of its "
        "outgoing sum. Right: every head and MLP sized the same way. Hover for names and scores."
    )
    return " · ".join(parts) + "<br>" + esc(notes)


# ---- SVG ------------------------------------------------------------------------------------------------


def _y(row: float) -> float:
    return _TOP + (row + 1.0) * _ROW


def radius(importance: float, largest: float, most: float = _R_MAX) -> float:
    """A node's radius, growing linearly with importance from `_R_MIN` (none) to `most` (the largest): linear
    rather than area-true, so that the few components that matter stand out from the many that matter little."""
    if largest <= 0:
        return _R_MIN
    return _R_MIN + (most - _R_MIN) * max(importance, 0.0) / largest


def _svg(graph: Graph, view: CircuitView) -> str:
    """One SVG: column and layer labels, the edge view (halos, edges, nodes) and the node view to its right."""
    components = [n for n in view.nodes.values() if n.name not in ("input", "logits")]
    largest = max((n.importance for n in components), default=0.0)
    shown_edges, shown_nodes = view.shown(view.default_edges)
    shown_ranks = {e.rank for e in shown_edges}
    radii = {n.name: radius(n.importance, largest) for n in components}
    named = {n.name for n in sorted(components, key=lambda n: -n.importance)[:LABELLED_NODES] if n.importance > 0}
    strongest = max(abs(e.score) for e in view.edges) or 1.0
    grid_left = view.x(view.n_slots - 0.5) + _GAP
    width = grid_left + (view.n_heads + 2) * _CELL + 24
    height = _y(view.n_layers) + 20
    exactness = _exactness(graph)
    halos, lines = [], []
    for edge in reversed(view.edges):  # weakest first, so the strongest are drawn on top
        hidden = "" if edge.rank in shown_ranks else ' display="none"'
        port = edge.receiver.rsplit(".", 1)[-1]
        stroke_width = 0.7 + 3.3 * abs(edge.score) / strongest
        dash = f' stroke-dasharray="{_DASH[port]}"' if _DASH.get(port) else ""
        path_attr = f' data-path="{" ".join(str(p) for p in edge.pathways)}"' if edge.pathways else ""
        tip = f"{edge.sender} → {edge.receiver}: score {signed(edge.score)} ({exactness}); "
        tip += f"rank {edge.rank} of {view.kept} kept edges"
        if edge.pathways:
            tip += "; on pathway " + ", ".join(f"#{p}" for p in edge.pathways)
        colour = POSITIVE if edge.score >= 0 else NEGATIVE
        for target in edge.targets:
            d = _curve(view, edge.sender, target, port, radii)
            if d is None:
                continue
            common = f'data-rank="{edge.rank}" data-from="{esc(edge.sender)}" data-to="{esc(target)}"{path_attr}'
            if edge.pathways:
                halos.append(
                    f'<path class="halo" {common}{hidden} d="{d}" fill="none" stroke="{PATHWAY}" '
                    f'stroke-width="{stroke_width + 4:.2f}" stroke-opacity="0.35" stroke-linecap="round"/>'
                )
            lines.append(
                f'<path class="edge" {common}{hidden} d="{d}" fill="none" stroke="{colour}" '
                f'stroke-width="{stroke_width:.2f}" stroke-opacity="0.8"{dash}><title>{esc(tip)}</title></path>'
            )
    nodes = [
        _node(view, node, radii.get(node.name, 0.0), node.name in shown_nodes, node.name in named)
        for node in view.nodes.values()
    ]
    cells = [_cell(node, largest, grid_left) for node in components]
    parts = [_labels(view, grid_left), *halos, *lines, *nodes, *cells]
    return (
        f'<svg class="circuit" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="circuit graph" '
        f'data-shown-edges="{len(shown_ranks)}" data-shown-nodes="{len(shown_nodes)}">\n'
        + "\n".join(parts)
        + "\n</svg>"
    )


def _labels(view: CircuitView, grid_left: float) -> str:
    """Panel titles, column headers (H0.., MLP) over both panels and layer labels on the left."""
    header_y = _TOP - 24
    texts = [
        f'<text class="panel" x="{_LEFT}" y="12">edges</text>',
        f'<text class="panel" x="{grid_left}" y="12">nodes</text>',
    ]
    columns = [f"H{h}" for h in range(view.n_heads)] + (["MLP"] if view.n_slots > view.n_heads else [])
    for slot, label in enumerate(columns):
        texts.append(f'<text class="head" x="{view.x(slot):.1f}" y="{header_y}" text-anchor="middle">{label}</text>')
    for col, label in enumerate([*(str(h) for h in range(view.n_heads)), "MLP"]):
        x, anchor = grid_left + (col + 0.5) * _CELL, "middle"
        if label == "MLP":  # wider than a cell: starts at the cell's left edge
            x, anchor = x - 5, "start"
        texts.append(f'<text class="head" x="{x:.1f}" y="{header_y}" text-anchor="{anchor}">{label}</text>')
    for layer in range(view.n_layers):
        texts.append(f'<text class="head" x="4" y="{_y(layer) + 4:.1f}">L{layer}</text>')
    return "\n".join(texts)


def _curve(view: CircuitView, sender: str, target: str, port: str, radii: Mapping[str, float]) -> str | None:
    """The edge's path: from the bottom of the sender to the top of the target (a head's q/k/v at its left,
    middle, right), as a vertical S-curve."""
    source, sink = view.nodes.get(sender), view.nodes.get(target)
    if source is None or sink is None:
        return None
    x1, y1 = view.x(source.slot), _y(source.row) + (8.0 if sender == "input" else radii.get(sender, _R_MIN))
    r2 = radii.get(target, 8.0)
    x2, y2 = view.x(sink.slot) + _PORT.get(port, 0.0) * r2, _y(sink.row) - (8.0 if target == "logits" else r2)
    bend = max(0.6 * _ROW, 0.4 * abs(y2 - y1))
    return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}"


def _node(view: CircuitView, node: ViewNode, r: float, shown: bool, named: bool) -> str:
    """A node of the edge view: input / logits as labelled pills, components as circles sized by importance,
    ringed in gold on a highlighted pathway, the most important labelled with their names."""
    x, y = view.x(node.slot), _y(node.row)
    if node.name in ("input", "logits"):
        tip = f"{node.name}: summed |score| of its circuit edges {node.importance:.4g} ({node.kept_edges} edges)"
        return (
            f'<g class="node" data-node="{esc(node.name)}" data-always=""><title>{esc(tip)}</title>'
            f'<rect class="io" x="{x - 26:.1f}" y="{y - 8:.1f}" width="52" height="16" rx="8" fill="#ffffff" '
            f'stroke="#333333"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{esc(node.name)}</text></g>'
        )
    hidden = "" if shown else ' display="none"'
    tip = (
        f"{node.name}: importance {node.importance:.4g} (summed |score| of its {node.kept_edges} circuit edges); "
        f"outgoing sum {signed(node.net)}"
    )
    on_path = node.name in view.pathway_nodes
    stroke, stroke_width = (PATHWAY, 2.4) if on_path else ("#444444", 1.0)
    fill = "#eeeeee" if node.importance <= 0 else _TINT[POSITIVE if node.net >= 0 else NEGATIVE]
    label = f'<text class="name" x="{x + r + 2:.1f}" y="{y - r + 2:.1f}">{esc(node.name)}</text>' if named else ""
    return (
        f'<g class="node" data-node="{esc(node.name)}" data-importance="{node.importance:.6g}"{hidden}>'
        f"<title>{esc(tip)}</title>"
        f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{r:.2f}" ry="{r:.2f}" fill="{fill}" '
        f'stroke="{stroke}" stroke-width="{stroke_width}"/>{label}</g>'
    )


def _cell(node: ViewNode, largest: float, grid_left: float) -> str:
    """A dot of the node view: every head and MLP on the (layer × head) grid, radius by importance, coloured
    by the sign of its outgoing sum (grey: not in the circuit)."""
    parsed = parse_node(node.name)
    if parsed is None or parsed.layer is None:
        return ""
    x, y = grid_left + (node.slot + 0.5) * _CELL, _y(parsed.layer)
    r = radius(node.importance, largest, _DOT_MAX) if node.importance > 0 else 1.2
    colour = "#bbbbbb" if node.importance <= 0 else (POSITIVE if node.net >= 0 else NEGATIVE)
    tip = f"{node.name}: importance {node.importance:.4g} ({node.kept_edges} circuit edges); "
    tip += f"outgoing sum {signed(node.net)}"
    return (
        f'<g class="cell" data-node="{esc(node.name)}"><title>{esc(tip)}</title>'
        f'<ellipse cx="{x:.1f}" cy="{y:.1f}" rx="{r:.2f}" ry="{r:.2f}" fill="{colour}" fill-opacity="0.85"/></g>'
    )
