"""Subspace patching, the Subspace type, DAS and the counterfactual data it trains on.

References: the full patch (Replace) and the unpatched run for the two limiting bases; the paper's 1-D formula
w' = w + ((⟨u,v⟩ − ⟨w,v⟩)/‖v‖²)·v written out by hand; a planted direction in a hand-built model (DAS must find it,
cos ≥ 0.99); the model's parameters compared bit for bit before and after training.
"""

from __future__ import annotations

import re

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.subspace import Subspace, das, gradient_direction, mean_difference, probe_direction, random_direction
from pathlens.subspace.reads import answer_values
from pathlens.tasks import Task, counterfactual_task, ioi
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch
from tests.subspace_models import planted_model, planted_task


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", weight_scale=3.0)


def _runs(model, site: str, interventions: list[Intervention]) -> torch.Tensor:
    return model.run(token_batch(3, 7), interventions=interventions).logits


@pytest.mark.parametrize("site", ["L0.resid_post", "L1.mlp_post", "L0.H1.z"])
def test_full_basis_equals_full_patch(llama, site: str) -> None:
    """B spanning the whole space (any orthonormal d×d basis) patches exactly like Replace (atol 1e-5)."""
    source = llama.run(token_batch(3, 7, seed=5), cache=[site]).cache[site]
    d = source.shape[-1]
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0))).Q
    sub = Subspace(basis, site, "all")
    patched = _runs(llama, site, [sub.intervention(source)])
    full = _runs(llama, site, [Intervention(site, Replace(source))])
    clean = _runs(llama, site, [])
    assert (full - clean).abs().max() > 1e-2  # the patch does something
    torch.testing.assert_close(patched, full, atol=1e-5, rtol=1e-5)


def test_direction_orthogonal_to_difference_is_a_no_op(llama) -> None:
    """v ⟂ (h_src − h) at every patched cell: the subspace patch changes nothing (atol 1e-5)."""
    site = "L0.resid_post"
    ids = token_batch(1, 7)
    h = llama.run(ids, cache=[site]).cache[site]
    source = llama.run(token_batch(1, 7, seed=5), cache=[site]).cache[site]
    delta = (source - h)[0, -1]  # (d,) at the last position
    v = torch.randn(delta.shape[0], generator=torch.Generator().manual_seed(1))
    v = v - (v @ delta) / (delta @ delta) * delta  # v ⟂ delta
    sub = Subspace.from_direction(v, site, "last")
    patched = llama.run(ids, interventions=[sub.intervention(source)]).logits
    torch.testing.assert_close(patched, llama.run(ids).logits, atol=1e-5, rtol=1e-5)


def test_one_d_formula_equals_basis_form(llama) -> None:
    """The paper's 1-D formula with an unnormalised v, applied by hand in a hook-free reference (the patched value
    fed back through Replace), equals the k = 1 basis form (atol 1e-5)."""
    site = "L1.mlp_post"
    ids = token_batch(3, 7)
    w = llama.run(ids, cache=[site]).cache[site]
    u = llama.run(token_batch(3, 7, seed=5), cache=[site]).cache[site]
    v = 3.7 * torch.randn(w.shape[-1], generator=torch.Generator().manual_seed(2))
    by_hand = w + (((u @ v) - (w @ v)) / (v @ v))[..., None] * v  # (b, p, d)
    reference = llama.run(ids, interventions=[Intervention(site, Replace(by_hand))]).logits
    sub = Subspace.from_direction(v, site, "all")
    assert sub.meta["norm"] == pytest.approx(float(v.norm()), rel=1e-6)
    torch.testing.assert_close(
        llama.run(ids, interventions=[sub.intervention(u)]).logits, reference, atol=1e-5, rtol=1e-5
    )


def test_save_load_round_trip(tmp_path) -> None:
    basis = torch.linalg.qr(torch.randn(6, 2)).Q
    sub = Subspace(basis, "L3.mlp_post", "last", {"finder": "user"})
    sub.save(tmp_path / "s")
    back = Subspace.load(tmp_path / "s")
    assert torch.equal(back.basis, basis) and back.site == sub.site and back.positions == "last"
    assert back.meta == {"finder": "user"}


