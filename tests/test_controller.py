"""The weighted steering controller (pathlens.steering.learned.controller) and the ops it rides on (Tap, AddDynamic).

References: a controller with constant output equals fixed per-layer vectors added at the last position (tokens
identical, logits within 1e-5); a trained controller's lagged and prompt-only generation equal a hand-written
greedy loop — no key/value cache, plain forward hooks adding each row's gain at each position's own step, the
controller's MLP written out by hand — within 1e-4 on the logits and token for token. Training leaves the model
bit-identical with no .grad on its parameters and is reproducible from its seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from pathlens import Model
from pathlens.errors import PathlensError
from pathlens.interventions import AddDynamic, Intervention, Tap
from pathlens.steering.generate import generate
from pathlens.steering.learned.controller import Controller, WeightedSteering, train_controller
from pathlens.steering.vector import SteeringVector
from tests.helpers import assert_untouched, snapshot, tiny_model

NEW = 5
SITES = ["L0.resid_post", "L1.resid_post"]


def _prompts() -> tuple[Tensor, Tensor]:
    """Three left-padded prompts of lengths 6, 4 and 5 (pad id 0)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 2), (2, 1)):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def _direction(model: Model, size: float = 3.0) -> SteeringVector:
    gen = torch.Generator().manual_seed(11)
    return SteeringVector({s: size * torch.randn(model.arch.d_model, generator=gen) for s in SITES})


def _trained(model: Model, **kwargs: Any) -> WeightedSteering:
    """A controller trained to tell prompts of low token ids (steer) from prompts of high ones (keep)."""
    gen = torch.Generator().manual_seed(5)
    steer, keep = torch.randint(1, 32, (12, 7), generator=gen), torch.randint(32, 64, (12, 7), generator=gen)
    settings = {"read_layers": 2, "hidden": 16, "epochs": 4, "lr": 1e-3, **kwargs}
    return train_controller(model, steer, keep, _direction(model), **settings)


def test_tap_sees_the_value_and_add_dynamic_adds_each_rows_gain() -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    base = model.run(ids, cache="L1.resid_post").cache["L1.resid_post"]
    seen: list[Tensor] = []
    vec = torch.randn(32, generator=torch.Generator().manual_seed(1))
    gain = torch.tensor([0.5, -2.0])
    run = model.run(
        ids,
        cache="L1.resid_post",
        interventions=[
            Intervention("L1.resid_post", Tap(lambda x, sel: seen.append(x.clone())), positions="last"),
            Intervention("L1.resid_post", AddDynamic(vec, lambda: gain), positions="last"),
        ],
    )
    assert torch.equal(seen[0][:, 0], base[:, -1])
    expected = base.clone()
    expected[:, -1] += gain[:, None] * vec
    torch.testing.assert_close(run.cache["L1.resid_post"], expected, atol=1e-6, rtol=0)
    bad = Intervention("L1.resid_post", AddDynamic(vec, lambda: torch.ones(3)))
    with pytest.raises(PathlensError, match=r"gain returned shape \(3,\)"):
        model.run(ids, interventions=[bad])
    with pytest.raises(PathlensError, match="NaN"):
        nan = Intervention("L1.resid_post", AddDynamic(vec, lambda: torch.tensor(float("nan"))))
        model.run(ids, interventions=[nan])


def test_a_constant_controller_equals_fixed_vectors_at_the_last_position() -> None:
    """Hand case: zero output weights and a fixed output bias give s and w for every input, so the gains are
    g(s)·σ(w_ℓ)·α whatever the controller reads, and the steering is those multiples of d_ℓ at the last position."""
    model = tiny_model("llama")
    direction = _direction(model)
    ctrl = Controller(2 * 32, 2, hidden=8)
    with torch.no_grad():
        ctrl.out.weight.zero_()
        ctrl.out.bias.copy_(torch.tensor([1.5, 0.3, -1.0]))
    ids, mask = _prompts()
    for gate, g in (("raw", 1.5), ("sigmoid", float(torch.sigmoid(torch.tensor(1.5))))):
        steering = WeightedSteering(ctrl, direction, tuple(SITES), alpha=2.0, gate=gate)  # type: ignore[arg-type]
        weights = torch.sigmoid(torch.tensor([0.3, -1.0]))
        fixed = SteeringVector(
            {s: g * float(weights[i]) * 2.0 * direction.vectors[s] for i, s in enumerate(SITES)}, positions="last"
        )
        got = generate(model, ids, steering, attention_mask=mask, max_new_tokens=NEW, logits=True)
        want = generate(model, ids, fixed, attention_mask=mask, max_new_tokens=NEW, logits=True)
        assert torch.equal(got.ids, want.ids)
        assert got.logits is not None and want.logits is not None
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        unsteered = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, logits=True).logits
        assert unsteered is not None and (got.logits - unsteered).abs().max() > 1e-2  # the steering did something


