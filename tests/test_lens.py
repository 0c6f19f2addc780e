"""Logit lens and commitment layer: the last layer's lens is the model's logits; every layer's lens equals a hand
computation of the final norm (LayerNorm, RMSNorm, Gemma's (1 + w) RMSNorm) and unembedding; commitment layers
follow from their curves, and the patching curve equals hand-made hybrid runs."""

from __future__ import annotations

import pytest
import torch

from pathlens.diagnostics.commitment import MEASURES, Commitment, commitment, first_settled
from pathlens.diagnostics.lens import Lens, logit_lens
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.tasks.base import Task
from tests.helpers import assert_untouched, padded_task, snapshot, tiny_model, token_batch


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gemma2", "neox_parallel", "attn_only"])
def test_last_layer_lens_is_the_model_logits(family: str) -> None:
    model = tiny_model(family, weight_scale=3.0)
    ids = token_batch(n=2, p=7)
    before = snapshot(model)
    lens = logit_lens(model, ids, k=4)
    assert_untouched(model, before)
    logits = model.run(ids).logits.float()  # (b, p, V)
    probs = logits.softmax(-1)
    values, index = probs.topk(4, dim=-1)
    last = model.n_layers - 1
    torch.testing.assert_close(lens.top_prob.values[:, last], values, atol=1e-6, rtol=1e-5)
    assert torch.equal(lens.top_id.values[:, last].long(), index)
    target = ids[:, 1:]
    torch.testing.assert_close(
        lens.target_prob.values[:, last, :-1], probs[:, :-1].gather(-1, target[..., None])[..., 0], atol=1e-6, rtol=1e-5
    )


def _hand_norm(family: str, model, h: torch.Tensor) -> torch.Tensor:
    """The final norm written out from its parameters (not by calling the module)."""
    norm = model.hf.get_submodule(model.arch.final_norm)
    h = h.double()
    if family == "gpt2":  # LayerNorm: (x - mean) / sqrt(var + eps) * w + b
        centred = h - h.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double() + (
            norm.bias.double()
        )
    eps = norm.variance_epsilon if family == "llama" else norm.eps
    scaled = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if family == "llama":  # RMSNorm: w * x / rms(x)
        return scaled * norm.weight.double()
    return scaled * (1.0 + norm.weight.double())  # Gemma: (1 + w) * x / rms(x)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_lens_equals_hand_computation_for_each_norm_kind(family: str) -> None:
    model = tiny_model(family, weight_scale=3.0)
    ids = token_batch(n=2, p=6)
    targets = torch.tensor([5, 9])
    lens = logit_lens(model, ids, targets=targets, k=3)
    cache = model.run(ids, cache=["L0.resid_post", "L1.resid_post"]).cache
    w_u = model.hf.get_submodule(model.arch.unembed).weight.double()
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    for layer in (0, 1):
        logits = _hand_norm(family, model, cache[f"L{layer}.resid_post"]) @ w_u.T  # (b, p, V)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probs = logits.softmax(-1)
        values, index = probs.topk(3, dim=-1)
        torch.testing.assert_close(lens.top_prob.values[:, layer].double(), values, atol=1e-5, rtol=1e-4)
        assert torch.equal(lens.top_id.values[:, layer].long(), index)
        picked = logits.gather(-1, targets[:, None, None].expand(-1, 6, 1))  # (b, p, 1)
        rank = 1 + (logits > picked).sum(-1)
        assert torch.equal(lens.target_rank.values[:, layer].long(), rank)
        expected = probs.gather(-1, targets[:, None, None].expand(-1, 6, 1))[..., 0]
        torch.testing.assert_close(lens.target_prob.values[:, layer].double(), expected, atol=1e-5, rtol=1e-4)


def test_targets_padding_table_save_and_plot(tmp_path) -> None:
    model = tiny_model("llama", weight_scale=3.0)
    task = padded_task()
    lens = logit_lens(model, task.clean_ids, attention_mask=task.attention_mask, k=2)
    lengths = task.attention_mask.sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert torch.isnan(lens.target_rank.values[row, :, n - 1 :]).all()  # the last real token has no next token
        assert not torch.isnan(lens.target_rank.values[row, :, : n - 1]).any()
        assert len(lens.meta["tokens"][row]) == n
    table = lens.table(prompt=1, pos=-2)
    assert list(table.columns) == ["layer", "top1", "p1", "top2", "p2", "target_rank", "target_prob"]
    assert table["target_rank"].tolist() == lens.target_rank.values[1, :, int(lengths[1]) - 2].tolist()
    lens.save(tmp_path / "lens")
    again = Lens.load(tmp_path / "lens")
    assert torch.equal(again.top_id.values, lens.top_id.values) and again.meta == lens.meta
    lens.plot(tmp_path / "lens.png", prompt=1)
    assert (tmp_path / "lens.png").stat().st_size > 1000


