"""Sparse dictionaries (pathlens.features.sae / train): shapes, the sparsity rules of each variant, AuxK and dead
latents on hand cases, JumpReLU's straight-through threshold gradient against the formula, a bit-identical
save/load, and recovery of a planted sparse dictionary."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.features.sae import KINDS, Dictionary, DictionaryConfig, JumpReLU, Step
from pathlens.features.train import TrainConfig, Trainer, tensor_batches, train


def _dictionary(kind: str, d_in: int = 6, width: int = 10, d_out: int | None = None, **kw: float) -> Dictionary:
    return Dictionary(DictionaryConfig(kind, d_in, width, d_out=d_out, k=3, **kw), seed=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_out", [None, 4])
def test_encode_decode_shapes(kind: str, d_out: int | None) -> None:
    d = _dictionary(kind, d_out=d_out)
    x = torch.randn(2, 5, 6)
    f = d.encode(x)
    assert f.shape == (2, 5, 10)
    assert d.decode(f).shape == (2, 5, d_out or 6)
    assert d(x).shape == (2, 5, d_out or 6)
    assert bool((f >= 0).all()) or kind == "jumprelu"


def test_topk_keeps_k_per_token_and_batchtopk_k_times_batch() -> None:
    x = torch.randn(7, 6)
    f = _dictionary("topk").encode(x)
    assert bool(((f > 0).sum(-1) <= 3).all())
    z = _dictionary("topk").pre_acts(x)
    top = torch.topk(z, 3, dim=-1)
    expected = torch.zeros_like(z).scatter(-1, top.indices, torch.relu(top.values))
    assert torch.equal(f, expected)
    b = _dictionary("batchtopk")
    train_f = b.activate(b.pre_acts(x), train=True)
    assert int((train_f > 0).sum()) == 3 * 7
    kept = train_f[train_f > 0].min()
    assert bool((torch.relu(b.pre_acts(x))[train_f == 0] <= kept).all())


def test_aux_loss_hand_case() -> None:
    """Two dead latents of four; k_aux = 1: each token decodes its larger dead pre-activation (raw) against the
    residual, scaled by min(n_dead / k_aux, 1) = 1."""
    d = Dictionary(DictionaryConfig("topk", 2, 4, k=1), seed=0)
    trainer = Trainer(d, "x", config=TrainConfig(k_aux=1, dead_steps=2))
    with torch.no_grad():
        d.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]]))
    trainer.since_fired = torch.tensor([0, 5, 2, 1])  # latents 1 and 2 are dead (>= 2 steps)
    z = torch.tensor([[0.5, 3.0, -1.0, 9.0], [0.0, -2.0, 0.5, 9.0]])
    residual = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    # token 0: dead pre-acts (3.0, -1.0) → latent 1 at 3.0 → (0, 3); token 1: (-2.0, 0.5) → latent 2 at 0.5 → (.5, .5)
    expected = ((1 - 0) ** 2 + (1 - 3) ** 2 + (2 - 0.5) ** 2 + (0 - 0.5) ** 2) / 2
    assert trainer.aux_loss(z, residual).item() == pytest.approx(expected)
    trainer.config = TrainConfig(k_aux=4, dead_steps=2)  # k_aux 4 > 2 dead: both decoded, scale 2/4
    both = ((1 - (0 - 1.0)) ** 2 + (1 - (3 - 1.0)) ** 2 + (2 - (0 + 0.5)) ** 2 + (0 - (-2 + 0.5)) ** 2) / 2
    assert trainer.aux_loss(z, residual).item() == pytest.approx(0.5 * both)
    trainer.since_fired = torch.zeros(4, dtype=torch.long)
    assert trainer.aux_loss(z, residual).item() == 0.0


def test_dead_latents_are_counted_in_steps() -> None:
    """A latent whose encoder never lets it fire is dead after `dead_steps` steps; one that fires is not."""
    d = Dictionary(DictionaryConfig("relu", 2, 3, l1=0.0), seed=0)
    trainer = Trainer(d, "x", config=TrainConfig(lr=0.0, dead_steps=3))
    with torch.no_grad():
        d.W_enc.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))
        d.b_enc.copy_(torch.tensor([0.0, -100.0, 0.0]))
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    trainer._fitted = True  # keep the hand-set weights (no scale or b_dec fit)
    for step in range(3):
        assert not bool(trainer.dead.any())
        trainer.step(x)
        assert trainer.since_fired.tolist() == [0, step + 1, step + 1]
    assert trainer.dead.tolist() == [False, True, True]


def test_resample_dead_points_the_latent_at_the_worst_input() -> None:
    """Only one input is reconstructed with an error: a dead latent's decoder row becomes that error's unit
    direction, its encoder bias 0, its Adam moments 0."""
    d = Dictionary(DictionaryConfig("relu", 3, 4), seed=0)
    trainer = Trainer(d, "x", config=TrainConfig(lr=0.0, dead_steps=1))
    trainer._fitted = True
    with torch.no_grad():
        d.W_enc.copy_(torch.eye(3, 4))
        d.W_dec.copy_(torch.eye(4, 3))
        d.b_enc.fill_(0.3)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 0.0]])  # row 0 is reconstructed exactly; row 1 is not
    trainer.step(x)  # creates Adam state (lr 0: the weights stay)
    with torch.no_grad():
        d.b_enc.zero_()
        error = x[1] - d.decode_scaled(d.encode(x[1:]))[0]
    trainer.since_fired = torch.tensor([0, 0, 0, 5])
    assert trainer.resample_dead(x, x) == 1
    assert torch.allclose(d.W_dec[3] / d.W_dec[3].norm(), error / error.norm(), atol=1e-6)
    assert d.b_enc[3].item() == 0.0
    assert trainer.optimizer.state[d.W_dec]["exp_avg"][3].abs().sum().item() == 0.0
    assert trainer.since_fired[3].item() == 0


def test_jumprelu_threshold_gradient_is_straight_through() -> None:
    """Hand case, ε = 0.1: z = (0.50, 0.62, 0.38, 2.0), θ = 0.55 for all. JumpReLU's ∂/∂θ = −(θ/ε) K((z−θ)/ε) with K
    the rectangle on (−½, ½): latents 0 (u = −0.5, outside) ... computed one by one; z gets H(z − θ)."""
    eps, theta = 0.1, 0.55
    z = torch.tensor([[0.52, 0.62, 0.38, 2.0]], requires_grad=True)
    t = torch.full((4,), theta, requires_grad=True)
    out = JumpReLU.apply(z, t, eps)
    assert out.tolist() == [[0.0, pytest.approx(0.62), 0.0, 2.0]]
    out.sum().backward()
    # u = (z − θ)/ε = (−0.3, 0.7, −1.7, 14.5): only latent 0 is inside the kernel's window
    assert t.grad.tolist() == pytest.approx([-theta / eps, 0.0, 0.0, 0.0])
    assert z.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    z2 = z.detach().clone().requires_grad_()
    t2 = torch.full((4,), theta, requires_grad=True)
    count = Step.apply(z2, t2, eps)
    assert count.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    count.sum().backward()
    assert t2.grad.tolist() == pytest.approx([-1 / eps, 0.0, 0.0, 0.0])
    assert z2.grad.abs().sum().item() == 0.0


def test_jumprelu_training_moves_thresholds_through_the_l0_penalty() -> None:
    """With only the L0 term (no reconstruction gradient reaches θ here: lr on the rest is irrelevant), a latent
    whose pre-activations sit just above θ has its threshold raised."""
    d = Dictionary(DictionaryConfig("jumprelu", 2, 2, l0=1.0, threshold=0.5, bandwidth=0.2), seed=0)
    trainer = Trainer(d, "x")
    parts = trainer.losses(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    z = d.pre_acts(torch.tensor([[1.0, 0.0]]))
    grad = torch.autograd.grad(parts["sparsity"], d.log_threshold)[0]
    inside = ((z - 0.5).abs() < 0.1)[0].float()
    assert grad.tolist() == pytest.approx((-(1 / 0.2) * inside * 0.5).tolist())  # chain rule: dθ/dlogθ = θ


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("d_out", [None, 5])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, kind: str, d_out: int | None) -> None:
    d = _dictionary(kind, d_out=d_out)
    trainer = Trainer(d, "x", "y" if d_out else None)
    x = torch.randn(16, 6)
    trainer.step(x, torch.randn(16, d_out) if d_out else None)
    d.config.meta.update({"site": "L1.resid_pre"})
    d.save(tmp_path / "dict")
    back = Dictionary.load(tmp_path / "dict")
    assert back.config == d.config
    for name, value in d.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert torch.equal(back.encode(x), d.encode(x))
    assert (tmp_path / "dict.safetensors").read_bytes() == _resaved(back, tmp_path)


def _resaved(d: Dictionary, folder: Path) -> bytes:
    d.save(folder / "again")
    return (folder / "again.safetensors").read_bytes()


def test_load_rejects_mismatched_files(tmp_path: Path) -> None:
    _dictionary("topk").save(tmp_path / "a")
    _dictionary("topk", width=12).save(tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(PathlensError, match="a.safetensors|a.json"):
        Dictionary.load(tmp_path / "a")


def _planted(n: int = 24000, d: int = 32, atoms: int = 64, active: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that are sparse non-negative combinations (3 of 64 unit atoms, weights in [0.5, 1.5])."""
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, atoms).scatter(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    return coef @ dictionary, dictionary


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("topk", {"k": 3}),
        ("batchtopk", {"k": 3}),
        ("relu", {"l1": 1.0}),
        ("jumprelu", {"l0": 0.3, "threshold": 0.1, "bandwidth": 0.1}),
    ],
)
def test_recovers_a_planted_sparse_dictionary(kind: str, settings: dict[str, float]) -> None:
    """≥ 90% of the 64 planted atoms have a decoder row at cosine ≥ 0.9 (width 128, 3 epochs of 24k tokens)."""
    x, atoms = _planted()
    d = Dictionary(DictionaryConfig(kind, 32, 128, **settings), seed=0)  # type: ignore[arg-type]
    trainer = Trainer(d, "x", config=TrainConfig(lr=3e-3, dead_steps=50), seed=0)
    train([trainer], tensor_batches({"x": x}, 256, seed=0, epochs=3))
    rows = d.W_dec.detach() / d.W_dec.detach().norm(dim=1, keepdim=True)
    best = (atoms @ rows.T).max(dim=1).values  # (64,)
    assert float((best >= 0.9).float().mean()) >= 0.9


