"""Semi-NMF (pathlens.features.snmf): the batched loop equals a naive full-matrix loop, the objective never rises
without WTA, planted factors are recovered, features read their contexts and promoted tokens right, steering,
save/load, bad input; the `pathlens store` and `pathlens features snmf` commands on SmolLM2.

References: `naive_snmf` below (METHODS §20 step by step on whole matrices, with an explicit inverse); planted
(F, G); the model's own modules for promoted tokens; `Add` on the site by hand for steering."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from pathlens.errors import PathlensError
from pathlens.features.corpus import Windows
from pathlens.features.snmf import SNMFResult, snmf
from pathlens.features.store import collect
from pathlens.interventions import Add, Intervention
from pathlens.steering.vector import SteeringVector
from tests.helpers import VOCAB, assert_untouched, snapshot, tiny_model


def naive_snmf(A: torch.Tensor, G: torch.Tensor, sparsity: float, iters: int) -> tuple[list[float], list[Any]]:
    """METHODS §20 on whole matrices: A (d, n), G (n, k) the starting codes. Returns the losses and (F, G) after
    every iteration."""
    d = A.shape[0]
    k = G.shape[1]
    keep = max(1, math.ceil(sparsity * d))
    losses, states = [], []
    for _ in range(iters):
        F = A @ G @ torch.linalg.inv(G.T @ G + 1e-6 * torch.eye(k, dtype=A.dtype))
        threshold = F.abs().topk(keep, dim=0).values[-1]
        F = F * (F.abs() >= threshold)
        norms = G.norm(dim=0).clamp_min(1e-8)
        G, F = G / norms, F * norms
        P, Q = A.T @ F, F.T @ F
        pos, neg = (lambda X: (X.abs() + X) / 2), (lambda X: (X.abs() - X) / 2)
        G = G * torch.sqrt((pos(P) + G @ neg(Q)) / (neg(P) + G @ pos(Q) + 1e-6))
        losses.append(float(((A - F @ G.T) ** 2).sum()))
        states.append((F, G))
    return losses, states


def planted(n: int = 2000, d: int = 64, k: int = 5, nonzeros: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Rows X = G Fᵀ: F (d, k) mixed sign with `nonzeros` entries per column; G ≥ 0, every row uses one feature
    (weight 0.5..1.5) and 30% of rows a second one."""
    g = torch.Generator().manual_seed(seed)
    F = torch.zeros(d, k, dtype=torch.float64)
    for j in range(k):
        F[torch.randperm(d, generator=g)[:nonzeros], j] = torch.randn(nonzeros, generator=g, dtype=torch.float64)
    G = torch.zeros(n, k, dtype=torch.float64)
    rows = torch.arange(n)
    G[rows, torch.randint(0, k, (n,), generator=g)] = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    second = torch.rand(n, generator=g) < 0.3
    extra = torch.randint(0, k, (n,), generator=g)
    G[rows[second], extra[second]] += torch.rand(int(second.sum()), generator=g, dtype=torch.float64)
    return G @ F.T, F, G


def matched_cosines(found: torch.Tensor, true: torch.Tensor) -> list[float]:
    """Cosines of the best one-to-one matching of found columns to true columns (all permutations)."""
    cos = torch.nn.functional.normalize(found, dim=0).T @ torch.nn.functional.normalize(true, dim=0)
    k = cos.shape[0]
    best = max(itertools.permutations(range(k)), key=lambda p: sum(float(cos[i, p[i]]) for i in range(k)))
    return [float(cos[i, best[i]]) for i in range(k)]


