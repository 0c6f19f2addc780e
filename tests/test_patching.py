"""Activation patching: every fast path (batching, layer cone, position cone with the KV cache, chunking,
resume) equals a naive loop of one full forward per patch, written here with nothing but `Model.run`.

Tolerance: 1e-5 absolute on the batch-mean logit difference (fp32; batching and the KV cache reorder sums).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pathlens
from pathlens import Ablate, Intervention, Model, Replace
from pathlens.patching import sweep as sweep_module
from pathlens.tasks.base import Task
from tests.helpers import FAMILIES, padded_task, tiny_model

TOL = 1e-5


_SOURCES: dict[tuple[int, int, str, str], tuple[Model, Task, torch.Tensor]] = {}


def source_value(model: Model, task: Task, family: pathlens.Site, which: str) -> torch.Tensor:
    """The cached activation of `family` on the clean or corrupted prompts (one run per model, task, family)."""
    key = (id(model), id(task), str(family), which)
    hit = _SOURCES.get(key)
    if hit is None or hit[0] is not model or hit[1] is not task:
        ids = task.clean_ids if which == "clean" else task.corrupt_ids
        value = model.run(ids, attention_mask=task.attention_mask, cache=[family]).cache[family]
        hit = _SOURCES[key] = (model, task, value)
    return hit[2]


def naive(
    model: Model,
    task: Task,
    site: str,
    positions: list[int] | None,
    direction: str = "denoise",
    ablation: str | None = None,
) -> float:
    """One full forward with one intervention: the reference every fast path must equal."""
    denoise = direction == "denoise" and not ablation
    base = task.corrupt_ids if denoise else task.clean_ids
    parsed = pathlens.parse_site(site)
    value = source_value(model, task, parsed.family, "clean" if denoise or ablation else "corrupt")
    if parsed.index is not None:
        value = value[:, :, parsed.index]
    op = Ablate(ablation, reference=value) if ablation else Replace(value)
    run = model.run(
        base, attention_mask=task.attention_mask, interventions=[Intervention(site, op, positions=positions)]
    )
    return float(task.score(run.logits).mean())


REPRESENTATIVE = ("gpt2", "llama", "gemma3", "neox_parallel")
SWEEPS = [(f, "heads", "all") for f in FAMILIES] + [(f, "resid_pre", "each") for f in FAMILIES]
SWEEPS += [(f, s, p) for f in REPRESENTATIVE for s, p in (("k", "each"), ("z", [2, 5]), ("attn_out", "each"))]


@pytest.mark.parametrize("family,sites,positions", SWEEPS)
def test_fast_paths_equal_naive_loop(family: str, sites: str, positions: object) -> None:
    model = tiny_model(family, weight_scale=4.0)
    task = padded_task()
    scores = pathlens.patch(model, task, sites=sites, positions=positions, progress=False, direction="denoise")
    assert scores.values.std() > 1e-3, "effects too small for a meaningful comparison"
    for cell in scores.to_frame().itertuples():
        layer = cell.layer
        if sites == "heads":
            site = f"L{layer}.H{cell.head}"
        elif sites == "z":
            site = f"L{layer}.H{cell.head}.z"
        elif sites == "k":
            site = f"L{layer}.G{cell.group}.k"
        else:
            site = f"L{layer}.{sites}"
        pos = None if positions == "all" else [int(cell.pos)]
        assert abs(cell.value - naive(model, task, site, pos)) <= TOL, (site, pos)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "neox_parallel"])
def test_noising_mlp_neurons_and_ablations(family: str) -> None:
    model = tiny_model(family, weight_scale=4.0)
    task = padded_task()
    noise = pathlens.patch(model, task, sites="mlp_out", positions="each", direction="noise", progress=False)
    for cell in noise.to_frame().itertuples():
        assert abs(cell.value - naive(model, task, f"L{cell.layer}.mlp_out", [int(cell.pos)], "noise")) <= TOL
    neurons = pathlens.patch(
        model, task, sites="neurons", neurons={0: [1, 7], 1: [3]}, positions=[4], progress=False, direction="denoise"
    )
    for cell in neurons.to_frame().itertuples():
        assert abs(cell.value - naive(model, task, cell.site, [4])) <= TOL
    for how in ("zero", "mean", "resample"):
        ablated = pathlens.patch(model, task, sites="heads", ablation=how, progress=False, direction="denoise")
        assert ablated.method == f"ablate:{how}"
        if how != "resample":
            for cell in ablated.to_frame().itertuples():
                assert abs(cell.value - naive(model, task, f"L{cell.layer}.H{cell.head}", None, ablation=how)) <= TOL
    resample = pathlens.patch(
        model, task, sites="heads", ablation="resample", progress=False, cone=False, direction="denoise"
    )
    torch.testing.assert_close(ablated.values, resample.values, atol=TOL, rtol=0)


def test_explicit_site_list_including_modules() -> None:
    model = tiny_model("gpt2", weight_scale=4.0)
    task = padded_task()
    sites = ["L1.H2", "L0.mlp_out", "module:transformer.h.0.mlp", "embed"]
    scores = pathlens.patch(model, task, sites=sites, positions="each", progress=False, direction="denoise")
    assert scores.dims == ("site", "pos")
    for cell in scores.to_frame().itertuples():
        assert abs(cell.value - naive(model, task, cell.site, [int(cell.pos)])) <= TOL


def test_patching_every_position_of_a_layer_gives_the_endpoints(family: str) -> None:
    model = tiny_model(family, weight_scale=4.0)
    task = padded_task()
    denoise = pathlens.patch(model, task, sites="resid_pre", positions="all", progress=False, direction="denoise")
    noise = pathlens.patch(model, task, sites="resid_pre", positions="all", direction="noise", progress=False)
    clean, corrupt = denoise.meta["clean_metric"], denoise.meta["corrupt_metric"]
    torch.testing.assert_close(denoise.values, torch.full_like(denoise.values, clean), atol=TOL, rtol=0)
    torch.testing.assert_close(noise.values, torch.full_like(noise.values, corrupt), atol=TOL, rtol=0)


def test_memory_budget_forces_chunks_with_same_scores() -> None:
    model = tiny_model("llama", weight_scale=4.0)
    task = padded_task()
    roomy = pathlens.patch(model, task, sites="heads", positions="each", progress=False, direction="denoise")
    for budget in (1, 5, 30):
        tight = pathlens.patch(
            model, task, sites="heads", positions="each", max_batch_tokens=budget, progress=False, direction="denoise"
        )
        torch.testing.assert_close(tight.values, roomy.values, atol=TOL, rtol=0)


def test_budget_bounds_every_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlens.patching import cone

    seen: list[int] = []
    original = cone.ConeRunner.run

    def spy(self: cone.ConeRunner, layer: int, start: int, patches: list, rows: torch.Tensor) -> torch.Tensor:
        seen.append(len(patches) * int(rows.numel()) * (self.seq_len - start))
        return original(self, layer, start, patches, rows)

    monkeypatch.setattr(cone.ConeRunner, "run", spy)
    pathlens.patch(
        tiny_model("gpt2"),
        padded_task(),
        sites="heads",
        positions="each",
        max_batch_tokens=20,
        progress=False,
        direction="denoise",
    )
    assert seen and max(seen) <= 20


def induction_circuit() -> set[tuple[int, int]]:
    """(layer, head) of the shipped model's previous-token and induction heads, as recorded at training."""
    info = json.loads((pathlens.loading.induction_weights_dir() / "training.json").read_text())["circuit"]
    return {tuple(info["previous_token_head"]), tuple(info["induction_head"])}


