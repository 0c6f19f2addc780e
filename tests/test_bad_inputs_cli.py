"""Bad inputs at the door: loading (names, paths, dtype/device), task generators without a tokenizer, the site
group short names, the embedded induction model's warnings, and the command line's errors (one line or a usage
error, never a traceback unless --debug). Each case checks the error type, that the message names the offending
input, and where a model is involved that it is left untouched. No test makes a network call (conftest.py sets
HF_HUB_OFFLINE, and the misspelt-name path must not even ask)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import pathlens
from pathlens import loading
from pathlens.cli import app
from pathlens.errors import PathlensError
from pathlens.patching import patch
from pathlens.tasks import factual, greater_than, induction, ioi, make_task
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model

runner = CliRunner()
PATHLENS = Path(sys.executable).parent / "pathlens"


# ---- loading: names and paths -----------------------------------------------------------------------


def no_hub(*args: object, **kwargs: object) -> bool:
    raise AssertionError("the hub was asked about a name that needs no network")


@pytest.mark.parametrize(("name", "suggestion"), [("smollm3", "smollm2"), ("gemma3", "gemma3-270m")])
def test_misspelt_embedded_name_suggests_the_closest_without_the_network(
    name: str, suggestion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 23-30 s of hub retries, then an error without a suggestion."""
    monkeypatch.setattr(loading, "hub_reachable", no_hub)
    start = time.perf_counter()
    with pytest.raises(PathlensError, match=f"unknown model '{name}': did you mean the embedded model '{suggestion}'"):
        pathlens.load(name)
    assert time.perf_counter() - start < 1.0


def test_unknown_hub_name_offline_fails_fast_and_says_why() -> None:
    start = time.perf_counter()
    with pytest.raises(PathlensError, match="cannot load 'someone/no-such-model'.*not reachable.*no cached copy"):
        pathlens.load("someone/no-such-model")
    assert time.perf_counter() - start < 2.0