@pytest.mark.parametrize("sparsity", [1.0, 0.2])
def test_batched_loop_equals_the_naive_loop(sparsity: float) -> None:
    X, _, _ = planted(n=300, d=20, k=4, nonzeros=6)
    G0 = torch.rand(300, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1e-6
    expected, states = naive_snmf(X.T, G0.clone(), sparsity, iters=25)
    result = snmf(
        X, 4, sparsity=sparsity, init=G0, max_iter=25, patience=25, tol=0.0, chunk_rows=37, dtype=torch.float64
    )
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(expected), rtol=1e-8, atol=1e-8)
    best = min(range(25), key=lambda i: expected[i])  # first minimum: improvements must beat the best by > tol
    F, G = states[best]
    torch.testing.assert_close(result.F, F, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(result.G, G, rtol=1e-8, atol=1e-9)
    assert result.meta["best_iteration"] == best


@pytest.mark.parametrize("init", ["random", "svd", "knn"])
def test_objective_never_rises_without_winner_take_all(init: str) -> None:
    X, _, _ = planted(n=600, d=24, k=4, nonzeros=24)
    result = snmf(X, 4, sparsity=1.0, init=init, max_iter=150, patience=150, tol=0.0, dtype=torch.float64)
    losses = torch.tensor(result.losses)
    assert bool((losses[1:] <= losses[:-1] * (1 + 1e-9)).all()), "the loss rose"
    assert losses[-1] < losses[0]
    assert bool((result.G >= 0).all())


def test_recovers_planted_factors() -> None:
    """The lowest-loss factorization of a few starts recovers the planted features (cosine ≥ 0.95 each); F keeps
    the WTA share of entries per column and G stays non-negative."""
    X, F_true, _ = planted()
    runs = [
        snmf(X, 5, sparsity=8 / 64, init=init, seed=seed, max_iter=500, dtype=torch.float64)
        for init, seed in (("random", 0), ("random", 1), ("knn", 0), ("svd", 0))
    ]
    best = min(runs, key=lambda r: r.meta["best_loss"])
    assert min(matched_cosines(best.F, F_true)) >= 0.95
    assert best.meta["fraction_variance_unexplained"] < 1e-3
    assert bool((best.G >= 0).all()) and int((best.F != 0).sum(0).max()) <= 8


def _store(tmp_path: Path, family: str = "gpt2") -> tuple[Any, Any]:
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (24, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    store = collect(model, ["L1.mlp_post", "L1.resid_post"], Windows.of_ids(ids, bos=True), tmp_path, batch_size=4)
    return model, store


def test_store_source_in_memory_and_streamed_agree(tmp_path: Path) -> None:
    _, store = _store(tmp_path)
    rows = store.rows("L1.mlp_post")
    common = {"sparsity": 0.25, "max_iter": 20, "seed": 2}
    direct = snmf(rows, 6, **common)
    in_memory = snmf(store, 6, site="L1.mlp_post", **common)
    streamed = snmf(store, 6, site="L1.mlp_post", max_bytes=1000, chunk_rows=50, **common)
    assert direct.losses == in_memory.losses
    torch.testing.assert_close(streamed.F, in_memory.F, rtol=1e-4, atol=1e-5)  # other chunking, other float sums
    assert in_memory.meta["site"] == "L1.mlp_post" and in_memory.meta["model"] == "tiny-gpt2"
    assert snmf(store, 3, site="L1.mlp_post", rows=100, max_iter=3).G.shape == (100, 3)


def test_contexts_and_promoted_tokens(tmp_path: Path) -> None:
    model, store = _store(tmp_path)
    before = snapshot(model)
    result = snmf(store, 4, site="L1.mlp_post", sparsity=0.5, max_iter=30)
    contexts = result.top_contexts(store, 2, top=5)
    ids = store.window_ids()
    windows_seen = [c.window for c in contexts]
    assert len(set(windows_seen)) == len(windows_seen) == 5, "one context per window"
    values = [c.activation for c in contexts]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(float(result.G[:, 2].max()))
    for c in contexts:
        assert c.token == f"t{int(ids[c.window, c.position])} " and c.position >= 1  # position 0 left out of the store
    # promoted tokens by hand: z through GPT-2's c_proj (Conv1D: x @ W, no bias), ln_f, lm_head
    z = result.F[:, 1]
    hf = model.hf
    with torch.no_grad():
        direction = z @ hf.transformer.h[1].mlp.c_proj.weight  # (d_model,)
        logits = hf.lm_head(hf.transformer.ln_f(direction))
    expected = logits.topk(5).indices.tolist()
    promoted = result.promoted_tokens(model, 1, top=5)
    assert [int(t[1:]) for t, _ in promoted] == expected
    assert [v for _, v in promoted] == pytest.approx(logits.topk(5).values.tolist(), rel=1e-5)
    features = result.features(model, store, top_contexts=3, top_tokens=4)
    assert [f.index for f in features] == [0, 1, 2, 3] and len(features[0].promoted) == 4
    assert_untouched(model, before)


def test_steering_vector_adds_the_unit_feature(tmp_path: Path) -> None:
    model, store = _store(tmp_path, "llama")
    result = snmf(store, 3, site="L1.mlp_post", sparsity=0.5, max_iter=10)
    vector = result.steering_vector(0, scale=2.5)
    assert isinstance(vector, SteeringVector) and vector.sites == ["L1.mlp_post"]
    unit = result.F[:, 0] / result.F[:, 0].norm()
    torch.testing.assert_close(vector.vectors["L1.mlp_post"], unit)
    ids = store.window_ids()[:3]
    with vector.applied(model):
        steered = model.hf(ids).logits
    by_hand = model.run(ids, interventions=[Intervention("L1.mlp_post", Add(unit, 2.5))]).logits
    torch.testing.assert_close(steered.detach(), by_hand)
    assert not torch.allclose(by_hand, model.run(ids).logits)
    assert vector.meta["method"] == "snmf" and vector.meta["feature"] == 0


def test_save_load_round_trip(tmp_path: Path) -> None:
    X, _, _ = planted(n=200, d=16, k=3, nonzeros=4)
    result = snmf(X.float(), 3, sparsity=0.25, max_iter=10)
    result.save(tmp_path / "f")
    loaded = SNMFResult.load(tmp_path / "f")
    assert torch.equal(loaded.F, result.F) and torch.equal(loaded.G, result.G)
    assert loaded.losses == result.losses and loaded.site == result.site and loaded.meta == result.meta


def test_bad_inputs(tmp_path: Path) -> None:
    X, _, _ = planted(n=50, d=8, k=2, nonzeros=4)
    with pytest.raises(PathlensError, match="rank=0"):
        snmf(X, 0)
    with pytest.raises(PathlensError, match="sparsity=0"):
        snmf(X, 2, sparsity=0)
    with pytest.raises(PathlensError, match="init='pca'"):
        snmf(X, 2, init="pca")
    with pytest.raises(PathlensError, match=r"shape \(rows, rank\) = \(50, 2\)"):
        snmf(X, 2, init=torch.rand(50, 3))
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(PathlensError, match="NaN"):
        snmf(bad, 2)
    with pytest.raises(PathlensError, match="float tensor"):
        snmf(torch.ones(4, dtype=torch.long), 2)
    model, store = _store(tmp_path)
    with pytest.raises(PathlensError, match="pass site= to pick one"):
        snmf(store, 2)
    with pytest.raises(PathlensError, match="holds no site L0.mlp_post"):
        snmf(store, 2, site="L0.mlp_post")
    result = snmf(X, 2, max_iter=2)
    with pytest.raises(PathlensError, match="feature 5 is out of range"):
        result.steering_vector(5)
    with pytest.raises(PathlensError, match="residual direction"):
        SNMFResult(F=torch.ones(8, 2), G=torch.ones(3, 2), losses=[], site="L0.attn_in").residual_direction(model, 0)


def test_cli_store_then_snmf(tmp_path: Path, smollm2: Any) -> None:
    from pathlens.cli import app

    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. The dog ran to the park and back again. " * 60)
    runner = CliRunner()
    store_dir, out = tmp_path / "store", tmp_path / "snmf"
    result = runner.invoke(
        app,
        ["store", "--model", "smollm2", "--sites", "L2.mlp_post", "--tokens", "512", "--context", "32",
         "--corpus", str(text), "--out", str(store_dir)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "stored 496 rows" in result.output  # 16 windows of 32 tokens, each without its first position
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["sites"] == ["L2.mlp_post"] and manifest["model"]["name"] == "smollm2"
    result = runner.invoke(
        app,
        ["features", "snmf", "--model", "smollm2", "--store", str(store_dir), "--out", str(out), "--rank", "4",
         "--iters", "5", "--contexts", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "features.json").read_text())
    assert len(record["features"]) == 4 and len(record["features"][0]["contexts"]) == 2
    assert len(record["features"][0]["promoted"]) == 10
    assert SNMFResult.load(out / "snmf").F.shape == (1536, 4)
    bad = runner.invoke(app, ["store", "--model", "smollm2", "--sites", "L99.mlp_post", "--tokens", "64",
                              "--corpus", str(text), "--out", str(tmp_path / "x")])  # fmt: skip
    assert bad.exit_code == 1 and "L99.mlp_post" in bad.output
    usage = runner.invoke(app, ["store", "--tokens", "lots", "--out", str(tmp_path / "y")])
    assert usage.exit_code == 2 and "lots" in usage.output