def test_induction_model_top_heads_are_the_circuit() -> None:
    model = pathlens.load("induction-2l")
    cfg = model.hf.config
    task = pathlens.tasks.induction(vocab_size=cfg.vocab_size, bos_id=cfg.bos_token_id, n=16, seed=0)
    for direction in ("noise", "denoise"):
        scores = pathlens.patch(model, task, sites="heads", direction=direction, progress=False)
        baseline = scores.meta["clean_metric" if direction == "noise" else "corrupt_metric"]
        top2 = {(int(r.layer), int(r.head)) for r in scores.with_values(scores.values - baseline).top(2).itertuples()}
        assert top2 == induction_circuit(), (direction, top2)


RESUME_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import pathlens
    from pathlens.patching import cone
    from tests.helpers import padded_task, tiny_model
    kill_after = int(os.environ.get("KILL_AFTER", "0"))
    calls = [0]
    original = cone.ConeRunner.run
    def counting(self, *a, **k):
        calls[0] += 1
        if kill_after and calls[0] > kill_after:
            os.kill(os.getpid(), 9)
        return original(self, *a, **k)
    cone.ConeRunner.run = counting
    scores = pathlens.patch(tiny_model("llama", weight_scale=4.0), padded_task(), sites="heads", positions="each",
                            max_batch_tokens=30, out=sys.argv[1], progress=False, direction="denoise")
    scores.save(os.path.join(sys.argv[1], "final"))
    print("chunks run:", calls[0])
    """
)


def test_kill_and_resume_gives_identical_scores(tmp_path: Path) -> None:
    script = tmp_path / "sweep.py"
    script.write_text(RESUME_SCRIPT.format(root=str(Path(__file__).parent.parent)))
    env = {**os.environ, "KILL_AFTER": "5"}
    killed = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "resumed")], env=env, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "resumed" / "progress.safetensors").exists()
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path / "resumed")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([sys.executable, str(script), str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    n_resumed = int(resumed.stdout.split("chunks run:")[1])
    n_whole = int(whole.stdout.split("chunks run:")[1])
    assert n_resumed == n_whole - 5
    a = pathlens.results.Scores.load(tmp_path / "resumed" / "final")
    b = pathlens.results.Scores.load(tmp_path / "whole" / "final")
    assert torch.equal(a.values, b.values)


def test_resume_refuses_a_different_sweep(tmp_path: Path) -> None:
    model, task = tiny_model("gpt2"), padded_task()
    pathlens.patch(model, task, sites="heads", out=tmp_path, progress=False, direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="different sweep"):
        pathlens.patch(model, task, sites="resid_pre", out=tmp_path, progress=False, direction="denoise")


def counted_chunks(monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> list[int]:
    """Count the chunks a sweep runs; with `stop_after`, interrupt it (KeyboardInterrupt) after that many."""
    original = sweep_module._Sweep.run_chunk
    calls = [0]

    def run_chunk(self: sweep_module._Sweep, chunk: sweep_module.Chunk) -> torch.Tensor:
        if calls[0] == stop_after:
            raise KeyboardInterrupt
        calls[0] += 1
        return original(self, chunk)

    monkeypatch.setattr(sweep_module._Sweep, "run_chunk", run_chunk)
    return calls


def test_resuming_a_finished_sweep_runs_nothing_and_is_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, task = tiny_model("llama", weight_scale=4.0), padded_task()
    plain = pathlens.patch(model, task, sites="heads", positions="each", max_batch_tokens=30, progress=False)
    first = pathlens.patch(
        model, task, sites="heads", positions="each", max_batch_tokens=30, out=tmp_path, progress=False
    )
    calls = counted_chunks(monkeypatch)
    again = pathlens.patch(
        model, task, sites="heads", positions="each", max_batch_tokens=30, out=tmp_path, progress=False
    )
    assert calls[0] == 0
    assert torch.equal(first.values, plain.values) and torch.equal(again.values, plain.values)


def test_resume_after_an_interrupt_drops_a_torn_last_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted append leaves a partial last record: the resume ignores it and runs that chunk again."""
    model, task = tiny_model("llama", weight_scale=4.0), padded_task()
    kwargs = {"sites": "resid_pre", "positions": "each", "out": tmp_path, "progress": False}
    with monkeypatch.context() as patched:
        plain_calls = counted_chunks(patched)
        plain = pathlens.patch(model, task, sites="resid_pre", positions="each", progress=False)
    total = plain_calls[0]
    with monkeypatch.context() as patched:
        counted_chunks(patched, stop_after=4)
        with pytest.raises(KeyboardInterrupt):
            pathlens.patch(model, task, **kwargs)  # type: ignore[arg-type]
    log = tmp_path / "progress.log"
    log.write_bytes(log.read_bytes()[:-3])
    calls = counted_chunks(monkeypatch)
    resumed = pathlens.patch(model, task, **kwargs)  # type: ignore[arg-type]
    assert calls[0] == total - 3
    assert torch.equal(resumed.values, plain.values)
    overwritten = pathlens.patch(model, task, overwrite=True, **kwargs)  # type: ignore[arg-type]
    assert calls[0] == 2 * total - 3
    assert torch.equal(overwritten.values, plain.values)


def test_bad_arguments() -> None:
    model, task = tiny_model("gpt2"), padded_task()
    with pytest.raises(pathlens.PathlensError, match="unknown site family"):
        pathlens.patch(model, task, sites="bananas", direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="direction"):
        pathlens.patch(model, task, direction="sideways")
    with pytest.raises(pathlens.PathlensError, match="out of range"):
        pathlens.patch(model, task, sites="heads", positions=[40], direction="denoise")
    with pytest.raises(pathlens.PathlensError, match="needs neurons"):
        pathlens.patch(model, task, sites="neurons", direction="denoise")