def test_hub_name_offline_loads_its_cached_copy(tmp_path: Path) -> None:
    """Offline, a hub name with a copy in the cache loads from it (local files only, so no retries)."""
    snapshot_dir = tmp_path / "models--someone--tiny" / "snapshots" / "0123abcd"
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16))
    hf.save_pretrained(snapshot_dir)
    (tmp_path / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "models--someone--tiny" / "refs" / "main").write_text("0123abcd")
    start = time.perf_counter()
    model = pathlens.load("someone/tiny", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10.0 and model.arch.n_layers == 1 and model.name == "someone/tiny"


@pytest.mark.parametrize("name", ["./no/such/model", "~/no-such-model-folder", "/no/such/model"])
def test_missing_local_path_says_it_is_missing(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: taken as a hub name (network retries, then 'could not load ... with transformers')."""
    monkeypatch.setattr(loading, "hub_reachable", no_hub)
    with pytest.raises(PathlensError, match=re.escape(f"no such folder: '{name}'")):
        pathlens.load(name)


def test_missing_path_object_says_it_is_missing(tmp_path: Path) -> None:
    with pytest.raises(PathlensError, match="no such folder.*absent"):
        pathlens.load(tmp_path / "absent")


def test_folder_without_config_json_says_what_it_lacks(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PathlensError, match=re.escape(f"folder '{tmp_path}' has no config.json")):
        pathlens.load(str(tmp_path))


def test_a_file_instead_of_a_folder_is_named(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    with pytest.raises(PathlensError, match=re.escape(f"'{weights}' is a file; pass the model's folder")):
        pathlens.load(str(weights))


def test_a_model_folder_loads_given_as_str_or_path(tmp_path: Path) -> None:
    tiny = tiny_model("gpt2")
    hf = tiny.hf
    assert isinstance(hf, transformers.PreTrainedModel)
    hf.save_pretrained(tmp_path)
    for given in (str(tmp_path), tmp_path):
        loaded = pathlens.load(given)
        assert all(torch.equal(a, b) for a, b in zip(loaded.hf.parameters(), tiny.hf.parameters(), strict=True))


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_name_is_an_error(name: str) -> None:
    with pytest.raises(PathlensError, match="empty model name.*smollm2"):
        pathlens.load(name)


@pytest.mark.parametrize("name", [None, 3, ["induction-2l"]])
def test_a_name_that_is_not_a_string(name: object) -> None:
    with pytest.raises(PathlensError, match=re.escape(f"name_or_path={name!r}")):
        pathlens.load(name)  # type: ignore[arg-type]


def test_transformers_keywords_with_an_embedded_model_are_refused() -> None:
    """Before: silently ignored."""
    with pytest.raises(PathlensError, match=r"keyword arguments \['revision'\] apply to folders and hub names"):
        pathlens.load("induction-2l", revision="main")


# ---- loading: dtype and device ----------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_names_are_converted(given: str, expected: torch.dtype) -> None:
    model = pathlens.load("induction-2l", dtype=given, device="cpu")
    assert {p.dtype for p in model.hf.parameters()} == {expected}
    assert next(model.hf.parameters()).device == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float8", "int32", torch.int64, 32])
def test_bad_dtype_names_the_argument_and_the_choices(dtype: object) -> None:
    """Before: a string reached nn.Module.to and failed there ('to() received an invalid combination')."""
    with pytest.raises(PathlensError, match=r"dtype=.*(float32.*bfloat16|floating-point)"):
        pathlens.load("induction-2l", dtype=dtype)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["gpu", "cpu0", 1.5])
def test_bad_device_names_the_argument_and_the_choices(device: object) -> None:
    with pytest.raises(PathlensError, match=re.escape(f"device={device!r}") + ".*'cpu'"):
        pathlens.load("induction-2l", device=device)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_named_before_loading() -> None:
    with pytest.raises(PathlensError, match="device='cuda:0' is not available on this machine"):
        pathlens.load("induction-2l", device="cuda:0")


# ---- task generators given something that is not a tokenizer ----------------------------------------


@pytest.mark.parametrize("generator", [ioi, greater_than, factual])
@pytest.mark.parametrize("given", ["none", "model", "name"])
def test_task_generator_without_a_tokenizer(generator: object, given: str) -> None:
    """Before: TypeError "'NoneType' object is not callable" (or "'Model' object ...") from deep inside."""
    model = tiny_model("gpt2")
    before = snapshot(model)
    arg = {"none": None, "model": model, "name": "gpt2"}[given]
    expected = {"none": "None", "model": "a Model", "name": "a str"}[given]
    with pytest.raises(PathlensError, match=f"the tokenizer argument is {expected}, not a transformers tokenizer"):
        generator(arg)  # type: ignore[operator]
    assert_untouched(model, before)


def test_induction_with_a_model_for_a_tokenizer() -> None:
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(PathlensError, match="induction: the tokenizer argument is a Model.*model.tokenizer"):
        induction(model)  # type: ignore[arg-type]
    assert_untouched(model, before)


def test_make_task_without_a_tokenizer() -> None:
    with pytest.raises(PathlensError, match="mine: the tokenizer argument is None"):
        make_task("mine", None, ["a b"], ["a c"], [" b"], [" c"])  # type: ignore[arg-type]


# ---- site group short names -------------------------------------------------------------------------


@pytest.mark.parametrize(("short", "group"), [("resid", "resid_pre"), ("attn", "attn_out"), ("mlp", "mlp_out")])
def test_short_site_group_names_work_in_the_api(short: str, group: str) -> None:
    """Before: 'unknown site family' (only the CLI mapped the short names)."""
    model, task = tiny_model("gpt2"), padded_task()
    before = snapshot(model)
    by_short = patch(model, task, sites=short, progress=False)  # type: ignore[arg-type]
    by_name = patch(model, task, sites=group, progress=False)  # type: ignore[arg-type]
    assert by_short.dims == by_name.dims == ("layer",) and torch.equal(by_short.values, by_name.values)
    assert_untouched(model, before)


def test_unknown_site_group_lists_the_short_names_too() -> None:
    model, task = tiny_model("gpt2"), padded_task()
    before = snapshot(model)
    with pytest.raises(PathlensError, match="unknown site family 'resdi'.*resid_post, resid, mlp, attn"):
        patch(model, task, sites="resdi", progress=False)  # type: ignore[arg-type]
    assert_untouched(model, before)


# ---- the embedded induction model -------------------------------------------------------------------


def test_induction_model_runs_without_deprecation_warnings() -> None:
    """Before: transformers warned that create_causal_mask's `past_key_values` is deprecated (use `cache`)."""
    model = pathlens.load("induction-2l")
    task = induction(vocab_size=model.vocab_size, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        logits = model.run(task.clean_ids).logits
    assert logits.shape[:2] == task.clean_ids.shape


# ---- the command line -------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and output of `pathlens *args`; a usage error's box (typer wraps it at 80 columns) flattened to
    one line so its message can be matched."""
    result = runner.invoke(app, list(args), terminal_width=200)
    assert "Traceback" not in result.output and not isinstance(result.exception, PathlensError)
    if result.exit_code == 2:
        return 2, " ".join(result.output.replace("│", " ").split())
    return result.exit_code, result.output


def test_cli_unknown_model_is_a_usage_error_with_the_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_reachable", no_hub)
    code, output = invoke("patch", "--model", "smollm3")
    assert code == 2 and "'--model'" in output and "did you mean the embedded model 'smollm2'" in output


def test_cli_unknown_task_is_a_usage_error_before_the_model_loads() -> None:
    code, output = invoke("patch", "--model", "induction-2l", "--task", "magic")
    assert code == 2 and "'--task'" in output and "unknown task 'magic'" in output and "loaded" not in output


def test_cli_task_the_model_cannot_run_is_a_usage_error() -> None:
    code, output = invoke("circuit", "--model", "induction-2l", "--task", "ioi")
    assert code == 2 and "'--task'" in output and "only the token-level 'induction' task" in output


@pytest.mark.parametrize("command", ["patch", "attribute"])
def test_cli_bad_sites_is_a_usage_error(command: str) -> None:
    code, output = invoke(command, "--model", "induction-2l", "--task", "induction", "--sites", "blah")
    assert code == 2 and "'--sites'" in output and "unknown site family 'blah'" in output


def test_cli_node_method_with_edges_is_a_usage_error() -> None:
    code, output = invoke("attribute", "--model", "induction-2l", "--method", "atp*", "--edges")
    assert code == 2 and "'--method'" in output and "atp* is node-level only" in output


def test_cli_empty_batch_is_a_usage_error() -> None:
    code, output = invoke("patch", "--model", "induction-2l", "--n", "0")
    assert code == 2 and "'--n'" in output


@pytest.mark.parametrize("command", ["patch", "attribute", "circuit", "demo"])
def test_cli_out_under_a_file_fails_in_one_line_before_loading(command: str, tmp_path: Path) -> None:
    """Before: `circuit` and `attribute` raised FileExistsError/NotADirectoryError with a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = invoke(command, "--model", "induction-2l", "--out", str(blocker / "sub"))
    assert code == 1 and "loaded" not in output
    assert output.strip() == f"error: --out {blocker / 'sub'}: {blocker} is a file, not a folder; pass another folder."


def test_cli_out_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, output = invoke("circuit", "--model", "induction-2l", "--task", "induction", "--out", str(blocker))
    assert code == 1 and output.strip().splitlines() == [
        f"error: --out {blocker}: {blocker} is a file, not a folder; pass another folder."
    ]


def test_cli_failed_run_prints_one_line(tmp_path: Path) -> None:
    """A PathlensError from the run itself (the attention-only model has no MLP) → one line, exit 1."""
    code, output = invoke(
        "patch", "--model", "induction-2l", "--task", "induction", "--sites", "mlp", "--out", str(tmp_path)
    )
    last = output.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: ") and "mlp_out" in last


def test_cli_debug_shows_the_exception(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["--debug", "circuit", "--model", "induction-2l", "--out", str(blocker)])
    assert result.exit_code == 1 and isinstance(result.exception, PathlensError)
    assert str(blocker) in str(result.exception)


@pytest.mark.skipif(not PATHLENS.exists(), reason="the pathlens script is not installed in this environment")
def test_installed_command_reports_one_line_on_stderr(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = [str(PATHLENS), "circuit", "--model", "induction-2l", "--out", str(blocker)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --out {blocker}: {blocker} is a file, not a folder; pass another folder."
    ]
    debug = subprocess.run(
        [args[0], "--debug", *args[1:]], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "PathlensError" in debug.stderr