def test_bad_subspaces(llama) -> None:
    with pytest.raises(PathlensError, match="not orthonormal"):
        Subspace(torch.ones(4, 2), "L0.resid_post")
    with pytest.raises(PathlensError, match="non-zero"):
        Subspace.from_direction(torch.zeros(4), "L0.resid_post")
    wrong = Subspace.from_direction(torch.ones(5), "L0.resid_post")
    with pytest.raises(PathlensError, match="width d=5.*32 dims"):
        wrong.check_fits(llama)
    with pytest.raises(PathlensError, match="basis has shape"):
        llama.run(token_batch(1, 5), interventions=[wrong.intervention(torch.zeros(1, 5, 32))])
    fixed = Subspace.from_basis(torch.ones(4, 1) + torch.eye(4)[:, :1], "L0.resid_post", orthonormalize=True)
    assert fixed.k == 1


# ---- finders --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    model, u = planted_model()
    return model, u, planted_task(model, u, n=200)


def test_das_recovers_a_planted_direction_reproducibly(planted) -> None:
    """DAS in a model that reads its MLP hidden state only along a random unit u finds ±u (cos ≥ 0.99); the same
    seed gives the same basis bit for bit; the model keeps its parameters, gains no hook and no .grad."""
    model, u, task = planted
    before = snapshot(model)
    first = das(model, task, "L0.mlp_post", epochs=10, lr=0.05, seed=3)
    assert abs(float(first.direction @ u)) >= 0.99
    assert_untouched(model, before)
    assert all(p.grad is None for p in model.hf.parameters())
    again = das(model, task, "L0.mlp_post", epochs=10, lr=0.05, seed=3)
    assert torch.equal(first.basis, again.basis)
    other = das(model, task, "L0.mlp_post", epochs=1, lr=0.05, seed=4)
    assert not torch.equal(first.basis, other.basis)
    assert first.meta["finder"] == "das" and len(first.meta["loss_per_epoch"]) == 10


def test_das_chunking_does_not_change_the_step(planted) -> None:
    """A batch split into chunks by the token budget sums to the unchunked gradient (atol 1e-6)."""
    from pathlens.subspace.das import DASSettings, DASTrainer

    model, _, task = planted
    whole = DASTrainer(model, task, "L0.mlp_post", DASSettings(seed=1))
    chunked = DASTrainer(model, task, "L0.mlp_post", DASSettings(seed=1, max_batch_tokens=6))
    rows = torch.arange(20)
    loss_a, grad_a = whole.loss_and_grad(rows)
    loss_b, grad_b = chunked.loss_and_grad(rows)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=1e-5)


def test_das_refuses_a_task_without_labels(llama) -> None:
    task = Task.from_ids(token_batch(2, 5), token_batch(2, 5, seed=3), [1, 2], [3, 4])
    with pytest.raises(PathlensError, match="no counterfactual labels.*corrupt='position'"):
        das(llama, task, "L0.mlp_post", epochs=1)


def test_simple_finders_match_hand_computation(planted) -> None:
    """mean-diff = difference of the group means; gradient = mean of signed autograd gradients computed by hand;
    probe separates the groups; random is seeded and unit."""
    model, u, task = planted
    groups = torch.arange(task.n) % 3 == 0
    h = answer_values(model, task, "L0.mlp_post").double()
    expected = h[groups].mean(0) - h[~groups].mean(0)
    got = mean_difference(model, task, "L0.mlp_post", groups)
    torch.testing.assert_close(got.direction.double(), expected / expected.norm(), atol=1e-6, rtol=1e-6)

    ids = task.clean_ids
    run = model.run(ids, cache=["L0.mlp_post"], grad=True)
    sign = groups.double() * 2 - 1
    (grad,) = torch.autograd.grad((task.score(run.logits) * sign).sum(), run.cache["L0.mlp_post"])
    by_hand = grad[:, -1].double().mean(0)
    torch.testing.assert_close(
        gradient_direction(model, task, "L0.mlp_post", groups).direction.double(),
        by_hand / by_hand.norm(),
        atol=1e-6,
        rtol=1e-6,
    )
    side = (h @ u.double()) > 0
    probe = probe_direction(model, task, "L0.mlp_post", side)
    assert probe.meta["train_accuracy"] == 1.0
    assert float(probe.direction @ u) > 0.5
    r = random_direction(6, "L0.mlp_post", seed=2)
    assert torch.equal(r.basis, random_direction(6, "L0.mlp_post", seed=2).basis)


