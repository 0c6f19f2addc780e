"""The HTML report: escaped text, well-formed and self-contained, and (when a headless Chromium is installed)
loading in a browser without console errors."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import pathlens
from pathlens.circuits.discover import discover, pathways
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.graph import Graph
from pathlens.report import render_report, write_report
from pathlens.results import Scores
from tests.helpers import headless_chromium, load_in_chromium

PROMPT = '<script>alert(1)</script> When Mary & John went to the "store", John gave a drink to'
ESCAPED_PROMPT = html.escape(PROMPT, quote=True)
TOKENS = ["<script>alert(2)</script>", " Tom & Jerry", '"quoted"', "'single'", "\n", " ", " Mary", " to"]
VOID = {"meta", "link", "br", "hr", "img", "input", "area", "base", "col", "embed", "source", "track", "wbr"}
CONSOLE_LINE = re.compile(r":CONSOLE[(:]")


class _Checker(HTMLParser):
    """Records what a browser's parser would see: tag nesting errors, scripts, text, SVG classes, attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self.svg_classes: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "svg":
            self.svg_classes.append(dict(attrs).get("class") or "")
        if tag == "script":
            self.scripts.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "script":
            self.scripts[-1] += data
        else:
            self.text.append(data)


def _check(document: str) -> _Checker:
    checker = _Checker()
    checker.feed(document)
    checker.close()
    assert not checker.errors, checker.errors
    assert checker.stack == [], f"unclosed elements: {checker.stack}"
    return checker


@pytest.fixture(scope="module")
def study() -> dict[str, Any]:
    """Real results on the shipped induction model: a circuit with its curve and pathways, and head patching."""
    from pathlens.report.studies import task_for

    model = pathlens.load("induction-2l")
    task = task_for(model, "induction", 8, 0)
    circuit = discover(model, task, method="eap")
    return {
        "circuit": circuit,
        "pathways": pathways(EdgePatcher(model, task), circuit, k=5),
        "heads": pathlens.patch(model, task, sites="heads", progress=False, direction="denoise"),
    }


def _positions() -> Scores:
    values = torch.linspace(-1.0, 1.0, 2 * len(TOKENS)).reshape(2, len(TOKENS))
    values[1, 2] = float("nan")
    coords = {"layer": [0, 1], "pos": list(range(len(TOKENS)))}
    return Scores(values, ("layer", "pos"), coords, "logit_diff", "atp", pos_labels=TOKENS)