def _hand_gains(steering: WeightedSteering, late: Tensor) -> Tensor:
    """The controller written out: standardize, Linear, ReLU, Linear; gains = g(s)·σ(w)·α (B, L)."""
    c = steering.controller
    z = (late - c.shift) / c.scale
    hidden = torch.clamp(z @ c.hidden.weight.T + c.hidden.bias, min=0)
    out = hidden @ c.out.weight.T + c.out.bias
    s = out[:, 0] if steering.gate == "raw" else torch.sigmoid(out[:, 0])
    return s[:, None] * torch.sigmoid(out[:, 1:]) * steering.alpha


def _hand_generate(model: Model, steering: WeightedSteering, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy decoding without a key/value cache: every step reruns the whole sequence, adding at each position
    (from the last prompt token on) the gains of the step that position was first processed in; the gains of the
    next step come from the late blocks' outputs at the last column (primed by an unsteered prompt pass)."""
    blocks = model.hf.model.layers  # type: ignore[union-attr]
    n_read = len(steering.read_sites)
    first_read = model.n_layers - n_read
    per_column: dict[int, Tensor] = {}
    recorded: dict[int, Tensor] = {}

    def hook(layer: int) -> Any:
        def fn(module: nn.Module, args: Any, output: Any) -> Any:
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            for col, gains in per_column.items():
                hidden[:, col] += gains[:, layer : layer + 1] * steering.direction.vectors[SITES[layer]]
            recorded[layer] = hidden[:, -1]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return fn

    def forward(seq: Tensor, seq_mask: Tensor) -> Tensor:
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
        return model.hf(input_ids=seq, attention_mask=seq_mask, position_ids=positions).logits[:, -1]

    handles = [blocks[i].register_forward_hook(hook(i)) for i in range(model.n_layers)]
    try:
        with torch.no_grad():
            forward(ids, mask)  # unsteered priming pass: per_column is empty
            gains = _hand_gains(steering, torch.cat([recorded[first_read + j] for j in range(n_read)], -1))
            seq, seq_mask, tokens, logits = ids, mask, [], []
            for _ in range(NEW):
                per_column[seq.shape[1] - 1] = gains
                step = forward(seq, seq_mask)
                logits.append(step)
                if steering.update == "step":
                    gains = _hand_gains(steering, torch.cat([recorded[first_read + j] for j in range(n_read)], -1))
                nxt = step.argmax(-1)
                if tokens:  # as the model's own generate: a row that produced the end token (id 0) gets padding (0)
                    nxt = torch.where(torch.stack(tokens, 1).eq(0).any(1), 0, nxt)
                tokens.append(nxt)
                seq = torch.cat([seq, nxt[:, None]], 1)
                seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], 1)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize(("gate", "update"), [("raw", "step"), ("sigmoid", "step"), ("raw", "prompt")])
def test_generation_equals_a_hand_written_lagged_loop(gate: str, update: str) -> None:
    model = tiny_model("llama")
    steering = _trained(model).with_(gate=gate, update=update, alpha=3.0)
    with torch.no_grad():  # a controller whose output varies strongly with its input
        steering.controller.out.weight.mul_(40.0)
    ids, mask = _prompts()
    want_ids, want_logits = _hand_generate(model, steering, ids, mask)
    got = generate(model, ids, steering, attention_mask=mask, max_new_tokens=NEW, logits=True)
    assert got.logits is not None
    torch.testing.assert_close(got.logits, want_logits, atol=1e-4, rtol=0)
    assert torch.equal(got.ids, want_ids)
    unsteered = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, logits=True).logits
    assert unsteered is not None and (got.logits[:, 0] - unsteered[:, 0]).abs().max() > 0.1  # it steers