# ---- counterfactual data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer():
    from pathlens import load

    return load("smollm2").tokenizer


def _s1_first(text: str) -> bool:
    """Whether the subject (the name that occurs twice) is the first of the two names joined by "and"."""
    words = re.findall(r"[A-Za-z]+", text)
    first, second = (words[i] for i in (words.index("and") - 1, words.index("and") + 1))
    assert words.count(first) + words.count(second) == 3
    return words.count(first) == 2


def test_ioi_position_pairs_follow_the_paper_rule(smol_tokenizer) -> None:
    """Label = base IO when base and source have S1 at the same position, else base S (checked from the texts)."""
    task = ioi(smol_tokenizer, n=40, seed=2, corrupt="position")
    assert task.counterfactual_ids is not None
    flipped = 0
    for i in range(task.n):
        base, source = task.prompts[i], task.corrupt_prompts[i]  # type: ignore[index]
        io = smol_tokenizer.decode([int(task.answer_ids[i])]).strip()
        s = smol_tokenizer.decode([int(task.wrong_ids[i])]).strip()
        same_position = _s1_first(base) == _s1_first(source)
        label = smol_tokenizer.decode([int(task.counterfactual_ids[i])]).strip()
        assert label == (io if same_position else s)
        flipped += not same_position
        assert task.clean_ids.shape == task.corrupt_ids.shape
    assert 5 < flipped < 35


def test_ioi_split_is_disjoint(smol_tokenizer) -> None:
    train = ioi(smol_tokenizer, n=30, corrupt="position", split="train")
    test = ioi(smol_tokenizer, n=30, seed=1, corrupt="position", split="test", flip=1.0)
    a, b = train.meta["split"], test.meta["split"]
    assert not set(a["templates"]) & set(b["templates"])
    assert not set(a["names"]) & set(b["names"])
    assert not set(a["places"]) & set(b["places"])
    names_train = {smol_tokenizer.decode([int(t)]).strip() for t in train.answer_ids}
    assert names_train <= set(a["names"])
    assert test.counterfactual_ids is not None and torch.equal(test.counterfactual_ids, test.wrong_ids)
    with pytest.raises(PathlensError, match="unknown split"):
        ioi(smol_tokenizer, n=2, split="validation")


def test_counterfactual_task_from_ids_and_rows() -> None:
    task = counterfactual_task([[1, 2], [1, 3]], [[1, 3], [1, 2]], [7, 8], [5, 6], [7, 8])
    assert task.counterfactual_ids.tolist() == [7, 8]  # type: ignore[union-attr]
    assert task.rows([1]).counterfactual_ids.tolist() == [8]  # type: ignore[union-attr]
    with pytest.raises(PathlensError, match="one counterfactual label per pair"):
        counterfactual_task([[1, 2]], [[1, 3]], [7, 8], [5], [7])
    with pytest.raises(PathlensError, match="counterfactual_ids must be"):
        Task.from_ids([[1, 2]], [[1, 3]], [5], [7]).__class__(
            "x",
            torch.ones(1, 2).long(),
            torch.ones(1, 2).long(),
            torch.tensor([1]),
            torch.tensor([2]),
            torch.tensor([1]),
            torch.ones(1, 2).long(),
            counterfactual_ids=torch.tensor([1.5]),
        )


# ---- patch(..., subspace=) --------------------------------------------------------------------------------