@pytest.fixture(scope="module")
def report(study: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    circuit = study["circuit"]
    summary = {k: v for k, v in circuit.meta.items() if k != "curve"} | {"<b>key</b>": "a & b"}
    return write_report(
        tmp_path_factory.mktemp("report") / "sub" / "report.html",
        "Induction <circuit> & 'friends'",
        circuit=circuit,
        heatmaps=[("heads <h>", study["heads"]), ("positions", _positions())],
        curve=circuit.meta["curve"],
        pathways=study["pathways"],
        prompts=[PROMPT, "plain"],
        summary=summary,
    )


def test_report_escapes_every_text_and_is_well_formed(report: Path, study: dict[str, Any]) -> None:
    document = report.read_text(encoding="utf-8")
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # the temporary file was renamed
    assert ESCAPED_PROMPT in document
    assert "<script>alert" not in document.lower()
    for escaped in ("&lt;script&gt;alert(2)&lt;/script&gt;", "Tom &amp; Jerry", "&quot;quoted&quot;", "&#x27;single"):
        assert escaped in document
    assert "<title>Induction &lt;circuit&gt; &amp; &#x27;friends&#x27;</title>" in document
    assert "&lt;b&gt;key&lt;/b&gt;" in document and "heads &lt;h&gt;" in document

    parsed = _check(document)
    assert len(parsed.scripts) == 1 and "alert" not in parsed.scripts[0]  # only the report's own script
    assert PROMPT in parsed.text  # the prompt is text, exactly as given
    assert sorted(parsed.svg_classes) == ["circuit", "curve", "heatmap", "heatmap"]
    # Self-contained: nothing is loaded from anywhere, and the policy says so.
    assert not [a for a in parsed.attrs if a[1] == "src"]
    assert all(v.startswith("#") for tag, k, v in parsed.attrs if k == "href")
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", document)
    policy = [v for tag, k, v in parsed.attrs if tag == "meta" and k == "content" and "default-src" in v]
    assert policy and policy[0].startswith("default-src 'none'")

    circuit: Graph = study["circuit"]
    assert document.count('class="edge"') == circuit.n_edges  # one query head per key-value input here
    assert document.count("<circle ") == len(circuit.meta["curve"]["sizes"])
    assert 'xml:space="preserve">\\n</text>' in document  # a newline token is labelled \n
    cells = study["heads"].values.numel() + _positions().values.numel()
    assert len(re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="[\d.]+" fill="#', document)) == cells
    for row in study["pathways"]:
        assert " → ".join(row["nodes"]) in document


def test_graph_layout_with_mlps_grouped_keys_and_sections_left_out() -> None:
    """A key-value group's edge reaches every head of the group; MLPs are drawn; unkept edges are not."""
    senders = ["input", "L0.H0", "L0.H1", "L0.mlp"]
    receivers = ["L0.mlp", "L1.G0.k", "L1.H1.q", "L1.mlp", "logits"]
    scores = torch.full((4, 5), float("nan"))
    scores[0] = torch.tensor([0.5, -2.0, 1.0, 0.1, 0.2])
    scores[1:3, 0] = torch.tensor([0.3, -0.4])
    scores[1:, 1:] = 0.05
    graph = Graph(senders, receivers, scores, "logit_diff", "eap", meta={"heads_per_group": 2}).prune(top_k=3)
    document = render_report("mlp <model>", circuit=graph, curve={}, prompts=[])
    _check(document)
    assert document.count('class="edge"') == 4  # input→L1.G0.k fans out to L1.H0 and L1.H1
    assert 'data-from="input" data-to="L1.H0"' in document and 'data-from="input" data-to="L0.mlp"' in document
    assert ">MLP</text>" in document and 'stroke-dasharray="6 3"' in document
    assert 'class="curve"' not in document and 'class="heatmap"' not in document and "Prompts" not in document

    bare = render_report("nothing")
    assert not _check(bare).svg_classes and "<section" not in bare


def test_report_refuses_what_it_cannot_draw() -> None:
    cube = Scores(
        torch.zeros(2, 2, 2), ("layer", "head", "pos"), {d: [0, 1] for d in ("layer", "head", "pos")}, "m", "x"
    )
    with pytest.raises(pathlens.PathlensError, match="1 or 2 non-empty dims"):
        render_report("t", heatmaps=[("cube", cube)])
    with pytest.raises(pathlens.PathlensError, match="sizes"):
        render_report("t", curve={"sizes": [1, 2], "faithfulness": [0.5]})


def test_report_loads_in_headless_chromium_without_console_errors(report: Path, tmp_path: Path) -> None:
    browser, why = headless_chromium()
    if browser is None:
        pytest.skip(why)
    # The detector works: a page that logs an error and throws shows both on stderr.
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><p>x</p><script>console.error("control-error"); missing();</script>')
    logged = [
        line
        for line in load_in_chromium(browser, control, tmp_path / "profile").stderr.splitlines()
        if "CONSOLE" in line
    ]
    assert any("control-error" in line for line in logged) and any("missing" in line for line in logged), logged

    result = load_in_chromium(browser, report, tmp_path / "profile")
    console = [line for line in result.stderr.splitlines() if CONSOLE_LINE.search(line)]
    assert not console, console  # no error, no CSP violation, no failed load, no log at all
    assert html.escape(PROMPT, quote=False) in result.stdout  # a DOM serializer leaves quotes in text as they are
    assert "<script>alert" not in result.stdout and result.stdout.count("<script>") == 1
    assert result.stdout.count('class="edge"') > 0 and "</svg>" in result.stdout
