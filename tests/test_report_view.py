"""The readable circuit view (node sizes and edge colours follow the scores; the default view stays small; the
edge-count control works in a browser) and `pathlens report DIR`'s index page."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pathlens.cli import app
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.report import render_report, write_report
from pathlens.report.circuit_view import NEGATIVE, NODE_BUDGET, POSITIVE, circuit_view
from pathlens.report.index import render_index, write_index
from tests.helpers import headless_chromium, load_in_chromium, make_scores

PROMPT = "<script>alert(1)</script> When Mary and John went to the store, John gave a drink to"
CONSOLE_LINE = re.compile(r":CONSOLE[(:]")


class _Svg(HTMLParser):
    """The circuit SVG's nodes (name → radius, visible) and edges (rank, from, to, colour, visible)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.nodes: dict[str, tuple[float, bool]] = {}
        self.edges: list[dict[str, str]] = []
        self.svg: dict[str, str] = {}
        self._node: tuple[str, bool] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg" and a.get("class") == "circuit":
            self.svg = a
        elif tag == "g" and a.get("class") == "node":
            self._node = (a["data-node"], a.get("display") != "none")
        elif tag == "g":
            self._node = None
        elif tag == "ellipse" and self._node is not None:
            self.nodes[self._node[0]] = (float(a["rx"]), self._node[1])
        elif tag == "path" and a.get("class") == "edge":
            self.edges.append(a | {"visible": str(a.get("display") != "none")})

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


def _parse(document: str) -> _Svg:
    parser = _Svg()
    parser.feed(document)
    return parser


def _small_graph() -> Graph:
    """Two layers of two heads: L0.H0 has the largest |score| sum, L0.H1 the smallest; signs are mixed."""
    senders = ["input", "L0.H0", "L0.H1", "L1.H0", "L1.H1"]
    receivers = ["L0.H0.q", "L0.H1.q", "L1.H0.q", "L1.H1.v", "logits"]
    scores = torch.full((5, 5), float("nan"))
    scores[0, :2] = torch.tensor([0.9, 0.1])
    scores[1, 2:] = torch.tensor([-2.0, 1.5, 0.8])
    scores[2, 2:] = torch.tensor([0.05, -0.02, 0.01])
    scores[3, 4], scores[4, 4] = 1.2, -0.7
    return Graph(senders, receivers, scores, "logit_diff", "patching", meta={"direction": "noise"})


def _synthetic_big(seed: int = 0) -> Graph:
    """A SmolLM2-shaped random graph (30 layers, 9 heads in 3 key-value groups, MLPs) pruned to 1351 edges, one
    of them the weak L0.mlp → L23.G1.k."""
    generator = torch.Generator().manual_seed(seed)
    layers, heads, groups = 30, 9, 3
    senders = ["input"] + [
        f"L{layer}.{c}" for layer in range(layers) for c in [*(f"H{h}" for h in range(heads)), "mlp"]
    ]
    receivers = [
        f"L{layer}.{c}"
        for layer in range(layers)
        for c in [*(f"H{h}.q" for h in range(heads)), *(f"G{g}.{x}" for x in "kv" for g in range(groups)), "mlp"]
    ] + ["logits"]

    def layer(name: str) -> float:
        return -1 if name == "input" else 1e9 if name == "logits" else int(name[1:].split(".")[0])

    scores = torch.full((len(senders), len(receivers)), float("nan"))
    for i, s in enumerate(senders):
        for j, r in enumerate(receivers):
            if layer(s) < layer(r) or (layer(s) == layer(r) and s.endswith(".mlp") is False and r.endswith(".mlp")):
                scores[i, j] = float(torch.randn((), generator=generator).item() ** 3)
    graph = Graph(
        senders, receivers, scores, "logit_diff", "eap-ig:noise", meta={"direction": "noise", "heads_per_group": 3}
    )
    pruned = graph.prune(top_k=1350)
    assert pruned.kept is not None
    weak = (senders.index("L0.mlp"), receivers.index("L23.G1.k"))  # a weak edge, kept: a pathway's hop
    pruned.scores[weak], pruned.kept[weak] = 1e-4, True
    return pruned


def test_node_sizes_and_edge_colours_follow_the_scores() -> None:
    graph = _small_graph()
    svg = _parse(render_report("small", circuit=graph))
    sums: dict[str, float] = {}
    for row in graph.to_frame().itertuples():
        for name in (row.sender, *graph.receiver_nodes(row.receiver)):
            sums[name] = sums.get(name, 0.0) + abs(row.score)
    heads = sorted((n for n in svg.nodes if n.startswith("L")), key=lambda n: sums[n])
    assert heads == ["L0.H1", "L1.H1", "L1.H0", "L0.H0"]  # the sums differ
    radii = [svg.nodes[n][0] for n in heads]
    assert radii == sorted(radii) and len(set(radii)) == len(radii), dict(zip(heads, radii, strict=True))
    by_pair = {(e["data-from"], e["data-to"]): e["stroke"] for e in svg.edges}
    for row in graph.to_frame().itertuples():
        target = graph.receiver_nodes(row.receiver)[0]
        assert by_pair[(row.sender, target)] == (POSITIVE if row.score > 0 else NEGATIVE), row
    assert {e["stroke"] for e in svg.edges} == {POSITIVE, NEGATIVE}
    document = render_report("small", circuit=graph)
    assert "corrupting the edge lowers logit_diff" in document  # the legend says what a sign means (noise)
    assert "exact effect" in document  # method "patching": the scores are exact effects


