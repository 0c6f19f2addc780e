"""Interventions held during training: hooks exist only while `train` runs (also when it raises), a clamped head's
pattern is exactly the clamp at every step and its query/key weights get no gradient, and `train` equals the
documented loop written by hand."""

from __future__ import annotations

import copy

import pytest
import torch

from pathlens.diagnostics.training import (
    Training,
    plot_runs,
    previous_token_pattern,
    train,
    uniform_pattern,
)
from pathlens.errors import PathlensError
from pathlens.interventions import Ablate, Intervention, Replace
from tests.helpers import VOCAB, tiny_model

P = 9


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(1, VOCAB, (4, P), generator=gen)
    return ids, ids.clone()


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def _optimizer(model, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.hf.parameters(), lr=lr, weight_decay=0.0)


def test_hooks_only_during_training_and_clamp_exact_at_every_step() -> None:
    model = tiny_model("attn_only")
    clamp = Intervention("L0.H1.pattern", Replace(previous_token_pattern(P)))
    q_before = model.hf.model.layers[0].self_attn.q_proj.weight.detach().clone()
    k_before = model.hf.model.layers[0].self_attn.k_proj.weight.detach().clone()
    attn, training = model.hf.config._attn_implementation, model.hf.training
    seen: list[bool] = []
    hooked: list[int] = []

    def on_step(step, session, loss) -> None:
        seen.append(torch.equal(session.cache["L0.H1.pattern"], previous_token_pattern(P).expand(4, -1, -1)))
        hooked.append(_hooks(model))

    result = train(model, _batch, _optimizer(model), 6, interventions=[clamp], cache=["L0.H1.pattern"], on_step=on_step)
    assert seen == [True] * 6
    assert min(hooked) > 0 and _hooks(model) == 0
    assert model.hf.config._attn_implementation == attn and model.hf.training == training
    d_head = model.arch.d_head
    rows = slice(d_head, 2 * d_head)  # head 1's query/key rows: a constant pattern gives them no gradient
    q_after = model.hf.model.layers[0].self_attn.q_proj.weight.detach()
    k_after = model.hf.model.layers[0].self_attn.k_proj.weight.detach()
    assert torch.equal(q_after[rows], q_before[rows]) and torch.equal(k_after[rows], k_before[rows])
    assert not torch.equal(q_after[:d_head], q_before[:d_head])  # head 0 trains
    assert result.loss.values.shape == (6,) and bool(torch.isfinite(result.loss.values).all())


def test_no_hooks_after_an_exception() -> None:
    model = tiny_model("attn_only")
    model.hf.train()

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step == 3:
            raise RuntimeError("data failed")
        return _batch(step)

    with pytest.raises(RuntimeError, match="data failed"):
        train(model, batches, _optimizer(model), 5, interventions=[Intervention("L1.H0.z", Ablate("zero"))])
    assert _hooks(model) == 0 and model.hf.training  # the mode it had before
    model.hf.eval()


def test_train_equals_the_documented_loop_by_hand() -> None:
    model = tiny_model("attn_only")
    twin = copy.deepcopy(model)
    interventions = [
        Intervention("L0.H0.pattern", Replace(uniform_pattern(P))),
        Intervention("L1.H1.z", Ablate("zero")),
    ]

    def schedule(step: int) -> float:
        return 1e-2 / (step + 1)

    result = train(model, _batch, _optimizer(model), 4, interventions=interventions, learning_rate=schedule)
    optimizer = _optimizer(twin)
    losses = []
    twin.hf.train()
    with twin.session(interventions=interventions):
        for step in range(4):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            ids, labels = _batch(step)
            loss = twin.hf(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    twin.hf.eval()
    assert result.loss.values.tolist() == losses
    for (name, a), b in zip(model.hf.named_parameters(), twin.hf.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoints_save_load_and_plot(tmp_path) -> None:
    model = tiny_model("attn_only")
    calls: list[int] = []

    def evaluate(m, step: int) -> dict[str, float]:
        calls.append(step)
        assert _hooks(m) == 0 and not m.hf.training  # evaluated outside the session, in eval mode
        return {"step_squared": float(step * step)}

    result = train(model, _batch, _optimizer(model), 5, evaluate=evaluate, every=2)
    assert calls == [0, 2, 4, 5]
    assert result.checkpoints.coords["checkpoint"] == [0, 2, 4, 5]
    assert result.checkpoints.values[:, 0].tolist() == [0.0, 4.0, 16.0, 25.0]
    result.save(tmp_path / "run")
    again = Training.load(tmp_path / "run")
    assert torch.equal(again.loss.values, result.loss.values)
    plot_runs({"a": result, "b": again}, "step_squared", tmp_path / "runs.png", smooth=2)
    assert (tmp_path / "runs.png").stat().st_size > 1000


def test_bad_inputs_are_named() -> None:
    model = tiny_model("attn_only")
    with pytest.raises(PathlensError, match="steps=0"):
        train(model, _batch, _optimizer(model), 0)
    with pytest.raises(PathlensError, match="every=0"):
        train(model, _batch, _optimizer(model), 2, every=0)
    with pytest.raises(PathlensError, match="ran out at step 1"):
        train(model, [_batch(0)], _optimizer(model), 2)
    assert _hooks(model) == 0
