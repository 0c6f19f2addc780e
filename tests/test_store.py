"""Activation store (pathlens.features.store): collected rows equal a plain cached run, resumes after SIGKILL to
byte-identical shards, manifest and checksum errors, the shuffled loader, on-the-fly streaming, bad input.

References: `model.run(..., cache=...)` on the same windows (the activations), an uninterrupted collect in another
folder (the bytes after a resume), `ActivationStore.rows` in order (what the shuffled loader must cover)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.features.corpus import Windows
from pathlens.features.store import ActivationStore, collect, stream
from tests.helpers import VOCAB, assert_untouched, snapshot, tiny_model

REPO = Path(__file__).resolve().parents[1]
SITES = ["L0.mlp_post", "L1.resid_post"]
N_WINDOWS, CONTEXT, BATCH = 22, 12, 4
BUDGET = 60_000  # bytes: shards of 4 windows for these two sites (12 x (64 + 32) floats per window)


def window_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (N_WINDOWS, CONTEXT), generator=torch.Generator().manual_seed(seed))


def with_bos(ids: torch.Tensor) -> Windows:
    out = ids.clone()
    out[:, 0] = 1
    return Windows.of_ids(out, bos=True)


def store_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_rows_equal_a_cached_run_and_model_untouched(tmp_path: Path) -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    wins = with_bos(window_ids())
    store = collect(model, SITES, wins, tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    assert_untouched(model, before)
    assert store.complete and store.manifest["n_shards"] == 6 and store.manifest["shard_windows"] == 4
    assert store.n_rows == N_WINDOWS * (CONTEXT - 1)  # the first position (BOS here) left out
    reference = model.run(wins.ids, cache=SITES).cache
    for site in SITES:
        expected = reference[site][:, 1:].reshape(-1, store.widths[site])
        torch.testing.assert_close(store.rows(site), expected, atol=1e-6, rtol=1e-5)  # batched 4 vs 22 at once
    assert torch.equal(store.window_ids(), wins.ids)
    window, position = store.origin(torch.tensor([0, 10, 11, store.n_rows - 1]))
    assert window.tolist() == [0, 0, 1, N_WINDOWS - 1] and position.tolist() == [1, 11, 1, CONTEXT - 1]
    manifest = store.manifest
    assert manifest["model"]["name"] == "tiny-llama" and manifest["sites"] == SITES
    assert manifest["tokens_total"] == N_WINDOWS * CONTEXT and manifest["dtype"] == "float32"
    assert all(len(entry["sha256"]) == 64 for entry in manifest["shards"])


def test_origin_maps_rows_to_their_tokens(tmp_path: Path) -> None:
    """Each stored `embed` row is the embedding of the token `origin` names."""
    model = tiny_model("gpt2")
    store = collect(model, "embed", with_bos(window_ids()), tmp_path, batch_size=BATCH, max_bytes=20_000)
    assert store.n_shards > 1
    rows = torch.arange(store.n_rows)
    window, position = store.origin(rows)
    tokens = store.window_ids()[window, position]
    expected = model.hf.get_input_embeddings()(tokens)
    assert torch.equal(store.rows("embed"), expected.detach())


def test_stop_early_and_stream_give_the_same_values(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    ids = window_ids()
    early = collect(model, ["L0.attn_out"], ids, tmp_path / "a", batch_size=BATCH, max_bytes=BUDGET)
    full = collect(model, ["L0.attn_out"], ids, tmp_path / "b", batch_size=BATCH, max_bytes=BUDGET, stop_early=False)
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b")
    before = snapshot(model)
    batches = stream(model, ["L0.attn_out"], ids, batch_size=BATCH, skip_first=True)
    first = next(batches)
    assert_untouched(model, before)  # no hook outlives a batch, even with the stream half read
    model.run(ids[:2])  # a forward of its own runs to the end
    flying = torch.cat([first["L0.attn_out"], *(b["L0.attn_out"] for b in batches)])
    assert torch.equal(flying, early.rows("L0.attn_out"))
    assert full.n_rows == N_WINDOWS * (CONTEXT - 1)
    every = collect(model, ["L0.attn_out"], ids, tmp_path / "c", batch_size=BATCH, max_bytes=BUDGET, skip_first=False)
    reference = model.run(ids, cache=["L0.attn_out"]).cache["L0.attn_out"]  # (n, P, d)
    torch.testing.assert_close(every.rows("L0.attn_out"), reference.reshape(-1, 32), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(early.rows("L0.attn_out"), reference[:, 1:].reshape(-1, 32), atol=1e-6, rtol=1e-5)
    assert every.origin(torch.tensor([0, CONTEXT]))[1].tolist() == [0, 0]
    assert len(next(stream(model, "L0.attn_out", ids, batch_size=2))["L0.attn_out"]) == 2 * CONTEXT  # no BOS: kept
    assert len(next(stream(model, "L0.attn_out", with_bos(ids), batch_size=2))["L0.attn_out"]) == 2 * (CONTEXT - 1)


def test_bfloat16_store_and_progress(tmp_path: Path) -> None:
    model = tiny_model("llama")
    seen: list[tuple[int, int]] = []
    store = collect(
        model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET, dtype="bfloat16",
        progress=lambda done, total: seen.append((done, total)),
    )  # fmt: skip
    assert store.dtype == torch.bfloat16 and store.rows("L0.mlp_post").dtype == torch.bfloat16
    assert seen[-1] == (N_WINDOWS, N_WINDOWS) and [d for d, _ in seen] == sorted(d for d, _ in seen)


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from tests.test_store import BATCH, BUDGET, SITES, window_ids
    from tests.helpers import tiny_model
    from pathlens.features.store import collect

    kill_at, calls, real = int(sys.argv[2]), [0], os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd)

    os.fsync = fsync
    collect(tiny_model("llama"), SITES, window_ids(), sys.argv[1], batch_size=BATCH, max_bytes=BUDGET)
    """
)


