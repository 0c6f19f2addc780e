"""Bad inputs and faults around saved state: `patch(out=...)` folders that cannot hold a checkpoint, damaged
checkpoint files, resumes of a different sweep, and saved results whose JSON header was edited.

Each case asserts the error type, that the message names the offending file or input and the way out
(`overwrite=True` for checkpoints), and that the model is untouched afterwards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch

import pathlens
from pathlens import Model
from pathlens.graph import Graph
from pathlens.patching import sweep
from pathlens.results import Scores
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import NormalizedLogitDiff, logit_diff
from tests.helpers import assert_untouched, make_scores, padded_task, snapshot, tiny_model

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