def test_training_leaves_the_model_bit_identical_and_is_seeded() -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    rng = torch.get_rng_state()
    first = _trained(model, seed=4)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_untouched(model, before)
    assert all(p.grad is None for p in model.hf.parameters())
    second = _trained(model, seed=4)
    again = second.controller.state_dict()
    for name, value in first.controller.state_dict().items():
        assert torch.equal(value, again[name]), name
    other = _trained(model, seed=5)
    assert not torch.equal(first.controller.out.weight, other.controller.out.weight)
    losses = first.meta["losses"]
    assert first.meta["best_loss"] == min(losses) and losses[-1] < losses[0]
    ids, mask = _prompts()
    generate(model, ids, first, attention_mask=mask, max_new_tokens=3)
    assert_untouched(model, before)


class _Stop(BaseException):
    pass


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt, _Stop])
def test_the_model_is_untouched_when_generation_raises(raised: type[BaseException]) -> None:
    model = tiny_model("llama")
    steering = _trained(model)
    before = snapshot(model)
    calls = {"n": 0}
    original = steering.gains

    def failing(late: Tensor) -> Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise raised()
        return original(late)

    steering.gains = failing  # type: ignore[method-assign]
    ids, mask = _prompts()
    with pytest.raises(raised):
        generate(model, ids, steering, attention_mask=mask, max_new_tokens=NEW)
    assert calls["n"] == 3
    assert_untouched(model, before)


def test_save_and_load_generate_the_same_tokens(tmp_path: Path) -> None:
    model = tiny_model("llama")
    steering = _trained(model, gate="sigmoid")
    steering.save(tmp_path / "ctrl")
    loaded = WeightedSteering.load(tmp_path / "ctrl.safetensors")
    assert loaded.gate == "sigmoid" and loaded.read_sites == steering.read_sites and loaded.sites == SITES
    ids, mask = _prompts()
    a = generate(model, ids, steering, attention_mask=mask, max_new_tokens=NEW, logits=True)
    b = generate(model, ids, loaded, attention_mask=mask, max_new_tokens=NEW, logits=True)
    assert torch.equal(a.ids, b.ids)
    assert a.logits is not None and b.logits is not None and torch.equal(a.logits, b.logits)


def test_bad_inputs_are_named() -> None:
    model = tiny_model("llama")
    ids = torch.randint(1, 64, (4, 5))
    direction = _direction(model)
    with pytest.raises(PathlensError, match="read_layers is 4 but"):
        train_controller(model, ids, ids, direction)
    with pytest.raises(PathlensError, match="direction must be a SteeringVector"):
        train_controller(model, ids, ids, torch.ones(32), read_layers=2)  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match="keep is empty"):
        train_controller(model, ids, [], direction, read_layers=2)
    with pytest.raises(PathlensError, match="epochs must be a positive integer"):
        train_controller(model, ids, ids, direction, read_layers=2, epochs=0)
    with pytest.raises(PathlensError, match="lr must be a positive number"):
        train_controller(model, ids, ids, direction, read_layers=2, lr=-1.0)
    wide = SteeringVector({"L0.resid_post": torch.ones(33)})
    with pytest.raises(PathlensError, match="33 entries"):
        train_controller(model, ids, ids, wide, read_layers=2)
    steering = _trained(model)
    with pytest.raises(PathlensError, match="gate 'soft'"):
        steering.with_(gate="soft")
    with pytest.raises(PathlensError, match="update 'never'"):
        steering.with_(update="never")
    with pytest.raises(PathlensError, match="2 layer weights but the direction has 1 sites"):
        WeightedSteering(steering.controller, SteeringVector({"L0.resid_post": torch.ones(32)}), steering.read_sites)
    with pytest.raises(PathlensError, match="alpha must be a finite number"):
        steering.with_(alpha=float("inf"))


def test_the_learned_study_writes_a_record_on_smollm2(smollm2: Model, tmp_path: Path) -> None:
    """`pathlens steer --method controller` on the real model, at its smallest: rows per α, generations, the
    trained controller saved; KL 0 at the unsteered row, finite elsewhere."""
    from pathlens.steering.learned.study_controller import learned_study

    before = snapshot(smollm2)
    record = learned_study(smollm2, "sentiment", "controller", tmp_path, scales=[0.04], n_prompts=2, max_new_tokens=3)
    assert [row["scale"] for row in record["rows"]] == [0.0, 0.04]
    assert record["rows"][0]["kl"] == 0.0 and record["rows"][1]["kl"] > 0.0
    assert (tmp_path / "steer.json").is_file() and (tmp_path / "controller.safetensors").is_file()
    assert WeightedSteering.load(tmp_path / "controller").sites == [f"L{i}.resid_post" for i in range(30)]
    assert_untouched(smollm2, before)
