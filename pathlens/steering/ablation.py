"""Directional ablation (Arditi et al.): remove one direction from the residual stream everywhere.

`ablation_interventions(model, direction)` does it at run time: a `ProjectOut` on every block's input
(resid_pre) and on every attention and MLP write into the stream (attn_out, mlp_out), at all positions, so no
layer ever reads or writes the direction. `orthogonalized(model, direction)` bakes the same thing into the
weights of a deep copy: every module that writes into the stream — the token (and learned position)
embeddings, each attention output projection and each MLP down projection, weights and biases — is projected
onto the direction's orthogonal complement, W ← W − r̂ r̂ᵀ W. A tied unembedding is untied first (it keeps the
original weights: the run-time ablation does not touch the unembedding). The copy's logits equal the run-time
ablation's up to float rounding; the original model is left as it was.

`probe_after_ablation` checks what the ablation removed: a logistic probe freshly trained (cross-validated) on
the ablated model's activations of two contrast sets, against one trained on the plain model's.

Models that normalize a sublayer's output before adding it to the stream (Gemma 2/3's sandwich norms) have no
weight equivalent — a norm re-introduces the direction — so `orthogonalized` refuses them; the run-time
ablation works on every model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor, nn

from pathlens.arch.base import get_blocks, get_module, is_linear
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, ProjectOut
from pathlens.model import Model
from pathlens.sites import Site
from pathlens.steering.finders import ReadAt, probe_accuracy, read_activations


def _unit(model: Model, direction: Tensor) -> Tensor:
    if not isinstance(direction, Tensor) or direction.ndim != 1 or direction.shape[0] != model.arch.d_model:
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise PathlensError(
            f"direction must be a ({model.arch.d_model},) vector (the residual stream's width), got {shape}."
        )
    d = direction.detach().double()
    if not bool(torch.isfinite(d).all()) or float(d.norm()) == 0.0:
        raise PathlensError("direction must be finite and non-zero; it names the direction to remove.")
    return d / d.norm()


def ablation_interventions(model: Model, direction: Tensor) -> list[Intervention]:
    """Interventions removing `direction` (d_model,) from every layer's residual stream at run time: ProjectOut on
    each block's input and on each attention and MLP output, at all positions."""
    unit = _unit(model, direction).float()
    kinds = ["resid_pre", "attn_out"] + (["mlp_out"] if model.arch.mlp_out is not None else [])
    return [Intervention(Site(kind, layer), ProjectOut(unit)) for layer in range(model.n_layers) for kind in kinds]


def _writers(model: Model, block: nn.Module) -> list[nn.Module]:
    """The linear layers of one block that write into the residual stream (attention output, MLP down
    projection); an error for sandwich-norm models, whose writes pass through a norm."""
    arch = model.arch
    pairs = [(arch.o_proj, arch.attn_out, "attention")]
    if arch.mlp_out is not None and arch.mlp_down is not None:
        pairs.append((arch.mlp_down, arch.mlp_out, "MLP"))
    found = []
    for proj, out, what in pairs:
        if not proj.startswith(out + "."):
            raise PathlensError(
                f"{arch.family} normalizes the {what} output ({out}) after its projection ({proj}), so removing a "
                "direction from the weights is not equivalent to ablating it; use ablation_interventions "
                "(run time) on this model."
            )
        module = get_module(block, proj)
        if not is_linear(module):
            raise PathlensError(
                f"the {what} output projection {proj} is a {type(module).__name__}, not a linear layer."
            )
        found.append(module)
    return found


def _project_rows(weight: Tensor, unit: Tensor, out_axis: int) -> None:
    """In place: remove the `unit` component along `out_axis` (the axis that indexes the residual stream)."""
    r = unit.to(device=weight.device, dtype=torch.float64)
    w = weight.detach().double()
    if out_axis == 0:  # (d_model, in): W - r (rᵀ W)
        new = w - torch.outer(r, r @ w)
    else:  # (in, d_model): W - (W r) rᵀ
        new = w - torch.outer(w @ r, r)
    weight.data.copy_(new.to(weight.dtype))


def orthogonalized(model: Model, direction: Tensor) -> Model:
    """A copy of `model` whose weights never write `direction` into the residual stream (see module docstring);
    the original is untouched. Its logits equal those of `model` run with `ablation_interventions`."""
    unit = _unit(model, direction)
    hf = copy.deepcopy(model.hf)
    arch = model.arch
    blocks = get_blocks(hf, arch.blocks)
    writers = [w for block in blocks for w in _writers(model, block)]
    embed = get_module(hf, arch.embed)
    unembed = get_module(hf, arch.unembed)
    if isinstance(unembed.weight, Tensor) and unembed.weight is embed.weight:
        unembed.weight = nn.Parameter(embed.weight.detach().clone())
        config = getattr(hf, "config", None)
        if config is not None:
            config.tie_word_embeddings = False
    inside_blocks = {id(m) for block in blocks for m in block.modules()}
    embeddings = [
        m
        for m in hf.modules()
        if isinstance(m, nn.Embedding) and m.embedding_dim == arch.d_model and id(m) not in inside_blocks
    ]
    with torch.no_grad():
        for emb in embeddings:
            _project_rows(emb.weight, unit, out_axis=1)  # (vocab, d_model)
        for linear in writers:
            conv1d = type(linear).__name__ == "Conv1D"  # GPT-2 stores (in, out)
            _project_rows(linear.get_parameter("weight"), unit, out_axis=1 if conv1d else 0)
            bias = getattr(linear, "bias", None)
            if isinstance(bias, Tensor):
                b = bias.detach().double()
                r = unit.to(b.device)
                bias.data.copy_((b - (b @ r) * r).to(bias.dtype))
    return Model(hf, model.tokenizer, arch=arch, name=f"{model.name} (orthogonalized)")


def probe_after_ablation(
    model: Model,
    positive: Sequence[str],
    negative: Sequence[str],
    direction: Tensor,
    sites: "str | Sequence[str]",
    at: ReadAt = "last",
    folds: int = 4,
    seed: int = 0,
) -> pd.DataFrame:
    """How well a freshly trained logistic probe reads the contrast (`positive` vs `negative` prompts) at each of
    `sites`, in the plain model and with `direction` ablated at every layer (run time): one row per site with the
    held-out accuracies `before` and `after` (`finders.probe_accuracy`, `folds`-fold; chance 0.5 for balanced sets)
    and `residual`, the largest |component along the direction| left in the ablated activations."""
    names = [sites] if isinstance(sites, str) else list(sites)
    ablate = ablation_interventions(model, direction)
    unit = _unit(model, direction).float()
    plain = [read_activations(model, prompts, names, at) for prompts in (positive, negative)]
    ablated = [read_activations(model, prompts, names, at, interventions=ablate) for prompts in (positive, negative)]
    rows = []
    for site in names:
        after_pos, after_neg = ablated[0][site], ablated[1][site]
        rows.append(
            {
                "site": site,
                "before": probe_accuracy(plain[0][site], plain[1][site], folds, seed=seed),
                "after": probe_accuracy(after_pos, after_neg, folds, seed=seed),
                "residual": float((torch.cat([after_pos, after_neg]) @ unit).abs().max()),
            }
        )
    return pd.DataFrame(rows)
