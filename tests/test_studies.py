"""The studies the command line runs, called as library functions: the files they write and what they return.
(The demo study runs end to end in test_cli.py, on the embedded SmolLM2.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pathlens
from pathlens.graph import Graph
from pathlens.report.studies import circuit_study, plottable, task_for, write_sweep
from pathlens.results import Scores
from tests.helpers import make_scores


def test_circuit_study_writes_its_files_and_returns_the_circuit_record(tmp_path: Path) -> None:
    """The circuit and the run's record are separate files: the circuit loads back as the Graph discovered (the
    record used to overwrite circuit.json, so no saved circuit loaded)."""
    model = pathlens.load("induction-2l")
    task = task_for(model, "induction", 8, 0)
    record = circuit_study(model, task, "induction", "eap-ig", tmp_path, top_paths=3)
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {
        "circuit.safetensors",
        "circuit.json",
        "summary.json",
        "edges.csv",
        "circuit.png",
        "curve.png",
        "pathways.csv",
        "report.html",
    }
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(record))
    circuit = Graph.load(tmp_path / "circuit")
    assert circuit.n_edges == record["n_edges"] and circuit.edges_total == record["edges_total"]
    assert 0 < record["n_edges"] < record["edges_total"] == 29
    assert record["fraction"] == record["n_edges"] / record["edges_total"]
    assert 1 <= len(record["paths"]) <= 3 and record["curve_area"] is not None


def test_write_sweep_saves_effects_relative_to_the_base_run(tmp_path: Path) -> None:
    scores = make_scores([[0.5, -3.0, 1.0], [2.0, -0.1, -2.5]], meta={"base_metric": 1.0})
    summary = write_sweep(scores, tmp_path, "sweep", "a sweep")
    assert {p.name for p in tmp_path.iterdir()} == {"sweep.safetensors", "sweep.json", "sweep.png", "sweep.csv"}
    assert torch.equal(Scores.load(tmp_path / "sweep").values, scores.values)
    assert summary.title == "a sweep" and summary.dims == ("layer", "head")
    assert summary.top["value"].tolist()[:2] == [-4.0, -3.5]
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 7


def test_plottable_labels_heads_and_keeps_two_dim_scores() -> None:
    scores = make_scores(torch.arange(12.0).reshape(2, 2, 3), dims=("layer", "head", "pos"))
    flat = plottable(scores)
    assert flat.dims == ("component", "pos") and flat.coords["component"] == ["L0.H0", "L0.H1", "L1.H0", "L1.H1"]
    assert torch.equal(flat.values, scores.values.reshape(4, 3))
    two = make_scores([[1.0, 2.0]])
    assert plottable(two) is two


def test_task_for_names_the_choices() -> None:
    model = pathlens.load("induction-2l")
    assert task_for(model, "induction", 4, 0).n == 4
    with pytest.raises(pathlens.PathlensError, match="unknown task 'magic'"):
        task_for(model, "magic", 4, 0)
    with pytest.raises(pathlens.PathlensError, match="only the token-level 'induction' task"):
        task_for(model, "ioi", 4, 0)