@pytest.mark.parametrize("kill_at", [10, 11, 12])
def test_resumes_after_sigkill_to_byte_identical_shards(tmp_path: Path, kill_at: int) -> None:
    """fsync 10: shard 1 written to its temporary file, not yet renamed; 11: shard 1 in place, manifest not yet
    updated; 12: the next manifest in its temporary file, not yet renamed."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = _CHILD.format(repo=str(REPO))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", script, str(killed), str(kill_at)], env=env, capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    partial = ActivationStore(killed)
    assert not partial.complete and partial.n_shards == 1
    first_inode = (killed / "shard-00000.safetensors").stat().st_ino

    torch.set_num_threads(1)
    model = tiny_model("llama")
    resumed = collect(model, SITES, window_ids(), killed, batch_size=BATCH, max_bytes=BUDGET)
    reference = collect(model, SITES, window_ids(), clean, batch_size=BATCH, max_bytes=BUDGET)
    assert resumed.complete and store_files(killed) == store_files(clean)
    assert resumed.manifest["shards"] == reference.manifest["shards"]
    assert (killed / "shard-00000.safetensors").stat().st_ino == first_inode, "a committed shard was recomputed"
    assert not list(killed.glob(".*.tmp")), "temporary files of the killed write are left"


def test_resume_refuses_another_model_site_or_dtype(tmp_path: Path) -> None:
    model = tiny_model("llama")
    collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    with pytest.raises(PathlensError, match="different model.*tiny-llama"):
        collect(tiny_model("llama", seed=1), SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    with pytest.raises(PathlensError, match="different sites.*L1.mlp_in"):
        collect(model, ["L0.mlp_post", "L1.mlp_in"], window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    with pytest.raises(PathlensError, match="different dtype"):
        collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET, dtype="float16")
    with pytest.raises(PathlensError, match="different corpus windows"):
        collect(model, SITES, window_ids(seed=5), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    with pytest.raises(PathlensError, match="another out= folder"):
        collect(model, SITES, window_ids(), tmp_path, batch_size=2, max_bytes=BUDGET)
    with pytest.raises(PathlensError, match="different skip_first"):
        collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET, skip_first=False)


def test_check_refuses_another_model_or_a_missing_site(tmp_path: Path) -> None:
    model = tiny_model("llama")
    store = collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    store.check(model, SITES)
    with pytest.raises(PathlensError, match="with different weights"):
        store.check(tiny_model("llama", seed=1))
    gpt2 = tiny_model("gpt2")
    with pytest.raises(PathlensError, match="not 'tiny-gpt2'"):
        store.check(gpt2)
    with pytest.raises(PathlensError, match=r"holds no site L1.mlp_post; it holds \['L0.mlp_post', 'L1.resid_post'\]"):
        store.dataset("L1.mlp_post")
    with pytest.raises(PathlensError, match="holds no activation store"):
        ActivationStore(tmp_path / "nothing")


def test_corrupt_shard_is_named_and_recollected(tmp_path: Path) -> None:
    model = tiny_model("llama")
    collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    good = store_files(tmp_path)
    store = ActivationStore(tmp_path)
    store.rows("L0.mlp_post")  # every shard checked once: later reads skip the hash while the file is unchanged
    shard = tmp_path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PathlensError, match=r"shard-00002.safetensors is corrupt"):
        store.rows("L0.mlp_post")
    with pytest.raises(PathlensError, match=r"shard-00002.safetensors is corrupt"):
        list(store.dataset("L0.mlp_post", batch_size=7))
    store.shard(1)  # the others still read
    with pytest.raises(PathlensError, match=r"shard-00002.safetensors is corrupt"):
        ActivationStore(tmp_path).shard(2)
    collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    assert store_files(tmp_path) == good


def test_loader_is_seeded_shuffles_across_shards_and_covers_every_row_once(tmp_path: Path) -> None:
    model = tiny_model("llama")
    store = collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    ordered = store.rows("L1.resid_post")
    per_shard = store.manifest["shards"][0]["rows"]
    dataset = store.dataset("L1.resid_post", batch_size=10, seed=7, buffer_shards=2)
    epochs = [torch.cat(list(dataset)) for _ in range(2)]
    assert len(list(store.dataset("L1.resid_post", batch_size=10))) == len(dataset) == -(-store.n_rows // 10)
    for rows in epochs:
        assert rows.shape == ordered.shape
        # every row exactly once: the same multiset of rows (sorted lexicographically through a stable key)
        assert torch.equal(_sorted_rows(rows), _sorted_rows(ordered))
    assert not torch.equal(epochs[0], epochs[1]), "each epoch is a new order"
    again = store.dataset("L1.resid_post", batch_size=10, seed=7, buffer_shards=2)
    assert torch.equal(torch.cat(list(again)), epochs[0]), "same seed, same epoch: same order"
    other = store.dataset("L1.resid_post", batch_size=10, seed=8, buffer_shards=2)
    assert not torch.equal(torch.cat(list(other)), epochs[0])
    first = next(iter(store.dataset("L1.resid_post", batch_size=40, seed=7, buffer_shards=3)))
    shards = {int(_row_index(ordered, r)) // per_shard for r in first}
    assert len(shards) > 1, "a batch mixes rows of several shards"
    both = next(iter(store.loader(SITES, batch_size=5, seed=1)))
    assert set(both) == set(SITES) and both["L0.mlp_post"].shape == (5, 64)
    plain = torch.cat(list(store.dataset("L1.resid_post", batch_size=9, shuffle=False)))
    assert torch.equal(plain, ordered)


def _row_index(rows: torch.Tensor, row: torch.Tensor) -> int:
    return int(((rows - row).abs().sum(1) == 0).nonzero()[0])


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    order = sorted(range(rows.shape[0]), key=lambda i: rows[i].tolist())
    return rows[order]


def test_memory_budget_sets_the_shard_size(tmp_path: Path) -> None:
    model = tiny_model("llama")
    window_bytes = CONTEXT * (64 + 32) * 4
    store = collect(model, SITES, window_ids(), tmp_path, batch_size=BATCH, max_bytes=BUDGET)
    assert store.manifest["shard_windows"] == BATCH and store.manifest["max_bytes"] == BUDGET
    shard_bytes = max(len(b) for b in store_files(tmp_path).values())
    assert 2 * shard_bytes + BATCH * window_bytes <= BUDGET + 2 * 1024  # + the safetensors headers
    with pytest.raises(PathlensError, match="max_bytes=10000 is too small"):
        collect(model, SITES, window_ids(), tmp_path / "small", batch_size=BATCH, max_bytes=10_000)


def test_bad_inputs(tmp_path: Path) -> None:
    model = tiny_model("llama")
    ids = window_ids()
    with pytest.raises(PathlensError, match="layer of site L5.mlp_post is 5, out of range"):
        collect(model, ["L5.mlp_post"], ids, tmp_path)
    with pytest.raises(PathlensError, match="has no MLP"):
        collect(tiny_model("attn_only"), ["L0.mlp_post"], ids, tmp_path)
    with pytest.raises(PathlensError, match="at least one site"):
        collect(model, [], ids, tmp_path)
    with pytest.raises(PathlensError, match="listed twice"):
        collect(model, ["L0.mlp_post", "L0.mlp_post"], ids, tmp_path)
    with pytest.raises(PathlensError, match="no fixed width"):
        collect(model, ["L0.pattern"], ids, tmp_path)
    with pytest.raises(PathlensError, match="batch_size=0"):
        collect(model, SITES, ids, tmp_path, batch_size=0)
    with pytest.raises(PathlensError, match="dtype='int8'"):
        collect(model, SITES, ids, tmp_path, dtype="int8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PathlensError, match="is a file"):
        collect(model, SITES, ids, tmp_path / "file")
    with pytest.raises(PathlensError, match="integer tensor"):
        collect(model, SITES, torch.zeros(2, 4), tmp_path)
    with pytest.raises(PathlensError, match="no tokenizer"):
        collect(model, SITES, "default", tmp_path)
    assert not (tmp_path / "manifest.json").exists()