def test_default_view_is_small_and_the_full_circuit_is_in_the_page_up_to_the_slider() -> None:
    graph = _synthetic_big()
    paths = [{"rank": 1, "nodes": ["L0.mlp", "L23.G1.k", "L23.H3"], "score": 1.0}]
    view = circuit_view(graph, paths)
    limit = view.default_edges
    _, nodes = view.shown(limit)
    assert 0 < limit and len(nodes) <= NODE_BUDGET
    assert len(view.shown(limit + 1)[1]) > NODE_BUDGET  # the largest count within the budget
    assert {"L0.mlp", "L23.H3"} <= nodes  # the highlighted pathway is always in the view
    svg = _parse(render_report("big", circuit=graph, pathways=paths))
    visible_nodes = [n for n, (_, shown) in svg.nodes.items() if shown] + ["input", "logits"]
    assert len(visible_nodes) == len(nodes) == int(svg.svg["data-shown-nodes"])
    ranks = {int(e["data-rank"]) for e in svg.edges}
    assert ranks == {*range(1, 301), 1351}  # the slider's range and the pathway's weak edge; the rest is in the files
    assert 'max="300"' in render_report("big", circuit=graph)


def _visible(dom: str) -> tuple[int, int, int]:
    """(visible edge paths, visible nodes, the svg's shown-edge count) in a dumped DOM."""
    svg = _parse(dom)
    edges = sum(e["visible"] == "True" for e in svg.edges)
    nodes = sum(shown for _, shown in svg.nodes.values()) + 2  # input and logits are always shown
    return edges, nodes, int(svg.svg["data-shown-edges"])


def test_circuit_view_in_headless_chromium(tmp_path: Path) -> None:
    browser, why = headless_chromium()
    if browser is None:
        pytest.skip(why)
    page = write_report(tmp_path / "report.html", "big <view>", circuit=_synthetic_big(), prompts=[PROMPT])
    default = load_in_chromium(browser, page, tmp_path / "profile")
    assert not [line for line in default.stderr.splitlines() if CONSOLE_LINE.search(line)]
    edges, nodes, counted = _visible(default.stdout)
    assert nodes <= 60 and 0 < edges
    assert html.escape(PROMPT, quote=False) in default.stdout and "<script>alert" not in default.stdout
    few = _visible(load_in_chromium(browser, page.as_uri() + "?edges=3", tmp_path / "profile").stdout)
    many = _visible(load_in_chromium(browser, page.as_uri() + "?edges=all", tmp_path / "profile").stdout)
    assert few[2] == 3 and many[2] == 300 and counted not in (3, 300)  # the script read the control's value
    assert few[0] < edges < many[0] and few[1] < nodes < many[1]


def _results(root: Path) -> None:
    """A study folder: a sweep pair and its PNG, a circuit pair with its record and report, a broken pair."""
    sweep = make_scores([[0.0, 2.0], [-3.0, 1.0]], metric="<b>logit</b>", meta={"model": "m<1>", "base_metric": 1.0})
    sweep.save(root / "patch" / "heads_all")
    (root / "patch" / "heads_all.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    circuit = _small_graph().prune(top_k=3)
    circuit.meta.update(model="tiny", task="ioi", faithfulness=0.91)
    circuit.save(root / "circuit" / "circuit")
    record = {"model": "tiny", "task": "ioi", "method": "eap", "faithfulness": 0.91, "n_edges": 3, "edges_total": 9}
    (root / "circuit" / "summary.json").write_text(json.dumps(record))
    write_report(root / "circuit" / "report.html", "tiny · <ioi>", circuit=circuit)
    (root / "bad.json").write_text(json.dumps({"format": "pathlens.Graph"}))
    (root / "bad.safetensors").write_bytes(b"")


def test_index_links_every_result_with_its_summary(tmp_path: Path) -> None:
    _results(tmp_path)
    page = write_index(tmp_path)
    document = page.read_text(encoding="utf-8")
    assert page == tmp_path / "index.html"
    for href in (
        "patch/heads_all.safetensors",
        "patch/heads_all.png",
        "circuit/circuit.safetensors",
        "circuit/summary.json",
        "circuit/report.html",
        "bad.safetensors",
    ):
        assert f'href="{href}"' in document, href
    assert "strongest cell layer=1, head=0: effect (patched − base run) -4" in document  # -3 − base 1
    assert "metric &lt;b&gt;logit&lt;/b&gt;" in document and "model m&lt;1&gt;" in document
    assert "<b>" not in document and "3 of 9 edges" in document and "faithfulness 0.91" in document
    assert "tiny · &lt;ioi&gt;" in document  # the report's title, escaped again
    assert "unreadable" in document and "bad.json" in document
    assert render_index(tmp_path) == document  # the index page itself is not listed

    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0 and "index.html" in result.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "nowhere" in missing.output
    with pytest.raises(PathlensError, match="is a file, not a folder"):
        write_index(page)


def test_index_opens_in_headless_chromium_without_console_errors(tmp_path: Path) -> None:
    browser, why = headless_chromium()
    if browser is None:
        pytest.skip(why)
    _results(tmp_path)
    result = load_in_chromium(browser, write_index(tmp_path), tmp_path / "profile")
    assert not [line for line in result.stderr.splitlines() if CONSOLE_LINE.search(line)]
    assert "heads_all.safetensors" in result.stdout
