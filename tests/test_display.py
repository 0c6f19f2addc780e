"""Notebook and terminal display of results: `Scores`, `Graph` and `Curve` show their dims, top entries and
provenance in `repr`, and render as self-contained HTML (no scripts, no CDN) with every label escaped."""

from __future__ import annotations

import torch

from pathlens.circuits.faithfulness import Curve
from pathlens.graph import Graph
from pathlens.results import Scores
from tests.helpers import make_scores

SCRIPT = "<script>alert(1)</script>"


def _no_markup_from_labels(page: str) -> None:
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_scores_repr_shows_dims_provenance_and_top_cells() -> None:
    scores = make_scores(torch.arange(12.0).reshape(3, 4), meta={"model": "gpt2", "task": "ioi", "n_prompts": 8})
    text = repr(scores)
    assert "layer=3 x head=4" in text and "patch:denoise" in text and "logit_diff" in text
    assert "model=gpt2, task=ioi, n_prompts=8" in text
    assert "layer=2 head=3: +11" in text and "layer=2 head=2: +10" in text


def test_scores_html_has_a_grid_the_top_cells_and_escaped_labels() -> None:
    scores = make_scores(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), ("layer", "pos"), pos_labels=[SCRIPT, " Mary"])
    scores.meta["task"] = SCRIPT
    page = scores._repr_html_()
    _no_markup_from_labels(page)
    assert "layer=2 × pos=2" in page and "patch:denoise" in page
    table = page[page.index("<th") :]
    assert table.index(">3.0<") < table.index(">-2.0<") < table.index(">1.0<")  # top cells by |value|
    assert "background:rgb(255,0,0)" in page  # the largest cell in full red
    sites = Scores(torch.tensor([1.0, 2.0]), ("site",), {"site": [SCRIPT, "blocks.0"]}, "logit_diff", "atp")
    _no_markup_from_labels(sites._repr_html_())
    assert SCRIPT in repr(sites)  # the terminal shows text as it is


def _graph(names: list[str]) -> Graph:
    scores = torch.tensor([[0.5, -2.0], [float("nan"), 1.0]])
    meta = {"model": "tiny", "task": "ioi", "faithfulness": 0.91}
    return Graph(names, ["L1.H0.q", "logits"], scores, "logit_diff", "eap:noise", meta)


def test_graph_repr_shows_sizes_provenance_and_top_edges() -> None:
    graph = _graph(["input", "L0.H0"])
    text = repr(graph)
    assert "2 senders x 2 receivers, 3 edges (not pruned)" in text and "'eap:noise'" in text
    assert "model=tiny, task=ioi, faithfulness=0.91" in text
    lines = text.splitlines()
    assert lines[3].strip() == "input -> logits: -2" and lines[4].strip() == "L0.H0 -> logits: +1"
    circuit = graph.prune(top_k=1)
    assert "3 edges (1 in the circuit)" in repr(circuit) and "top 5 circuit edges" in repr(circuit)
    assert "L0.H0 -> logits" not in repr(circuit)


def test_graph_html_escapes_names_and_draws_the_discovery_curve() -> None:
    graph = _graph(["input", SCRIPT])
    graph.meta["curve"] = {"sizes": [1, 2, 3], "faithfulness": [0.2, 0.7, 1.0], "edges_total": 3}
    page = graph._repr_html_()
    _no_markup_from_labels(page)
    assert "<svg" in page and "<polyline" in page and "faithfulness" in page
    assert "background:rgb(0,0,255)" in page  # the strongest edge is negative: full blue


def test_curve_repr_and_html_report_cpr_and_cmd() -> None:
    curve = Curve([1, 2, 5, 10], [0.0, 0.5, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0], 2.0, 0.5, 10, meta={"ranked_by": SCRIPT})
    text = repr(curve)
    assert "4 circuit sizes of 10 edges" in text and "CPR=0.75" in text and "CMD=0.15" in text
    assert "5 edges  F=+1.0000" in text
    page = curve._repr_html_()
    _no_markup_from_labels(page)
    assert "CPR" in page and "0.75" in page and "<svg" in page
