"""LinEAS: the optimisation reaches the exact transport optimum, the proximal step zeroes what the penalty dominates,
and training leaves the model exactly as it was.

References: on a 1-D Gaussian toy (source μ1 + σ1·g, target μ2 + σ2·g at the same standard-normal quantiles g) the
optimal map is ω = σ2/σ1, b = μ2 − ωμ1 with loss 0 (tol 1e-3 on ω and b, 1e-6 on the loss); ω = −σ2/σ1 is a mirror
optimum of symmetric distributions, which a start at the identity does not reach when the source's mean is small
against its spread (as here). On a tiny model with one
site (read after its own map, so the pooled source is ω⊙x + b exactly) the optimum is the sorted least-squares
line — Linear-AcT's closed form (tol 2e-3 relative). The prox step against a hand computation (exact zeros, 1e-7
elsewhere).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.steering.learned import lineas
from pathlens.steering.learned.activations import pooled
from pathlens.steering.learned.linear_act import fit_units
from pathlens.steering.learned.lineas import Params, prox_sparse_group, train_maps
from pathlens.steering.learned.ot import matched_quantiles
from tests.helpers import assert_untouched, snapshot, token_batch
from tests.test_linear_act import NEGATIVE, POSITIVE, tiny_with_words


def _gaussian(n: int, mu: Tensor, sigma: Tensor) -> Tensor:
    g = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n) + 0.5) / n)  # (n,) standard-normal quantiles
    return mu + sigma * g[:, None]  # (n, d)


def test_loss_reaches_the_exact_transport_optimum_between_gaussians() -> None:
    mu1, s1 = torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.3])
    mu2, s2 = torch.tensor([-1.0, 1.5]), torch.tensor([2.5, 0.6])
    x = _gaussian(64, mu1, s1)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]  # unsorted
    y = _gaussian(64, mu2, s2)

    def source(params: Params, step: int) -> dict[str, Tensor]:
        d, b = params["toy"]
        return {"toy": (1 + d) * x + b}

    params, losses = train_maps(source, {"toy": y}, steps=600, lr=0.05)
    d, b = params["toy"]
    omega = s2 / s1
    torch.testing.assert_close(1 + d, omega, atol=1e-3, rtol=0)
    torch.testing.assert_close(b, mu2 - omega * mu1, atol=1e-3, rtol=0)
    final = float((((1 + d) * x + b).sort(0).values - y).pow(2).mean())
    assert final < 1e-6 < losses[0]


def test_prox_step_equals_the_hand_computation_with_exact_zeros() -> None:
    v = torch.tensor([0.05, -0.3, 0.2, -0.01])
    shrunk = prox_sparse_group(v, 0.1, 0.0)
    assert shrunk.tolist()[0] == 0.0 and shrunk.tolist()[3] == 0.0
    torch.testing.assert_close(shrunk, torch.tensor([0.0, -0.2, 0.1, 0.0]), atol=1e-7, rtol=0)
    norm = math.sqrt(0.2**2 + 0.1**2)
    grouped = prox_sparse_group(v, 0.1, 0.05)  # limit 0.05 * sqrt(4) = 0.1 < norm: shrink the group
    torch.testing.assert_close(grouped, shrunk * (1 - 0.1 / norm), atol=1e-7, rtol=0)
    assert grouped[0] == 0.0 and grouped[3] == 0.0
    gone = prox_sparse_group(v, 0.1, 0.2)  # limit 0.4 > norm: the whole group is exactly zero
    assert torch.equal(gone, torch.zeros(4))


def test_one_site_reaches_the_sorted_least_squares_optimum() -> None:
    model = tiny_with_words()
    site = "L1.mlp_out"
    steer = lineas(model, NEGATIVE, POSITIVE, site, steps=600, lr=0.05)
    src = pooled(model, NEGATIVE, [site])[site]
    tgt = pooled(model, POSITIVE, [site])[site]
    weight, bias, _ = fit_units(src, tgt, "linear")
    (m,) = steer.maps
    torch.testing.assert_close(m.weight.double(), weight, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(m.bias.double(), bias, atol=2e-3, rtol=2e-3)
    xs = src.double().sort(0).values
    optimum = float((weight * xs + bias - matched_quantiles(tgt.double(), xs.shape[0])).pow(2).mean())
    reached = float((m.weight * src + m.bias).sort(0).values.sub(matched_quantiles(tgt, 4)).pow(2).mean())
    assert reached <= optimum * 1.001 + 1e-9
    assert steer.meta["loss_end"] <= optimum * 1.01 + 1e-9 < steer.meta["loss_start"]


def test_penalty_that_dominates_leaves_the_exact_identity() -> None:
    model = tiny_with_words()
    steer = lineas(model, NEGATIVE, POSITIVE, ["L0.mlp_out", "L1.resid_post"], steps=20, lr=0.05, l1=1e3)
    for m in steer.maps:
        assert torch.equal(m.weight, torch.ones(32)) and torch.equal(m.bias, torch.zeros(32))
    assert steer.meta["active_units"] == 0 and steer.meta["active_sites"] == []
    ids = token_batch()
    assert torch.equal(model.run(ids, interventions=steer.interventions()).logits, model.run(ids).logits)


def test_group_penalty_selects_sites_and_counts_active_units() -> None:
    model = tiny_with_words()
    sites = ["L0.mlp_out", "L1.mlp_out"]
    dense = lineas(model, NEGATIVE, POSITIVE, sites, steps=60, lr=0.05)
    sparse = lineas(model, NEGATIVE, POSITIVE, sites, steps=60, lr=0.05, l1=0.3, group=0.05)
    assert dense.meta["active_units"] == 64
    table = sparse.active_units()
    assert sparse.meta["active_units"] == int(table["active"].sum()) < 64
    for m, row in zip(sparse.maps, table.to_dict(orient="records"), strict=True):
        assert row["active"] == int((((m.weight - 1).abs() > 1e-5) | (m.bias.abs() > 1e-5)).sum())
    zero = [m for m in sparse.maps if not bool(m.active().any())]
    assert all(torch.equal(m.weight, torch.ones(32)) for m in zero)


def test_training_is_seeded_and_leaves_the_model_untouched() -> None:
    model = tiny_with_words()
    params = dict(model.hf.named_parameters())
    params["model.embed_tokens.weight"].requires_grad_(False)  # a mixed set of flags is restored as it was
    flags = {n: p.requires_grad for n, p in params.items()}
    before = snapshot(model)
    texts = NEGATIVE + ["the book was dull", "a meal is bad"]
    a = lineas(model, texts, POSITIVE, "L0.mlp_out", steps=5, batch_size=3, seed=1)
    b = lineas(model, texts, POSITIVE, "L0.mlp_out", steps=5, batch_size=3, seed=1)
    c = lineas(model, texts, POSITIVE, "L0.mlp_out", steps=5, batch_size=3, seed=2)
    assert torch.equal(a.maps[0].weight, b.maps[0].weight) and torch.equal(a.maps[0].bias, b.maps[0].bias)
    assert not torch.equal(a.maps[0].weight, c.maps[0].weight)
    assert_untouched(model, before)
    assert {n: p.requires_grad for n, p in model.hf.named_parameters()} == flags
    assert all(p.grad is None for p in model.hf.parameters())


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
def test_model_untouched_after_training_raised(raised: type[BaseException], monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_with_words()
    flags = {n: p.requires_grad for n, p in model.hf.named_parameters()}
    before = snapshot(model)
    calls = []

    def failing(source: Tensor, matched: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise raised()
        return (source.sort(dim=0).values - matched).pow(2).mean()

    module = importlib.import_module("pathlens.steering.learned.lineas")  # the package's `lineas` is the function
    monkeypatch.setattr(module, "wasserstein2", failing)
    with pytest.raises(raised):
        lineas(model, NEGATIVE, POSITIVE, ["L0.mlp_out", "L1.mlp_out"], steps=10)
    assert_untouched(model, before)
    assert {n: p.requires_grad for n, p in model.hf.named_parameters()} == flags
    assert all(p.grad is None for p in model.hf.parameters())


def test_bad_inputs_name_what_is_wrong() -> None:
    model = tiny_with_words()
    with pytest.raises(PathlensError, match="the source set has 0 text"):
        lineas(model, [], POSITIVE, "L0.mlp_out")
    with pytest.raises(PathlensError, match="steps must be a positive integer, got 0"):
        lineas(model, NEGATIVE, POSITIVE, "L0.mlp_out", steps=0)
    with pytest.raises(PathlensError, match="lr must be positive"):
        lineas(model, NEGATIVE, POSITIVE, "L0.mlp_out", lr=0.0)
    with pytest.raises(PathlensError, match="l1 must be a finite number"):
        lineas(model, NEGATIVE, POSITIVE, "L0.mlp_out", l1=math.nan)
    with pytest.raises(PathlensError, match="group must be non-negative"):
        lineas(model, NEGATIVE, POSITIVE, "L0.mlp_out", group=-1.0)
    with pytest.raises(PathlensError, match="name a site twice"):
        lineas(model, NEGATIVE, POSITIVE, ["L0.mlp_out", "L0.mlp_out"])
    with pytest.raises(PathlensError, match="strength must be a finite number"):
        lineas(model, NEGATIVE, POSITIVE, "L0.mlp_out", steps=1, strength=math.inf)
    with pytest.raises(PathlensError, match="layer"):
        lineas(model, NEGATIVE, POSITIVE, "L7.mlp_out")