@pytest.mark.parametrize(("sites", "positions"), [("resid_pre", "each"), ("heads", "all"), ("mlp_out", [2, 5])])
def test_patch_sweep_with_a_subspace_equals_a_naive_loop(sites: str, positions) -> None:
    """patch(subspace=B) in the causal-cone engine equals one model.run per cell with the subspace intervention,
    and the whole-model path (cone=False) agrees (atol 1e-5)."""
    from pathlens import patch
    from tests.helpers import padded_task

    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task(3, 9)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(0))).Q
    fast = patch(model, task, sites=sites, positions=positions, subspace=basis, progress=False)
    slow = patch(model, task, sites=sites, positions=positions, subspace=basis, progress=False, cone=False)
    torch.testing.assert_close(fast.values, slow.values, atol=1e-5, rtol=1e-5)
    layer_dim = fast.coords["layer"]
    kind = {"resid_pre": "resid_pre", "heads": "head", "mlp_out": "mlp_out"}[sites]
    cache = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=[f"L{x}.{kind}" for x in (0, 1)])
    for li, layer in enumerate(layer_dim):
        source = cache.cache[f"L{layer}.{kind}"]
        cells = [(h, source[:, :, h]) for h in range(4)] if kind == "head" else [(None, source)]
        for h, src in cells:
            site = f"L{layer}.H{h}" if h is not None else f"L{layer}.{kind}"
            pos_list = [None] if positions == "all" else (range(9) if positions == "each" else positions)
            for pi, p in enumerate(pos_list):
                sub = Subspace(basis, site, "all" if p is None else [p])
                run = model.run(
                    task.clean_ids, attention_mask=task.attention_mask, interventions=[sub.intervention(src)]
                )
                expected = float(task.score(run.logits).mean())
                index = (li,) + ((h,) if h is not None else ()) + ((pi,) if p is not None else ())
                assert float(fast.values[index]) == pytest.approx(expected, abs=1e-5)


def test_patch_with_a_whole_space_subspace_equals_patching() -> None:
    from pathlens import patch
    from tests.helpers import padded_task

    model = tiny_model("gpt2", weight_scale=3.0)
    task = padded_task(3, 9)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1))).Q
    full = patch(model, task, sites="resid_post", positions="each", progress=False)
    sub = patch(model, task, sites="resid_post", positions="each", subspace=basis, progress=False)
    torch.testing.assert_close(sub.values, full.values, atol=1e-4, rtol=1e-4)
    with pytest.raises(PathlensError, match="not orthonormal|orthonormal"):
        patch(model, task, sites="resid_post", subspace=torch.ones(32, 2), progress=False)
    with pytest.raises(PathlensError, match="neither ablation"):
        patch(model, task, sites="resid_post", subspace=basis, ablation="zero", progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox_sequential", "gemma3"])
def test_cached_prefix_step_equals_the_full_forward_step(family: str) -> None:
    """A DAS step on the last tokens after a key/value cache of the earlier ones (right-padded rows of different
    lengths) gives the loss and gradient of the full-forward step (atol 1e-6); a model whose cache the runner
    cannot rebuild (Gemma 3's sliding-window layers) falls back to full forwards."""
    import dataclasses

    from pathlens.subspace.das import DASSettings, DASTrainer
    from tests.helpers import padded_task

    model = tiny_model(family, weight_scale=3.0)
    task = padded_task(3, 9)
    task = dataclasses.replace(task, counterfactual_ids=task.wrong_ids)
    before = snapshot(model)
    cached = DASTrainer(model, task, "L1.mlp_post", DASSettings(seed=1))
    full = DASTrainer(model, task, "L1.mlp_post", DASSettings(seed=1, cached_prefix=False))
    assert (cached.runner is not None) == (family != "gemma3")
    loss_a, grad_a = cached.loss_and_grad(torch.arange(3))
    loss_b, grad_b = full.loss_and_grad(torch.arange(3))
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=1e-4)
    assert_untouched(model, before)
