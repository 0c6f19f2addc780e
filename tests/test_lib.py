"""LIB: the basis whitens (C⁺ G C⁺ᵀ = I on its kept directions) and diagonalizes the interaction matrix, M′ equals
a hand-built Jacobian sum, PCA is the covariance's eigenbasis, and the ablation curve's ends equal hand runs."""

from __future__ import annotations

import pytest
import torch

from pathlens.diagnostics.lib import LIB, _gram, _interaction, lib, next_token_loss
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.sites import Site
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", weight_scale=2.0)
    ids = token_batch(n=4, p=8)
    before = snapshot(model)
    result = lib(model, ids)
    assert_untouched(model, before)
    cache = model.run(ids, cache=["L0.resid_pre", "L1.resid_pre", "L1.resid_post"]).cache
    return model, ids, result, cache


def test_the_basis_whitens_and_inverts(setup) -> None:
    model, ids, result, cache = setup
    for site, basis in result.bases["lib"].items():
        f = cache[site].double().reshape(-1, 32)
        gram = f.T @ f / f.shape[0]
        k = basis.inverse.shape[0]
        torch.testing.assert_close(
            basis.inverse @ gram @ basis.inverse.T, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(basis.inverse @ basis.basis, torch.eye(k, dtype=torch.float64), atol=1e-8, rtol=0)
        assert bool((basis.importance[:-1] >= basis.importance[1:]).all())


def _hand_interaction(model, ids, site: str, target: str | None, scaled: torch.Tensor) -> torch.Tensor:
    """Σ_x Σ_{t', t} J_{t't}ᵀ SᵀS J_{t't} / tokens from full Jacobians, one prompt at a time."""
    m = torch.zeros(32, 32, dtype=torch.float64)
    for row in range(ids.shape[0]):
        one = ids[row : row + 1]
        base = model.run(one, cache=site).cache[site].double()

        def forward(x: torch.Tensor, one: torch.Tensor = one) -> torch.Tensor:
            run = model.run(
                one,
                interventions=[Intervention(site, Replace(x.float()))],
                cache=[] if target is None else [target],
                grad=True,
            )
            out = run.logits if target is None else run.cache[target]
            return out.double()[0] @ scaled.T  # (p, k_out)

        jac = torch.autograd.functional.jacobian(forward, base)[:, :, 0]  # (p_out, k_out, p_in, d)
        m += torch.einsum("okpd,okpe->de", jac, jac)
    return m / ids.numel()


def test_interaction_matrix_equals_hand_jacobians(setup) -> None:
    model, ids, _, cache = setup
    small = ids[:2, :5]
    logits = model.run(small).logits.double().reshape(-1, 64)
    u, d = _gram(logits, 1e-5)
    scaled = (u / d.sqrt()).T
    got = _interaction(
        model,
        Site("resid_post", 1),
        None,
        scaled,
        small,
        torch.ones_like(small),
        model.run(small, cache="L1.resid_post").cache["L1.resid_post"],
        chunk=7,
    )
    torch.testing.assert_close(
        got, _hand_interaction(model, small, "L1.resid_post", None, scaled), atol=1e-6, rtol=1e-5
    )
    scaled = torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = _interaction(
        model,
        Site("resid_pre", 1),
        Site("resid_post", 1),
        scaled,
        small,
        torch.ones_like(small),
        model.run(small, cache="L1.resid_pre").cache["L1.resid_pre"],
    )
    torch.testing.assert_close(
        got, _hand_interaction(model, small, "L1.resid_pre", "L1.resid_post", scaled), atol=1e-6, rtol=1e-5
    )


def test_lib_diagonalizes_the_interaction(setup) -> None:
    model, ids, result, cache = setup
    final = result.bases["lib"]["L1.resid_post"]
    pre = result.bases["lib"]["L1.resid_pre"]
    scaled = final.importance.sqrt()[:, None] * final.inverse
    m_prime = _interaction(
        model, Site("resid_pre", 1), Site("resid_post", 1), scaled, ids, torch.ones_like(ids), cache["L1.resid_pre"]
    )
    inner = pre.basis.T @ m_prime @ pre.basis  # Cᵀ M′ C = Λ
    torch.testing.assert_close(inner, torch.diag(pre.importance), atol=1e-6 * float(pre.importance.max()), rtol=0)


def test_pca_and_ablation_ends(setup) -> None:
    model, ids, result, cache = setup
    mask = torch.ones_like(ids)
    base = float(next_token_loss(model.run(ids).logits, ids, mask))
    for site in ("L0.resid_pre", "L1.resid_post"):
        f = cache[site].double().reshape(-1, 32)
        mean = f.mean(0)
        cov = (f - mean).T @ (f - mean) / f.shape[0]
        pca = result.bases["pca"][site]
        torch.testing.assert_close(pca.importance, torch.linalg.eigvalsh(cov).flip(0), atol=1e-8, rtol=1e-6)
        assert result.ablation.sel(basis="pca", site=site, ablated=0).values.abs().item() < 1e-5
        hand = model.run(ids, interventions=[Intervention(site, Replace(mean.float().expand(4, 8, 32)))]).logits
        expected = float(next_token_loss(hand, ids, mask)) - base
        assert result.ablation.sel(basis="pca", site=site, ablated=32).values.item() == pytest.approx(
            expected, abs=1e-5
        )


def test_table_save_plot_and_bad_sites(setup, tmp_path) -> None:
    model, ids, result, _ = setup
    table = result.table()
    assert list(table.columns) == ["site", "kept_directions", "ablatable_lib", "ablatable_pca"]
    result.save(tmp_path / "lib")
    assert (tmp_path / "lib" / "lib" / "L0.resid_pre" / "inverse.safetensors").is_file()
    result.plot(tmp_path / "lib.png")
    assert (tmp_path / "lib.png").stat().st_size > 1000
    assert isinstance(result, LIB)
    with pytest.raises(PathlensError, match="not a LIB layer"):
        lib(model, ids, sites=["L0.mlp_out"])


def test_cli_lib_writes_table_and_bases(tmp_path) -> None:
    from typer.testing import CliRunner

    from pathlens.cli import app

    result = CliRunner().invoke(
        app, ["lib", "--model", "induction-2l", "--n", "2", "--length", "3", "--out", str(tmp_path)], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert "L1.resid_pre" in result.output
    assert (tmp_path / "lib_table.csv").read_text().startswith("site,kept_directions,ablatable_lib,ablatable_pca")
    assert (tmp_path / "lib" / "ablation.safetensors").is_file() and (tmp_path / "lib.png").is_file()
