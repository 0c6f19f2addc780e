"""NeuronPath: finds a path known by construction, its batched JAS equals a one-alpha-at-a-time reference, and
models are left untouched (also after bad input, which is explained)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

from pathlens import PathlensError
from pathlens.circuits.neuron_path import NeuronPathResult, neuron_path, neuron_path_module
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch

ROUTE, DECOY = [0, 2, 1], [1, 0, 3]


def _route_mlp() -> nn.Module:
    """3 × (Linear → ReLU) and a 3-class head. Route neurons 0 → 2 → 1 carry class 0's logit; decoys 1 → 0 → 3
    have 5× larger activations but feed class 1 only; the other neurons lead nowhere."""
    model = nn.Sequential(
        nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        first, second, third, head = model[0], model[2], model[4], model[6]
        first.weight[ROUTE[0]] = torch.tensor([1.0, 1.0])
        first.weight[DECOY[0]] = torch.tensor([5.0, 5.0])
        first.weight[2] = torch.tensor([0.5, 0.0])
        second.weight[ROUTE[1], ROUTE[0]] = 1.0
        second.weight[DECOY[1], DECOY[0]] = 1.0
        second.weight[1, 2] = 0.3
        third.weight[ROUTE[2], ROUTE[1]] = 1.0
        third.weight[DECOY[2], DECOY[1]] = 1.0
        head.weight[0, ROUTE[2]] = 1.0
        head.weight[1, DECOY[2]] = 0.1
    return model.eval()


ROUTE_LAYERS = ["1", "3", "5"]


class _Encoder(nn.Module):
    """A tiny random ViT-like classifier: tokens (B, T, d), residual MLP blocks with token mixing, CLS head."""

    def __init__(self, d: int = 6, d_mlp: int = 10, n_layers: int = 3, n_classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(d, d_mlp), "act": nn.GELU(), "fc2": nn.Linear(d_mlp, d)})
            for _ in range(n_layers)
        )
        self.head = nn.Linear(d, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block["fc2"](block["act"](block["fc1"](x)))
            x = x + x.mean(dim=1, keepdim=True)
        return self.head(x[:, 0])


ENCODER_LAYERS = ["blocks.0.act", "blocks.1.act", "blocks.2.act"]


def _encoder() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    return _Encoder().double().eval(), torch.randn(2, 5, 6, dtype=torch.float64), torch.tensor([1, 3])


def _hooks_left(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# ---- the reference: one forward/backward per alpha, plain hooks ------------------------------------------------


def _reference_jas(
    run: Callable[[dict[int, Callable[[Tensor], Tensor]]], Tensor],
    clean: list[Tensor],
    path: Sequence[int],
    steps: int,
) -> dict[str, float]:
    """JAS of `path` in both forms, mean over prompts, by an explicit loop over alphas.

    run(edits) -> p_y (B,) with edits[i](unit (B, d)) giving the new unit vectors of path layer i;
    clean: the clean unit vectors per path layer (B, d_i).
    """
    grad_sums = [torch.zeros(clean[0].shape[0], dtype=torch.float64) for _ in path]
    for k in range(steps):
        leaves = []
        for act, j in zip(clean, path, strict=True):
            value = act.clone()
            value[:, j] *= k / steps
            leaves.append(value.requires_grad_(True))
        p = run({i: (lambda unit, leaf=leaf: leaf) for i, leaf in enumerate(leaves)})
        for i, g in enumerate(torch.autograd.grad(p.sum(), leaves)):
            grad_sums[i] += g[:, path[i]]
    acts = [act[:, j] for act, j in zip(clean, path, strict=True)]
    code = sum(grad_sums) * sum(acts) / steps
    paper = sum(g * a for g, a in zip(grad_sums, acts, strict=True)) / steps
    return {"code": float(code.mean()), "paper": float(paper.mean())}


def _module_runner(
    module: nn.Module, x: Tensor, target: Tensor, paths: Sequence[str], token: int | None
) -> Callable[[dict[int, Callable[[Tensor], Tensor]]], Tensor]:
    def run(edits: dict[int, Callable[[Tensor], Tensor]]) -> Tensor:
        def hook_for(i: int) -> Callable[..., Tensor | None]:
            def hook(mod: nn.Module, args: object, out: Tensor) -> Tensor | None:
                if i not in edits:
                    return None
                if token is None:
                    return edits[i](out)
                full = out.clone()
                full[:, token] = edits[i](out[:, token])
                return full

            return hook

        handles = [module.get_submodule(p).register_forward_hook(hook_for(i)) for i, p in enumerate(paths)]
        try:
            return torch.softmax(module(x), dim=-1)[torch.arange(len(target)), target]
        finally:
            for h in handles:
                h.remove()

    return run


def _module_clean(module: nn.Module, x: Tensor, paths: Sequence[str], token: int | None) -> list[Tensor]:
    seen: list[Tensor] = []
    hooks = [
        module.get_submodule(p).register_forward_hook(
            lambda m, a, out: seen.append((out if token is None else out[:, token]).detach())
        )
        for p in paths
    ]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---- a path known by construction ------------------------------------------------------------------------------


def test_finds_the_route_and_the_baseline_picks_the_decoys() -> None:
    model = _route_mlp()
    x = torch.tensor([[1.0, 1.0], [0.5, 1.5], [2.0, 0.5]], dtype=torch.float64)
    result = neuron_path_module(model, x, 0, ROUTE_LAYERS, token=None)
    assert isinstance(result, NeuronPathResult)
    assert result.neurons == list(enumerate(ROUTE))
    assert result.baseline is not None and result.baseline.neurons == list(enumerate(DECOY))
    assert result.jas > 0 > result.baseline.jas
    assert result.removal < result.baseline.removal
    assert result.removal < 0 < result.enhancement
    assert _hooks_left(model) == []
    frame = result.to_frame()
    assert list(frame.columns) == ["path", "layer", "neuron", "jas", "removal", "enhancement"]
    assert frame[frame.path == "jas"].neuron.tolist() == ROUTE
    assert frame[frame.path == "activation"].neuron.tolist() == DECOY


@pytest.mark.parametrize("form", ["code", "paper"])
def test_batched_jas_equals_a_loop_over_alphas(form: str) -> None:
    module, x, target = _encoder()
    result = neuron_path_module(module, x, target, ENCODER_LAYERS, token=0, steps=7, form=form)  # type: ignore[arg-type]
    clean = _module_clean(module, x, ENCODER_LAYERS, 0)
    run = _module_runner(module, x, target, ENCODER_LAYERS, 0)
    for r in (result, result.baseline):
        assert r is not None
        path = [j for _, j in r.neurons]
        assert r.jas == pytest.approx(_reference_jas(run, clean, path, 7)[form], rel=1e-6, abs=1e-12)
    assert _hooks_left(module) == []


def test_paper_form_is_integrated_gradients() -> None:
    """With many steps the paper form approaches p_y(clean) − p_y(path neurons at 0, rest of their vectors held)."""
    module, x, target = _encoder()
    result = neuron_path_module(module, x, target, ENCODER_LAYERS, steps=400, form="paper")
    clean = _module_clean(module, x, ENCODER_LAYERS, 0)
    run = _module_runner(module, x, target, ENCODER_LAYERS, 0)

    def zeroed(i: int) -> Callable[[Tensor], Tensor]:
        value = clean[i].clone()
        value[:, result.neurons[i][1]] = 0.0
        return lambda unit: value

    with torch.no_grad():
        difference = (run({}) - run({i: zeroed(i) for i in range(len(clean))})).mean()
    assert result.jas == pytest.approx(float(difference), rel=2e-3)


# ---- language models -------------------------------------------------------------------------------------------


def test_language_model_path_and_model_untouched() -> None:
    model = tiny_model("gpt2")
    before = snapshot(model)
    result = neuron_path(model, token_batch(3, 6), [5, 7, 9], steps=4)
    assert [layer for layer, _ in result.neurons] == [0, 1]
    assert all(0 <= j < model.arch.d_mlp for _, j in result.neurons)
    assert result.baseline is not None and len(result.baseline.neurons) == 2
    assert all(isinstance(v, float) for v in (result.jas, result.removal, result.enhancement))
    assert_untouched(model, before)


def test_language_model_jas_equals_a_loop_over_alphas() -> None:
    """Padded prompts (different answer positions) and float64; the reference uses plain pre-hooks on c_proj."""
    model = tiny_model("gpt2")
    model.hf.double()
    ids = token_batch(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    targets = torch.tensor([5, 7])
    answers = torch.tensor([5, 3])
    result = neuron_path(model, ids, targets, steps=5, attention_mask=mask)
    projections = [model.hf.transformer.h[layer].mlp.c_proj for layer in range(2)]
    rows = torch.arange(2)

    def run(edits: dict[int, Callable[[Tensor], Tensor]]) -> Tensor:
        def hook_for(i: int) -> Callable[..., tuple[Tensor] | None]:
            def hook(mod: nn.Module, args: tuple[Tensor]) -> tuple[Tensor] | None:
                if i not in edits:
                    return None
                full = args[0].clone()
                full[rows, answers] = edits[i](full[rows, answers])
                return (full,)

            return hook

        handles = [proj.register_forward_pre_hook(hook_for(i)) for i, proj in enumerate(projections)]
        try:
            logits = model.hf(input_ids=ids, attention_mask=mask).logits
        finally:
            for h in handles:
                h.remove()
        return torch.softmax(logits[rows, answers], dim=-1)[rows, targets]

    clean: list[Tensor] = []

    def read(i: int) -> Callable[[Tensor], Tensor]:
        def edit(unit: Tensor) -> Tensor:
            clean.append(unit.detach().clone())
            return unit

        return edit

    with torch.no_grad():
        run({0: read(0), 1: read(1)})
    reference = _reference_jas(run, clean, [j for _, j in result.neurons], 5)["code"]
    assert result.jas == pytest.approx(reference, rel=1e-6, abs=1e-12)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_input_is_explained_and_leaves_no_hooks() -> None:
    module, x, target = _encoder()
    with pytest.raises(PathlensError, match="'blocks.9.act' does not exist.*named_modules"):
        neuron_path_module(module, x, target, ["blocks.0.act", "blocks.9.act"])
    with pytest.raises(PathlensError, match="steps is 0; pass an integer >= 1"):
        neuron_path_module(module, x, target, ENCODER_LAYERS, steps=0)
    with pytest.raises(PathlensError, match="form is 'exact'; pass 'code'"):
        neuron_path_module(module, x, target, ENCODER_LAYERS, form="exact")  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match="token 7 is out of range.*valid tokens are 0..4"):
        neuron_path_module(module, x, target, ENCODER_LAYERS, token=7)
    with pytest.raises(PathlensError, match="token=None it must be \\(batch, d\\)"):
        neuron_path_module(module, x, target, ENCODER_LAYERS, token=None)
    with pytest.raises(PathlensError, match="target \\[9\\] out of range.*4 classes"):
        neuron_path_module(module, x, 9, ENCODER_LAYERS)
    with pytest.raises(PathlensError, match="target has 3 entries but there are 2 prompts"):
        neuron_path_module(module, x, [0, 1, 2], ENCODER_LAYERS)
    assert _hooks_left(module) == []

    model = tiny_model("gpt2")
    before = snapshot(model)
    with pytest.raises(PathlensError, match="layer of site L5.mlp_post is 5, out of range"):
        neuron_path(model, token_batch(2, 6), 3, layers=[0, 5])
    with pytest.raises(PathlensError, match="strictly increasing"):
        neuron_path(model, token_batch(2, 6), 3, layers=[1, 0])
    with pytest.raises(PathlensError, match="position \\[6, 6\\] out of range for 6 tokens"):
        neuron_path(model, token_batch(2, 6), 3, position=6)
    with pytest.raises(PathlensError, match="target_ids \\[64\\] out of range"):
        neuron_path(model, token_batch(2, 6), 64, steps=2)
    with pytest.raises(PathlensError, match="steps is 2.5"):
        neuron_path(model, token_batch(2, 6), 3, steps=2.5)  # type: ignore[arg-type]
    assert_untouched(model, before)
