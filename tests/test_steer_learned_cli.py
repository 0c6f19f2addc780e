"""`pathlens steer --method controller|eigenshift` on a tiny llama with a word-level tokenizer: the command runs
the learned study, writes steer.json, the trained object, generations.json and steer.html, and rejects bad options
with a usage error (exit code 2) that names the option.

Reference: the files are read back (the controller and the record) and checked against what the command was asked
for (the scales swept, the method, the concept); the saved controller loads and is bit-identical to itself
re-saved; the model given to the command is bit-identical afterwards.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from pathlens.cli import app
from pathlens.model import Model
from pathlens.steering.data import contrast
from pathlens.steering.learned.controller import WeightedSteering
from pathlens.steering.learned.eigenshift import EigenShift, components
from tests.helpers import assert_untouched, llama_like, snapshot
from tests.test_linear_act import tiny_with_words, word_tokenizer

FAST = ["--prompts", "2", "--max-new-tokens", "2"]


def _invoke(args: list[str], model: Model, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(importlib.import_module("pathlens.cli.steer"), "load_model", lambda name: model)
    result = CliRunner().invoke(app, ["steer", *args])
    return result.exit_code, _flat(result.output)


def _flat(output: str) -> str:
    """The output with rich's error box and line wrapping undone, so a message can be matched whole."""
    return " ".join(output.replace("│", " ").split())


def four_layer_llama() -> Model:
    """The controller reads the last 4 layers (its default), so its study needs a model with at least 4."""
    torch.manual_seed(0)
    hf = llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM, num_hidden_layers=4)()
    model = Model(hf, name="tiny-llama-4")
    model.tokenizer = word_tokenizer()
    return model


def _record(out: Path) -> dict:
    return json.loads((out / "steer.json").read_text(encoding="utf-8"))


def test_steer_controller_writes_the_record_the_controller_and_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = four_layer_llama()
    before = snapshot(model)
    code, output = _invoke(
        ["--method", "controller", *FAST, "--scales", "0.05", "--out", str(tmp_path)], model, monkeypatch
    )
    assert code == 0, output
    record = _record(tmp_path)
    assert (record["method"], record["concept"], record["model"]) == ("controller", "sentiment", model.name)
    assert [row["scale"] for row in record["rows"]] == [0.0, 0.05]
    assert record["rows"][0]["kl"] == 0.0 and record["rows"][1]["kl"] >= 0.0
    assert len(record["losses"]) == 10  # one per training epoch (train_controller's default)
    generations = json.loads((tmp_path / "generations.json").read_text(encoding="utf-8"))
    assert sorted({g["scale"] for g in generations}) == [0.0, 0.05] and len(generations) == 4
    page = (tmp_path / "steer.html").read_text(encoding="utf-8")
    assert "controller" in page and "<script>alert" not in page
    loaded = WeightedSteering.load(tmp_path / "controller")
    assert loaded.sites == [f"L{i}.resid_post" for i in range(model.n_layers)] and loaded.gate == "sigmoid"
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "controller.safetensors").read_bytes()
    assert_untouched(model, before)


def test_steer_eigenshift_writes_the_record_and_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_with_words()
    before = snapshot(model)
    code, output = _invoke(
        ["--method", "eigenshift", *FAST, "--scales", "0.5,0", "--out", str(tmp_path)], model, monkeypatch
    )
    assert code == 0, output
    record = _record(tmp_path)
    assert (record["method"], record["site"], record["score"], record["k"]) == ("eigenshift", "unembedding", "auroc", 8)
    assert [row["scale"] for row in record["rows"]] == [1.0, 0.5, 0.0]  # β = 1 is the unsteered row
    assert record["rows"][0]["ppl_increase"] == 0.0 and record["rows"][0]["kl"] == 0.0
    assert record["rows"][2]["kl"] > record["rows"][1]["kl"] > 0.0  # shrinking further moves the output further
    assert len(record["components"]) == 8 and len(set(record["components"])) == 8
    data = contrast("sentiment")  # the record's components are the 8 best by AUROC, negative side vs positive
    assert record["components"] == components(model, data.negative, data.positive, "auroc").ranked()[:8].tolist()
    assert (tmp_path / "generations.json").is_file() and "eigenshift" in (tmp_path / "steer.html").read_text()
    saved = EigenShift.load(tmp_path / "eigenshift")  # the strongest β swept, with the record's components
    assert saved.beta == 0.0 and record["saved_beta"] == 0.0
    assert sorted(saved.components) == sorted(record["components"])
    assert record["files"]["eigenshift"] == str(tmp_path / "eigenshift.safetensors")
    assert "eigenshift.safetensors" in output
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--method", "eigenshfit"], "unknown method 'eigenshfit'"),
        (["--method", "controller", "--concept", "nope"], "unknown concept set 'nope'"),
        (["--method", "eigenshift", "--scales", "0.5,x"], "is not a comma list of numbers"),
        (["--method", "controller", "--prompts", "0"], "'--prompts'"),
    ],
)
def test_a_bad_option_is_a_usage_error(
    args: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(name: str) -> Model:
        raise AssertionError("a usage error must be raised before the model is loaded")

    monkeypatch.setattr(importlib.import_module("pathlens.cli.steer"), "load_model", no_model)
    result = CliRunner().invoke(app, ["steer", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert named in _flat(result.output)
    assert not (tmp_path / "out" / "steer.json").exists()


def test_a_bad_beta_is_a_usage_error_naming_the_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """β must be finite: the study raises PathlensError, which the command turns into a usage error."""
    model = tiny_with_words()
    before = snapshot(model)
    code, output = _invoke(
        ["--method", "eigenshift", *FAST, "--scales", "nan", "--out", str(tmp_path)], model, monkeypatch
    )
    assert code == 2 and "beta must be a finite number" in output and "'--layer' or '--scales'" in output
    assert_untouched(model, before)