def test_bad_inputs_are_named() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=2, p=5)
    with pytest.raises(PathlensError, match="k=0"):
        logit_lens(model, ids, k=0)
    with pytest.raises(PathlensError, match="layers: 7"):
        logit_lens(model, ids, layers=[7])
    with pytest.raises(PathlensError, match="targets has shape"):
        logit_lens(model, ids, targets=torch.tensor([1, 2, 3]))
    with pytest.raises(PathlensError, match="right-padded"):
        logit_lens(model, ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(PathlensError, match="threshold"):
        commitment(model, padded_task(), threshold=1.5)


def test_first_settled() -> None:
    cond = torch.tensor(
        [[False, True, False, True, True], [True, True, True, True, True], [True, True, True, True, False]]
    )
    assert first_settled(cond).tolist()[:2] == [3.0, 0.0]
    assert torch.isnan(first_settled(cond)[2])


def _token_task(model) -> Task:
    clean, corrupt = token_batch(n=3, p=7, seed=3), token_batch(n=3, p=7, seed=4)
    return Task(
        "tokens",
        clean,
        corrupt,
        torch.tensor([3, 4, 5]),
        torch.tensor([7, 8, 9]),
        torch.full((3,), 6),
        torch.ones_like(clean),
    )


@pytest.mark.parametrize("run", ["clean", "corrupt"])
def test_commitment_curves_and_layers_match_hand_runs(run: str) -> None:
    model = tiny_model("llama", weight_scale=4.0)
    task = _token_task(model)
    before = snapshot(model)
    result = commitment(model, task, run=run, threshold=0.5)
    assert_untouched(model, before)
    own, other = (task.clean_ids, task.corrupt_ids) if run == "clean" else (task.corrupt_ids, task.clean_ids)
    rows = torch.arange(task.n)
    sites = [f"L{layer}.resid_post" for layer in range(model.n_layers)]
    own_cache = model.run(own, cache=sites).cache
    m_own = task.score(model.run(own).logits).double()
    m_other = task.score(model.run(other).logits).double()
    for layer, site in enumerate(sites):
        # the hybrid run by hand: the other run, its answer position's resid_post[layer] taken from this run
        hybrid = model.run(other, interventions=[Intervention(site, Replace(own_cache[site]), positions=[6])]).logits
        expected = (task.score(hybrid).double() - m_own) / (m_other - m_own)
        torch.testing.assert_close(result.restored.values[:, layer], expected, atol=1e-4, rtol=1e-4)
        logits = model.unembed(own_cache[site][rows, task.answer_pos]).double()
        diff = logits[rows, task.answer_ids] - logits[rows, task.wrong_ids]
        torch.testing.assert_close(result.lens_logit_diff.values[:, layer], diff, atol=1e-5, rtol=1e-5)
    restored, diff = result.restored.values, result.lens_logit_diff.values
    for i in range(task.n):
        settled = [layer for layer in range(model.n_layers) if all(restored[i, k] < 0.5 for k in range(layer, 2))]
        prefers = [
            layer
            for layer in range(model.n_layers)
            if all(torch.sign(diff[i, k]) == torch.sign(diff[i, -1]) for k in range(layer, 2))
        ]
        values = dict(zip(MEASURES, result.per_prompt.values[i].tolist(), strict=True))
        assert values["patch_settled"] == (settled[0] if settled else pytest.approx(float("nan"), nan_ok=True))
        assert values["lens_prefers"] == (prefers[0] if prefers else pytest.approx(float("nan"), nan_ok=True))
        if settled and prefers:
            assert values["commitment"] == max(settled[0], prefers[0])
    assert set(result.summary()["measure"]) == set(MEASURES)


def test_commitment_save_load_plot(tmp_path) -> None:
    model = tiny_model("gpt2", weight_scale=4.0)
    result = commitment(model, _token_task(model))
    result.save(tmp_path / "c")
    again = Commitment.load(tmp_path / "c")
    assert torch.allclose(again.restored.values, result.restored.values, atol=0, rtol=0, equal_nan=True)
    result.plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_lens_on_prompts(tmp_path) -> None:
    from typer.testing import CliRunner

    from pathlens.cli import app

    result = CliRunner().invoke(
        app, ["lens", "--prompt", "The capital of France is", "--k", "3", "--out", str(tmp_path)], terminal_width=200
    )
    assert result.exit_code == 0, result.output
    assert Lens.load(tmp_path / "lens").top_id.shape[1] == 30
    assert (tmp_path / "lens.png").is_file()
    assert (tmp_path / "lens_last_position.csv").read_text().startswith("layer,top1,p1,top2,p2,top3,p3")
