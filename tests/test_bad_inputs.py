"""Bad input, at every door: each case is a clear error that names the offending input (and the fix), and a model
involved is bit-identical afterwards. Sections: runs, sessions, interventions and tasks; checkpoints, resumes and
saved results; loading, task generators and the CLI. The cases marked in their docstrings were silent wrong
results or lost data before."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import transformers
from typer.testing import CliRunner

import pathlens
from pathlens import Intervention, Model, PathlensError, Task, loading
from pathlens.cli import app
from pathlens.graph import Graph
from pathlens.interventions import Ablate, Add, Project, Replace, Scale
from pathlens.patching import patch, sweep
from pathlens.results import Scores
from pathlens.tasks import factual, greater_than, induction, ioi, make_task
from pathlens.tasks.metrics import NormalizedLogitDiff, logit_diff
from tests.helpers import assert_untouched, make_scores, padded_task, snapshot, tiny_model, token_batch

# ---- runs, sessions, interventions and tasks -------------------------------------------------------------

D = 32  # tiny models' d_model


def test_boolean_rows_are_a_mask_not_indices() -> None:
    """rows=tensor([False, False, True]) patches row 2 only (it used to patch rows 0 and 1)."""
    model = tiny_model("gpt2")
    ids = token_batch()
    mask_rows = model.run(
        ids, interventions=[Intervention("L0.resid_post", Scale(0.0), rows=torch.tensor([0, 0, 1]).bool())]
    )
    index_rows = model.run(ids, interventions=[Intervention("L0.resid_post", Scale(0.0), rows=[2])])
    torch.testing.assert_close(mask_rows.logits, index_rows.logits, atol=0, rtol=0)


def test_boolean_positions_are_a_mask() -> None:
    model = tiny_model("llama")
    ids = token_batch()
    mask = torch.zeros(ids.shape[1], dtype=torch.bool)
    mask[[2, 5]] = True
    by_mask = model.run(ids, interventions=[Intervention("L0.resid_post", Scale(0.0), positions=mask)])
    by_index = model.run(ids, interventions=[Intervention("L0.resid_post", Scale(0.0), positions=[2, 5])])
    torch.testing.assert_close(by_mask.logits, by_index.logits, atol=0, rtol=0)


def test_nan_in_a_source_is_rejected_naming_the_site() -> None:
    """A NaN source used to make the whole row NaN, including positions before the patched one."""
    model = tiny_model("gpt2")
    before = snapshot(model)
    source = torch.zeros(3, 9, D)
    source[0, 4, 1] = float("nan")
    with pytest.raises(PathlensError, match=r"L0\.resid_post.*NaN"):
        model.run(token_batch(), interventions=[Intervention("L0.resid_post", Replace(source), positions=[4])])
    assert_untouched(model, before)
    allowed = model.run(
        token_batch(),
        interventions=[Intervention("L0.resid_post", Replace(source), positions=[4], allow_nonfinite=True)],
    )
    assert torch.isnan(allowed.logits[0, 4:]).all()  # opted in: the NaN is applied


def test_answer_on_padding_is_rejected() -> None:
    """An answer_pos on a padding token used to be scored silently."""
    task = padded_task()
    bad_pos = task.answer_pos.clone()
    row = int((task.attention_mask.sum(1) < task.seq_len).nonzero()[0, 0])
    bad_pos[row] = task.seq_len - 1
    with pytest.raises(PathlensError, match=rf"row {row} scores position {task.seq_len - 1}.*padding"):
        Task("t", task.clean_ids, task.corrupt_ids, task.answer_ids, task.wrong_ids, bad_pos, task.attention_mask)


def test_answer_equal_to_wrong_answer_is_rejected() -> None:
    """The logit difference of such a row is always 0."""
    task = padded_task()
    wrong = task.wrong_ids.clone()
    wrong[1] = task.answer_ids[1]
    with pytest.raises(PathlensError, match=rf"row 1 .*same answer and wrong answer \(token {int(wrong[1])}\)"):
        Task("t", task.clean_ids, task.corrupt_ids, task.answer_ids, wrong, task.answer_pos, task.attention_mask)


def test_attention_mask_of_another_length_is_rejected() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match=r"attention_mask has shape \(3, 8\) but the token ids have \(3, 9\)"):
        model.run(token_batch(), attention_mask=torch.ones(3, 8, dtype=torch.long))


CASES: dict[str, tuple[Callable[[Any], object], str]] = {
    "float positions": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), positions=[6.9])]),
        r"positions.*integers.*6\.9",
    ),
    "float rows": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), rows=[0.5])]),
        r"rows.*integers",
    ),
    "boolean mask of the wrong length": (
        lambda m: m.run(
            token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), rows=torch.tensor([True, False]))]
        ),
        r"rows.*boolean mask.*\(3\)",
    ),
    "token id beyond the vocabulary": (
        lambda m: m.run(torch.tensor([[1, 2, 64]])),
        r"row 0, position 2 holds id 64.*vocabulary \(0\.\.63\)",
    ),
    "negative token id": (lambda m: m.run(torch.tensor([[1, -2, 3]])), r"position 1 holds id -2"),
    "float token ids": (lambda m: m.run(torch.ones(2, 3)), r"integer tensor"),
    "mask with values other than 0/1": (
        lambda m: m.run(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 2, 1]])),
        r"attention_mask must hold only 0",
    ),
    "source of the wrong width": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Replace(torch.zeros(3, 9, 8)))]),
        r"Replace on L0\.resid_post: its source has shape \(3, 9, 8\).*cell of the site is \(32,\)",
    ),
    "vector of the wrong width": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L1.mlp_out", Add(torch.ones(5)))]),
        r"Add on L1\.mlp_out: its vector has shape \(5,\).*\(32,\)",
    ),
    "reference of the wrong width": (
        lambda m: m.run(
            token_batch(), interventions=[Intervention("L0.attn_out", Ablate("mean", reference=torch.ones(2, 9, 3)))]
        ),
        r"Ablate on L0\.attn_out: its reference has shape \(2, 9, 3\)",
    ),
    "basis of the wrong width": (
        lambda m: m.run(
            token_batch(),
            interventions=[Intervention("L0.resid_pre", Project(torch.eye(8)[:, :2], torch.zeros(3, 9, D)))],
        ),
        r"Project on L0\.resid_pre: its basis has shape \(8, 2\).*last dim is 32",
    ),
    "source of the wrong length": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Replace(torch.zeros(3, 5, D)))]),
        r"Replace source: its position axis has size 5, but the run has 9",
    ),
    "inf vector": (
        lambda m: m.run(
            token_batch(), interventions=[Intervention("L0.resid_post", Add(torch.full((D,), float("inf"))))]
        ),
        r"Add on L0\.resid_post: its vector holds 32 NaN/inf",
    ),
    "nan scale": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(float("nan")))]),
        r"Scale on L0\.resid_post: its factor is nan",
    ),
    "unknown position policy": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), positions="first")]),
        r"unknown policy 'first'",
    ),
    "position out of range": (
        lambda m: m.run(token_batch(), interventions=[Intervention("L0.resid_post", Scale(0.0), positions=[9])]),
        r"positions of the intervention on L0\.resid_post \[9\] out of range",
    ),
    "task answer outside the vocabulary": (
        lambda m: patch(m, _task_with(answer=70), sites="attn_out", direction="denoise"),
        r"answer_ids row 0 holds token id 70.*vocabulary \(0\.\.63\)",
    ),
    "task prompt outside the vocabulary": (
        lambda m: patch(m, _task_with(prompt_id=99), sites="attn_out", direction="denoise"),
        r"clean_ids row 0 holds token id 99",
    ),
}


def _task_with(answer: int = 5, prompt_id: int = 3) -> Task:
    clean = torch.tensor([[1, 2, prompt_id, 4], [4, 3, 2, 1]])
    return Task.from_ids(clean, clean.flip(1), [answer, 5], [6, 7])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_the_model_untouched(case: str) -> None:
    call, message = CASES[case]
    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(PathlensError, match=message):
        call(model)
    assert_untouched(model, before)


TASK_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "float ids": ({"clean_ids": torch.ones(2, 4)}, r"clean_ids must hold integers"),
    "negative answer": ({"answer_ids": torch.tensor([-1, 5])}, r"answer_ids holds a negative token id \(-1\) at row 0"),
    "mask values": ({"attention_mask": torch.full((2, 4), 2)}, r"attention_mask must hold only 0"),
}


@pytest.mark.parametrize("case", list(TASK_CASES))
def test_bad_task_fields_are_named(case: str) -> None:
    changes, message = TASK_CASES[case]
    clean = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    fields: dict[str, Any] = {
        "name": "t",
        "clean_ids": clean,
        "corrupt_ids": clean.flip(1),
        "answer_ids": torch.tensor([5, 5]),
        "wrong_ids": torch.tensor([6, 7]),
        "answer_pos": torch.tensor([3, 3]),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
    }
    fields.update(changes)
    if "clean_ids" in changes:
        fields["corrupt_ids"] = changes["clean_ids"]
    with pytest.raises(PathlensError, match=message):
        Task(**fields)


# ---- checkpoints, resumes and saved results --------------------------------------------------------------

START_OVER = "overwrite=True"


@pytest.fixture
def model() -> Iterator[Model]:
    model = tiny_model("gpt2")
    before = snapshot(model)
    yield model
    assert_untouched(model, before)


@pytest.fixture
def task() -> Task:
    return padded_task()


def run(model: Model, task: Task, out: Path, **kwargs: object) -> Scores:
    return pathlens.patch(model, task, sites="heads", out=out, progress=False, **kwargs)  # type: ignore[arg-type]


@contextmanager
def counting_forwards(model: Model) -> Iterator[list[int]]:
    """Count the model's forwards in the block (a forward pre-hook, removed on exit)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    handle = model.hf.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def interrupted(model: Model, task: Task, out: Path, after: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start a sweep in `out` and interrupt it (KeyboardInterrupt) after `after` chunks."""
    original = sweep._Sweep.run_chunk
    done = [0]

    def run_chunk(self: sweep._Sweep, chunk: sweep.Chunk) -> torch.Tensor:
        if done[0] == after:
            raise KeyboardInterrupt
        done[0] += 1
        return original(self, chunk)

    with monkeypatch.context() as patched:
        patched.setattr(sweep._Sweep, "run_chunk", run_chunk)
        with pytest.raises(KeyboardInterrupt):
            pathlens.patch(model, task, sites="resid_pre", positions="each", out=out, progress=False)