def test_several_dictionaries_train_from_one_stream() -> None:
    """An SAE and a transcoder read their own columns of the same batches; each sees every batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g)
    y = x @ torch.randn(6, 4, generator=g)
    sae = Trainer(_dictionary("topk"), "a")
    tc = Trainer(_dictionary("topk", d_out=4), "a", "b")
    logs = train([sae, tc], tensor_batches({"a": x, "b": y}, 64), log_every=1)
    assert sae.steps == tc.steps == 8 and len(logs[0]) == len(logs[1]) == 8
    assert sae.tokens == 512


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(PathlensError, match="'gated'"):
        DictionaryConfig("gated", 4, 8)  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match="k = 9 exceeds the dictionary width 8"):
        DictionaryConfig("topk", 4, 8, k=9)
    trainer = Trainer(_dictionary("topk"), "L1.resid_pre")
    with pytest.raises(PathlensError, match="widths 5/5.*d_in=6"):
        trainer.step(torch.randn(3, 5))
    with pytest.raises(PathlensError, match="reads 'missing'"):
        train([Trainer(_dictionary("topk"), "missing")], [{"present": torch.randn(4, 6)}])


def test_scales_make_the_mean_square_norm_the_width() -> None:
    d = _dictionary("topk")
    x = 7.0 * torch.randn(256, 6)
    Trainer(d, "x").fit_scales(x, x)
    assert float((x * d.s_in).pow(2).sum(-1).mean()) == pytest.approx(6.0, rel=1e-4)
    assert math.isclose(float(d.s_in), float(d.s_out))


def _twins(d_out: int | None, seed: int = 0) -> tuple[Trainer, Trainer, torch.Tensor, torch.Tensor]:
    """Two trainers of the same TopK dictionary, one through the sparse code and one dense, with 5 of 64 latents
    dead (so AuxK runs, with k_aux 4 < 5 dead), and a random batch x (48, 12) → y."""
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(48, 12, generator=g) + 1.0
    y = x if d_out is None else x @ torch.randn(12, d_out, generator=g)
    twins = []
    for sparse in (True, False):
        d = Dictionary(DictionaryConfig("topk", 12, 64, d_out=d_out, k=6), seed=seed)
        trainer = Trainer(
            d, "x", None if d_out is None else "y", TrainConfig(lr=1e-3, k_aux=4, dead_steps=3, sparse=sparse)
        )
        trainer.fit_scales(x, y)
        with torch.no_grad():
            d.b_enc.copy_(0.1 * torch.randn(64, generator=torch.Generator().manual_seed(1)))
        trainer.since_fired[torch.tensor([3, 17, 30, 41, 60])] = 5
        twins.append(trainer)
    return twins[0], twins[1], x, y


@pytest.mark.parametrize("d_out", [None, 7])
def test_sparse_topk_losses_and_gradients_equal_the_dense_reference(d_out: int | None) -> None:
    """The sparse TopK path (gather k pre-activations, decode k rows, sparse backward) against the dense one
    (scatter into (n, width), two matmuls, autograd), AuxK included: loss terms and the gradients of every
    parameter agree within 1e-5 (float32; only the summation order differs)."""
    fast, dense, x, y = _twins(d_out)
    parts = [fast.sparse_topk_losses(x, y), dense.losses(x, y)]
    assert float(parts[1]["sparsity"].detach()) > 0  # AuxK is live
    for name in ("mse", "sparsity", "loss"):
        torch.testing.assert_close(parts[0][name], parts[1][name], rtol=1e-5, atol=1e-5)
    f = torch.zeros(48, 64).scatter(1, parts[0]["indices"], parts[0]["values"])
    torch.testing.assert_close(f, parts[1]["f"], rtol=1e-5, atol=1e-5)
    grads = []
    for trainer, part in zip((fast, dense), parts, strict=True):
        params = dict(trainer.dictionary.named_parameters())
        grads.append(dict(zip(params, torch.autograd.grad(part["loss"], list(params.values())), strict=True)))
    assert set(grads[0]) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in grads[0]:
        assert float(grads[1][name].abs().max()) > 1e-3, name
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-5, msg=name)


def _reference_step(d: Dictionary, x: torch.Tensor, dead: torch.Tensor, lr: float, k_aux: int) -> None:
    """One TopK training step written out densely from the formulas (train.py's docstring): MSE + AuxK over the
    `dead` latents, the decoder gradient's row-parallel part removed, plain (unfused) Adam, rows renormalised."""
    params = [d.W_enc, d.b_enc, d.W_dec, d.b_dec]
    xs = x * d.s_in
    z = (xs - d.b_dec) @ d.W_enc + d.b_enc
    top = torch.topk(z, d.config.k, dim=-1)
    f = torch.zeros_like(z).scatter(1, top.indices, torch.relu(top.values))
    recon = f @ d.W_dec + d.b_dec
    residual = (xs - recon).detach()
    z_dead = z[:, dead]
    aux_top = torch.topk(z_dead, min(k_aux, len(dead)), dim=-1)
    f_aux = torch.zeros_like(z_dead).scatter(1, aux_top.indices, aux_top.values)
    aux = min(len(dead) / k_aux, 1.0) * (residual - f_aux @ d.W_dec[dead]).pow(2).sum(-1).mean()
    loss = (recon - xs).pow(2).sum(-1).mean() + aux
    optimizer = torch.optim.Adam(params, lr=lr, foreach=False)
    loss.backward()
    with torch.no_grad():
        unit = d.W_dec / d.W_dec.norm(dim=1, keepdim=True)
        d.W_dec.grad -= (d.W_dec.grad * unit).sum(1, keepdim=True) * unit
        optimizer.step()
        d.W_dec /= d.W_dec.norm(dim=1, keepdim=True)


def test_one_sparse_topk_step_equals_a_dense_reference_step() -> None:
    """`Trainer.step` (sparse code, fused Adam, in-place gradient projection) moves every parameter to where the
    dense step written out above does, within 1e-6."""
    fast, dense, x, _ = _twins(None)
    dead = fast.dead.nonzero().flatten()
    fast.step(x)
    _reference_step(dense.dictionary, x, dead, lr=1e-3, k_aux=4)
    reference = dict(dense.dictionary.named_parameters())
    for name, value in fast.dictionary.named_parameters():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=name)


