"""EigenShift (pathlens.steering.learned.eigenshift): output-layer steering through the SVD of the unembedding.

References: torch.linalg.svd of the unembedding (singular values to 1e-8 relative, vectors up to sign); the
mean-difference and AUROC scores against a hand computation (projections on the SVD's vectors; a pairwise count
for AUROC); the edited copy's unembedding has exactly the expected singular values (rank d − k at β = 0, rank 0 with
all selected, within float32 rounding); the copy's logits equal the run-time op's within 1e-5 on several families
(tied and untied unembeddings, a final soft-cap); no component selected gives bit-identical logits; the model is
bit-identical after every apply, including one that raised; save/load gives back bit-identical tensors and fields,
and the loaded shift generates bit-identical tokens and logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from pathlens import Model
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, ScaleSubspace
from pathlens.steering import Steerer
from pathlens.steering.generate import generate
from pathlens.steering.learned.eigenshift import (
    EigenShift,
    _auroc,
    components,
    eigenshift,
    final_hidden,
    unembedding_site,
    unembedding_svd,
)
from tests.helpers import assert_untouched, snapshot, tiny_model

FAMILIES = ["gpt2", "llama", "gemma2", "neox_sequential", "qwen3"]


def _texts(seed: int, n: int = 6, p: int = 8) -> Tensor:
    return torch.randint(1, 64, (n, p), generator=torch.Generator().manual_seed(seed))


def _unembedding(model: Model) -> Tensor:
    return model.hf.get_submodule(model.arch.unembed).weight.detach()


def _shift(model: Model, k: int, beta: float) -> EigenShift:
    return eigenshift(model, _texts(1), _texts(2), k=k, beta=beta)


def test_svd_matches_torch_svd() -> None:
    model = tiny_model("llama")
    sigma, vt = unembedding_svd(model)
    _, s_ref, vh_ref = torch.linalg.svd(_unembedding(model).double(), full_matrices=False)
    torch.testing.assert_close(sigma, s_ref, rtol=1e-8, atol=0)
    torch.testing.assert_close((vt * vh_ref).sum(1).abs(), torch.ones_like(sigma), rtol=0, atol=1e-8)


def test_scores_equal_a_hand_computation() -> None:
    model = tiny_model("llama")
    concept, other = _texts(1), _texts(2, n=4)
    _, _, vh = torch.linalg.svd(_unembedding(model).double(), full_matrices=False)
    site = unembedding_site(model)
    hc = model.run(concept, cache=site).cache[site].reshape(-1, 32).double() @ vh.T  # (n·p, d), up to sign
    ho = model.run(other, cache=site).cache[site].reshape(-1, 32).double() @ vh.T
    scored = components(model, concept, other, "mean-diff")
    signs = torch.sign((scored.vt * vh).sum(1))  # our vectors vs the reference's: ±1 each
    torch.testing.assert_close(scored.scores, signs * (hc.mean(0) - ho.mean(0)), rtol=0, atol=1e-9)
    assert scored.meta["n_concept_states"] == 48 and scored.meta["n_other_states"] == 32
    auroc = components(model, concept, other, "auroc").scores
    a, b = hc * signs, ho * signs
    pairwise = (a[:, None, :] > b[None, :, :]).double().mean((0, 1)) + 0.5 * (a[:, None] == b[None]).double().mean(
        (0, 1)
    )
    torch.testing.assert_close(auroc, pairwise, rtol=0, atol=1e-12)
    ties = _auroc(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [0.0]]))
    assert float(ties) == pytest.approx((1 * 0.5 + 1 + 1 + 1) / 4)
    assert torch.equal(scored.ranked()[:3], torch.argsort(scored.scores.abs(), descending=True)[:3])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_edited_copy_equals_the_run_time_op_and_leaves_the_model_untouched(family: str) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    shift = _shift(model, k=5, beta=0.2)
    ids = _texts(3, n=3, p=7)
    copy = shift.edited(model)
    assert_untouched(model, before)
    with shift.applied(model):
        live = model.hf(input_ids=ids).logits
    assert_untouched(model, before)
    edited = copy.run(ids).logits
    base = model.run(ids).logits
    torch.testing.assert_close(edited, live, atol=1e-5, rtol=0)
    assert (edited - base).abs().max() > 1e-3  # the edit does something
    unembed, embed = copy.hf.get_submodule(model.arch.unembed), copy.hf.get_submodule(model.arch.embed)
    assert unembed.weight is not embed.weight or family in ("llama", "neox_sequential", "qwen3")
    assert torch.equal(embed.weight, model.hf.get_submodule(model.arch.embed).weight)


def test_generation_with_the_op_equals_generation_from_the_copy() -> None:
    model = tiny_model("llama")
    shift = _shift(model, k=8, beta=0.0)
    ids = _texts(4, n=3, p=6)
    steered = generate(model, ids, shift, max_new_tokens=5, logits=True)
    copied = generate(shift.edited(model), ids, max_new_tokens=5, logits=True)
    assert torch.equal(steered.ids, copied.ids)
    assert steered.logits is not None and copied.logits is not None
    torch.testing.assert_close(steered.logits, copied.logits, atol=1e-5, rtol=0)


def test_no_component_selected_gives_identical_logits() -> None:
    model = tiny_model("gpt2")
    shift = _shift(model, k=0, beta=0.0)
    ids = _texts(5, n=2, p=6)
    base = model.run(ids).logits
    assert shift.interventions() == []
    with shift.applied(model):
        live = model.hf(input_ids=ids).logits
    assert torch.equal(live, base)
    assert torch.equal(shift.edited(model).run(ids).logits, base)


@pytest.mark.parametrize("k", [1, 7, 32])
def test_beta_zero_removes_exactly_the_selected_singular_values(k: int) -> None:
    """W′ = UΣ′Vᵀ: the k selected singular values become 0, the others stay; rank d − k (0 with all selected)."""
    model = tiny_model("llama")
    shift = _shift(model, k=k, beta=0.0)
    w_new = _unembedding(shift.edited(model)).double()
    sigma, _ = unembedding_svd(model)
    expected = sigma.clone()
    expected[list(shift.components)] = 0.0
    got = torch.linalg.svdvals(w_new)
    torch.testing.assert_close(got, expected.sort(descending=True).values, atol=1e-5, rtol=1e-5)
    assert int(torch.linalg.matrix_rank(w_new, atol=1e-4)) == 32 - k
    half = _unembedding(shift.with_beta(0.5).edited(model)).double()
    expected[list(shift.components)] = 0.5 * sigma[list(shift.components)]
    torch.testing.assert_close(torch.linalg.svdvals(half), expected.sort(descending=True).values, atol=1e-5, rtol=1e-5)


class _Stop(BaseException):
    pass


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt, _Stop])
def test_the_model_is_untouched_after_an_apply_that_raised(raised: type[BaseException]) -> None:
    model = tiny_model("gemma2")
    before = snapshot(model)
    shift = _shift(model, k=4, beta=0.0)
    with pytest.raises(raised):
        with shift.applied(model):
            model.hf(input_ids=_texts(6, n=2, p=5))
            raise raised()
    assert_untouched(model, before)


def test_scale_subspace_op_is_checked() -> None:
    with pytest.raises(PathlensError, match="orthonormal"):
        ScaleSubspace(torch.ones(4, 2), 0.5)
    with pytest.raises(PathlensError, match=r"\(d, k\) float tensor"):
        ScaleSubspace(torch.ones(4), 0.5)
    model = tiny_model("llama")
    wrong = Intervention("L0.resid_post", ScaleSubspace(torch.eye(8)[:, :2], 0.0))
    with pytest.raises(PathlensError, match=r"give a \(32, k\) basis"):
        model.run(_texts(1, n=1), interventions=[wrong])


def test_bad_inputs_are_named() -> None:
    model = tiny_model("llama")
    scored = components(model, _texts(1), _texts(2))
    with pytest.raises(PathlensError, match=r"k must be an integer in 0..32"):
        scored.select(33)
    with pytest.raises(PathlensError, match="unknown score 'median'"):
        components(model, _texts(1), _texts(2), "median")  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match="non-empty list of texts"):
        final_hidden(model, [])
    with pytest.raises(PathlensError, match="beta must be a finite number"):
        scored.select(2, beta=float("nan"))
    narrow = EigenShift(torch.eye(16)[:, :2], 0.0, (0, 1), unembedding_site(model))
    with pytest.raises(PathlensError, match="directions have 16 entries"):
        narrow.edited(model)


def test_save_and_load_round_trip_bit_identically_and_steer_the_same(tmp_path: Path) -> None:
    """Every tensor and field comes back bit-identical; the loaded shift generates the same tokens and logits."""
    model = tiny_model("llama")
    shift = eigenshift(model, _texts(1), _texts(2), k=5, beta=0.25, how="auroc")
    shift.save(tmp_path / "shift")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shift.json", "shift.safetensors"]
    loaded = EigenShift.load(tmp_path / "shift.safetensors")
    assert shift.sigma is not None and shift.scores is not None and loaded.sigma is not None
    assert loaded.scores is not None
    assert torch.equal(loaded.basis, shift.basis) and loaded.basis.dtype == shift.basis.dtype == torch.float64
    assert isinstance(loaded, Steerer)  # usable as steer= of pathlens.generate
    assert torch.equal(loaded.sigma, shift.sigma) and torch.equal(loaded.scores, shift.scores)
    assert (loaded.beta, loaded.components, loaded.site) == (shift.beta, shift.components, shift.site)
    assert loaded.meta == shift.meta and loaded.meta["how"] == "auroc" and loaded.meta["model"] == model.name
    scored = components(model, _texts(1), _texts(2), "auroc")
    assert torch.equal(loaded.sigma, scored.sigma[list(shift.components)])  # what was selected, with its σ and score
    assert torch.equal(loaded.scores, scored.scores[list(shift.components)])
    ids = _texts(4, n=3, p=6)
    before = generate(model, ids, shift, max_new_tokens=4, logits=True)
    after = generate(model, ids, loaded, max_new_tokens=4, logits=True)
    assert torch.equal(before.ids, after.ids)
    assert before.logits is not None and after.logits is not None and torch.equal(before.logits, after.logits)
    assert torch.equal(loaded.edited(model).run(ids).logits, shift.edited(model).run(ids).logits)


def test_a_shift_built_by_hand_saves_without_sigma_and_load_checks_the_files(tmp_path: Path) -> None:
    model = tiny_model("llama")
    bare = EigenShift(torch.eye(32)[:, :2], 0.5, (0, 1), unembedding_site(model))
    bare.save(tmp_path / "bare")
    loaded = EigenShift.load(tmp_path / "bare")
    assert loaded.sigma is None and loaded.scores is None and torch.equal(loaded.basis, bare.basis)
    with pytest.raises(PathlensError, match="does not exist"):
        EigenShift.load(tmp_path / "missing")
    (tmp_path / "other.json").write_text('{"format": "pathlens.SteeringVector"}')
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(PathlensError, match="was not written by EigenShift.save"):
        EigenShift.load(tmp_path / "other")
    with pytest.raises(PathlensError, match="2 component indices for 3 basis columns"):
        EigenShift(torch.eye(32)[:, :3], 0.5, (0, 1), unembedding_site(model))
    with pytest.raises(PathlensError, match=r"sigma must be a \(2,\) tensor"):
        EigenShift(torch.eye(32)[:, :2], 0.5, (0, 1), unembedding_site(model), sigma=torch.ones(3))


def test_copy_equals_op_and_the_study_runs_on_smollm2(smollm2: Model, tmp_path: Path) -> None:
    """The real model (tied 49152×576 unembedding): the copy's logits equal the run-time op's within 1e-4."""
    from pathlens.steering.learned.study_controller import learned_study

    before = snapshot(smollm2)
    ids, mask = smollm2.tokenize(["The library opens at nine.", "A stone bridge connects the town."])
    shift = eigenshift(smollm2, ["It was terrible and awful."], ["It was wonderful and lovely."], k=16, beta=0.0)
    with shift.applied(smollm2):
        live = smollm2.hf(input_ids=ids, attention_mask=mask).logits
    copied = shift.edited(smollm2).run(ids, attention_mask=mask).logits
    torch.testing.assert_close(copied[mask.bool()], live[mask.bool()], atol=1e-4, rtol=0)
    assert_untouched(smollm2, before)
    record = learned_study(smollm2, "sentiment", "eigenshift", tmp_path, scales=[0.0], n_prompts=1, max_new_tokens=3)
    assert [row["scale"] for row in record["rows"]] == [1.0, 0.0]
    assert record["rows"][1]["ppl_increase"] != 0.0
    assert_untouched(smollm2, before)