# ---- out= that cannot hold a checkpoint: refused before any forward ---------------------------------------


def refused_before_compute(model: Model, task: Task, out: Path, match: str) -> None:
    with counting_forwards(model) as calls, pytest.raises(pathlens.PathlensError, match=match) as err:
        run(model, task, out)
    assert str(out) in str(err.value)
    assert calls[0] == 0, "a forward ran before out= was checked"


def test_out_is_a_file(model: Model, task: Task, tmp_path: Path) -> None:
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    refused_before_compute(model, task, target, "is a file")
    assert target.read_text() == "keep me"


def test_out_under_a_file(model: Model, task: Task, tmp_path: Path) -> None:
    (tmp_path / "results.txt").write_text("keep me")
    refused_before_compute(model, task, tmp_path / "results.txt" / "sweep", "under .*results.txt, which is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only-mode folder")
def test_out_in_a_read_only_folder(model: Model, task: Task, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused_before_compute(model, task, locked / "sweep", "cannot be written")
    finally:
        locked.chmod(0o755)


def test_out_where_the_system_refuses_writes(model: Model, task: Task) -> None:
    """/sys refuses new folders even to root: the probe write finds it, as it would a read-only filesystem."""
    target = Path("/sys/pathlens-sweep")
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys accepts new folders here")
    refused_before_compute(model, task, target, "cannot be written")


# ---- damaged checkpoint files: named, with the way to start over --------------------------------------------


def assert_damaged(model: Model, task: Task, out: Path, path: Path, what: str) -> None:
    with pytest.raises(pathlens.PathlensError, match=what) as err:
        run(model, task, out)
    message = str(err.value)
    assert str(path) in message and START_OVER in message
    run(model, task, out, overwrite=True)  # the way out works


def finished(model: Model, task: Task, tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    run(model, task, out)
    return out


def test_truncated_progress_file(model: Model, task: Task, tmp_path: Path) -> None:
    out = finished(model, task, tmp_path)
    state = out / "progress.safetensors"
    state.write_bytes(state.read_bytes()[:40])
    assert_damaged(model, task, out, state, "cannot be read as safetensors")


def test_progress_file_missing_a_tensor(model: Model, task: Task, tmp_path: Path) -> None:
    out = finished(model, task, tmp_path)
    state = out / "progress.safetensors"
    tensors = safetensors.torch.load_file(state)
    safetensors.torch.save_file({"values": tensors["values"]}, state)
    assert_damaged(model, task, out, state, "lacks the tensor 'done'")


def test_progress_file_of_the_wrong_shape(model: Model, task: Task, tmp_path: Path) -> None:
    out = finished(model, task, tmp_path)
    state = out / "progress.safetensors"
    tensors = safetensors.torch.load_file(state)
    safetensors.torch.save_file({"values": tensors["values"][:, :2].contiguous(), "done": tensors["done"]}, state)
    assert_damaged(model, task, out, state, "holds 'values' as torch.float64")


def test_progress_file_missing(model: Model, task: Task, tmp_path: Path) -> None:
    out = finished(model, task, tmp_path)
    (out / "progress.safetensors").unlink()
    assert_damaged(model, task, out, out / "progress.safetensors", "is missing")


@pytest.mark.parametrize(
    "text,what",
    [("{not json", "cannot be read as JSON"), ("[1, 2]", "does not hold a JSON object"), ("", "cannot be read")],
)
def test_broken_sweep_json(model: Model, task: Task, tmp_path: Path, text: str, what: str) -> None:
    out = finished(model, task, tmp_path)
    (out / "sweep.json").write_text(text)
    assert_damaged(model, task, out, out / "sweep.json", what)


def test_sweep_json_missing_a_section(model: Model, task: Task, tmp_path: Path) -> None:
    out = finished(model, task, tmp_path)
    saved = json.loads((out / "sweep.json").read_text())
    del saved["metric"]
    (out / "sweep.json").write_text(json.dumps(saved))
    assert_damaged(model, task, out, out / "sweep.json", r"lacks \['metric'\]")


def test_sweep_json_of_an_older_layout(model: Model, task: Task, tmp_path: Path) -> None:
    """The layout before weights, task and metric were fingerprinted: cannot be checked, so not resumed."""
    out = finished(model, task, tmp_path)
    (out / "sweep.json").write_text(json.dumps({"model": "tiny-gpt2", "metric": "logit_diff", "direction": "denoise"}))
    assert_damaged(model, task, out, out / "sweep.json", "another pathlens version")


def test_progress_log_damaged_before_its_end(
    model: Model, task: Task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sweep"
    interrupted(model, task, out, 3, monkeypatch)
    log = out / "progress.log"
    data = bytearray(log.read_bytes())
    data[len(b"pathlens-log 1\n") + 12 + 9] ^= 0xFF  # a byte of the first record's values
    log.write_bytes(bytes(data))
    with pytest.raises(pathlens.PathlensError, match="record 0 .* is damaged") as err:
        pathlens.patch(model, task, sites="resid_pre", positions="each", out=out, progress=False)
    assert str(log) in str(err.value) and START_OVER in str(err.value)


def test_progress_log_of_another_format(model: Model, task: Task, tmp_path: Path) -> None:
    out = finished(model, task, tmp_path)
    (out / "progress.log").write_text("chunk 0 done\n")
    assert_damaged(model, task, out, out / "progress.log", "not a pathlens progress log")


# ---- resuming a different sweep: what differs, and how to start over ----------------------------------------


def assert_stale(model: Model, task: Task, out: Path, what: str, **kwargs: object) -> None:
    with pytest.raises(pathlens.PathlensError, match=f"different sweep: {what} differ") as err:
        run(model, task, out, **kwargs)
    assert str(out) in str(err.value) and START_OVER in str(err.value)


def named(fn: Callable[[torch.Tensor, Task], torch.Tensor]) -> Callable[[torch.Tensor, Task], torch.Tensor]:
    fn.__name__ = "my_metric"
    return fn


def test_resume_with_another_metric_of_the_same_name(model: Model, task: Task, tmp_path: Path) -> None:
    first = named(lambda logits, t: logit_diff(logits, t))
    second = named(lambda logits, t: 2 * logit_diff(logits, t))
    run(model, task, tmp_path, metric=first)
    assert_stale(model, task, tmp_path, "metric", metric=second)
    again = run(model, task, tmp_path, metric=second, overwrite=True)
    assert torch.equal(again.values, pathlens.patch(model, task, sites="heads", metric=second, progress=False).values)


def test_resume_with_other_normalization_baselines(model: Model, task: Task, tmp_path: Path) -> None:
    run(model, task, tmp_path, metric=NormalizedLogitDiff(clean=2.0, corrupt=0.0))
    assert_stale(model, task, tmp_path, "metric", metric=NormalizedLogitDiff(clean=3.0, corrupt=0.5))


def test_resume_after_a_norm_weight_changed(task: Task, tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    run(model, task, tmp_path)
    with torch.no_grad():
        model.hf.transformer.ln_f.weight[0] += 0.5
    before = snapshot(model)
    assert_stale(model, task, tmp_path, "weights")
    assert_untouched(model, before)


def test_resume_with_a_changed_task(model: Model, task: Task, tmp_path: Path) -> None:
    run(model, task, tmp_path)
    other = Task(
        task.name,
        task.clean_ids,
        task.corrupt_ids,
        task.answer_ids,
        task.wrong_ids + 1,
        task.answer_pos,
        task.attention_mask,
    )
    assert_stale(model, other, tmp_path, "task")


def test_resume_with_other_settings(model: Model, task: Task, tmp_path: Path) -> None:
    run(model, task, tmp_path, direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="settings differ .*direction: 'denoise' saved, 'noise' now"):
        run(model, task, tmp_path, direction="noise")


# ---- saved results whose header was edited -------------------------------------------------------------------


def test_scores_with_relabelled_coordinates(tmp_path: Path) -> None:
    make_scores([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).save(tmp_path / "s")
    header_path = tmp_path / "s.json"
    header = json.loads(header_path.read_text())
    header["coords"]["head"] = list(reversed(header["coords"]["head"]))
    header_path.write_text(json.dumps(header, indent=2))
    with pytest.raises(pathlens.PathlensError, match="was modified after it was saved") as err:
        Scores.load(tmp_path / "s")
    assert str(header_path) in str(err.value)


def test_scores_with_edited_metadata(tmp_path: Path) -> None:
    make_scores([[1.0, 2.0]], meta={"model": "gpt2"}).save(tmp_path / "s")
    header_path = tmp_path / "s.json"
    header_path.write_text(header_path.read_text().replace('"gpt2"', '"llama"'))
    with pytest.raises(pathlens.PathlensError, match="was modified after it was saved") as err:
        Scores.load(tmp_path / "s")
    assert str(header_path) in str(err.value)


def test_graph_with_relabelled_nodes(tmp_path: Path) -> None:
    graph = Graph(["input", "L0.H0"], ["L0.H0", "logits"], torch.tensor([[1.0, 0.5], [0.0, 2.0]]), "ld", "eap")
    graph.save(tmp_path / "g")
    header_path = tmp_path / "g.json"
    header = json.loads(header_path.read_text())
    header["receivers"] = ["logits", "L0.H0"]
    header_path.write_text(json.dumps(header))
    with pytest.raises(pathlens.PathlensError, match="was modified after it was saved") as err:
        Graph.load(tmp_path / "g")
    assert str(header_path) in str(err.value)


def test_results_saved_before_the_header_checksum_still_load(tmp_path: Path) -> None:
    scores = make_scores([[1.0, 2.0, 3.0]], meta={"note": "ünïcode", "nan": float("nan")})
    scores.save(tmp_path / "s")
    header_path = tmp_path / "s.json"
    header = json.loads(header_path.read_text())
    del header["header_sha256"]
    header["format_version"] = 1
    header_path.write_text(json.dumps(header, indent=2, ensure_ascii=False))
    loaded = Scores.load(tmp_path / "s")
    assert loaded.coords == scores.coords and loaded.meta["note"] == "ünïcode"


# ---- the CLI: a stale checkpoint is a one-line error naming --overwrite, which starts over --------------------


def test_cli_resume_of_another_sweep_names_overwrite(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pathlens.cli import app

    runner = CliRunner()
    args = ["patch", "--model", "induction-2l", "--task", "induction", "--n", "4", "--out", str(tmp_path)]
    assert runner.invoke(app, [*args, "--direction", "denoise"], terminal_width=200).exit_code == 0
    stale = runner.invoke(app, [*args, "--direction", "noise"], terminal_width=200)
    assert stale.exit_code == 1 and "Traceback" not in stale.output
    flat = " ".join(stale.output.split())
    assert "settings differ" in flat and "--overwrite" in flat and str(tmp_path / "progress") in flat
    fresh = runner.invoke(app, [*args, "--direction", "noise", "--overwrite"], terminal_width=200)
    assert fresh.exit_code == 0, fresh.output


def test_checkpoint_files_follow_the_umask(model: Model, task: Task, tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        run(model, task, tmp_path / "sweep")
    finally:
        os.umask(previous)
    for name in ("sweep.json", "progress.safetensors"):
        assert (tmp_path / "sweep" / name).stat().st_mode & 0o777 == 0o640, name


# ---- loading, task generators and the CLI ----------------------------------------------------------------

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