def test_sparse_and_dense_topk_training_agree_step_by_step() -> None:
    """Five steps of the sparse and the dense TopK path: the same logs (loss, L0), the same firing bookkeeping
    (so the same latents go dead and feed AuxK) and parameters within 1e-5."""
    fast, dense, x, _ = _twins(None, seed=2)
    for step in range(5):
        rows = x[torch.randperm(48, generator=torch.Generator().manual_seed(step))[:32]]
        logs = fast.step(rows), dense.step(rows)
        assert logs[0]["l0"] == logs[1]["l0"]
        assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-5)
        assert torch.equal(fast.since_fired, dense.since_fired)
    reference = dict(dense.dictionary.named_parameters())
    for name, value in fast.dictionary.named_parameters():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("sparse", [True, False])
def test_topk_latents_kept_at_or_below_zero_do_not_fire(sparse: bool) -> None:
    """k = 3 but only latents 6 and 7 can be positive (the others' encoder bias is −100): the step counts L0 2 and
    resets only those two latents' idle counters, on either path."""
    d = Dictionary(DictionaryConfig("topk", 4, 8, k=3), seed=0)
    trainer = Trainer(d, "x", config=TrainConfig(lr=0.0, sparse=sparse))
    trainer._fitted = True
    with torch.no_grad():
        d.b_enc.copy_(torch.tensor([-100.0] * 6 + [50.0, 50.0]))
    trainer.since_fired.fill_(4)
    log = trainer.step(torch.randn(5, 4))
    assert log["l0"] == 2.0
    assert trainer.since_fired.tolist() == [5] * 6 + [0, 0]
