"""NeuronPath (Wang et al., ICLR 2025, arXiv 2503.09046): the most influential path of FFN neurons, one per layer.

A unit is one coordinate of an FFN's post-activation vector at one token position (language models: the
`mlp_post` site at the answer position; vision models: e.g. the CLS token). The target is p_y = softmax(logits)[y].

Joint attribution score (JAS) of a path P = {(l, j_l)}, by integrated gradients with m steps, baseline 0 and
alpha_k = k/m (k = 0..m-1). In the run for alpha_k the unit vectors of the path's layers are held at their clean
values a_l (B, d_l), except the path neurons, which are set to alpha_k * a_{l, j_l}; every other activation
(other layers, other positions, everything after the last path layer) is recomputed. g_{l, j, k} is
∂p_y/∂a_{l, j} in that run, the path neurons being independent inputs (as the official code's `tmp_score`
replacement does). Two forms:

    form="code"  : JAS = [Σ_k Σ_{l∈P} g_{l,j_l,k}] · [Σ_{l∈P} a_{l,j_l} / m]      (product of sums)
                   — `j_a_score` in foundation-model-research/NeuronPath, path/joint_attr.py; the default, and the
                   form of the layer-progressive scores below.
    form="paper" : JAS = Σ_{l∈P} (a_{l,j_l} / m) · Σ_k g_{l,j_l,k}               (sum of per-layer products)
                   — our reading of the paper's equation; it is the left-Riemann integrated-gradients estimate
                   of p_y(clean) − p_y(path neurons at 0, the rest of their layers' unit vectors held).

Layer-progressive locating: for the i-th path layer, one batched forward/backward over the m alphas (m·B rows,
row k·B + b) scales the whole unit vector of that layer by alpha_k, together with the neurons chosen at earlier
layers (rest of their vectors held), and scores every neuron j of the layer with the chosen form, e.g. for "code"

    score_j = [Σ_k (g_{i,j,k} + Σ_{l<i} g_{l,j_l,k})] · [A_{i,j}/m + Σ_{l<i} a_{l,j_l}/m],   j_i = argmax_j score_j.

With several prompts one path is shared: scores and JAS are averaged over prompts. The baseline path takes the
neuron of largest mean activation at each layer. Every path is also reported with the effect of removing (×0)
and enhancing (×2) its neurons in an ordinary run (downstream recomputed, as the official `imp_op` does): the
relative change of p_y, mean over prompts.

Entry points: `neuron_path` for a `pathlens.Model` (reads and writes `mlp_post` through `Model.run`), and
`neuron_path_module` for any `nn.Module` whose per-layer activations are the outputs of named submodules.
Neither leaves anything on the model: `Model.run` removes its hooks on exit, and the module hooks are removed
in `finally`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pandas as pd
import torch
from torch import Tensor, nn

from pathlens.arch.base import get_module
from pathlens.arch.calls import first_output, with_first_output
from pathlens.errors import PathlensError
from pathlens.hooks import HookSession
from pathlens.interventions import Intervention, Replace, Scale
from pathlens.model import Model
from pathlens.sites import Site

__all__ = ["NeuronPathResult", "neuron_path", "neuron_path_module"]

Form = Literal["code", "paper"]
_FORMS = ("code", "paper")
_REMOVE, _ENHANCE = 0.0, 2.0


@dataclass
class NeuronPathResult:
    """A neuron path and how much it matters.

    neurons: one (layer, neuron) per path layer, input to output; `layer` is the model's layer index
        (`neuron_path`) or the index into `layer_modules` (`neuron_path_module`).
    jas: the path's joint attribution score (mean over prompts), in the form the call used.
    removal / enhancement: relative change of p_y, (p_y' − p_y) / p_y averaged over prompts, when the path's
        neurons are multiplied by 0 / by 2.
    baseline: the same for the activation baseline (largest mean activation per layer); None on the baseline.
    """

    neurons: list[tuple[int, int]]
    jas: float
    removal: float
    enhancement: float
    baseline: NeuronPathResult | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per (path, layer): path ("jas" or "activation"), layer, neuron, jas, removal, enhancement."""
        paths = [("jas", self)] + ([("activation", self.baseline)] if self.baseline is not None else [])
        rows = [
            {
                "path": name,
                "layer": layer,
                "neuron": neuron,
                "jas": r.jas,
                "removal": r.removal,
                "enhancement": r.enhancement,
            }
            for name, r in paths
            for layer, neuron in r.neurons
        ]
        return pd.DataFrame(rows)


class _Backend(Protocol):
    """How the core runs a model. Path layers are numbered 0..n-1 here; a batch of m·B rows is alpha-major."""

    def clean(self) -> tuple[list[Tensor], Tensor]:
        """Clean unit vectors per path layer, each (B, d_l), and p_y (B,)."""
        ...

    def grads(self, sources: dict[int, Tensor], steps: int) -> dict[int, Tensor]:
        """Run steps·B rows with the unit vector of each path layer i in `sources` set to sources[i] (steps·B, d_i);
        return ∂p_y/∂unit for those layers, each (steps·B, d_i)."""
        ...

    def prob(self, path: Sequence[int], factor: float) -> Tensor:
        """p_y (B,) of an ordinary run in which neuron path[i] of every path layer i is multiplied by `factor`."""
        ...


# ---- the shared core ---------------------------------------------------------------------------------------


def _scaled(act: Tensor, alphas: Tensor, neuron: int | None) -> Tensor:
    """(m·B, d): the clean vectors act (B, d) for every alpha (m,), alpha-major; the whole vector (neuron=None) or
    only `neuron` multiplied by alpha."""
    m, (b, d) = alphas.numel(), act.shape
    a = alphas.to(act)[:, None, None]
    if neuron is None:
        rows = a * act
    else:
        rows = act.expand(m, b, d).clone()
        rows[:, :, neuron] *= a[:, :, 0]
    return rows.reshape(m * b, d)


def _joint(grad_sums: Sequence[Tensor], acts: Sequence[Tensor], form: Form, steps: int) -> Tensor:
    """JAS from per-layer Σ_k g and a, each broadcastable to (B,) or (B, d): code = Σg·Σa/m, paper = Σ(g·a)/m."""
    if form == "code":
        return sum(grad_sums) * sum(acts) / steps  # type: ignore[return-value]
    return sum(g * a for g, a in zip(grad_sums, acts, strict=True)) / steps  # type: ignore[return-value]


def _path_terms(
    grads: dict[int, Tensor], acts: list[Tensor], path: Sequence[int], steps: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Σ_k g_{l,j_l,k} and a_{l,j_l}, each (B,), for the path layers 0..len(path)-1."""
    sums = [grads[i].unflatten(0, (steps, -1))[:, :, j].sum(0) for i, j in enumerate(path)]
    return sums, [acts[i][:, j] for i, j in enumerate(path)]


def _jas(backend: _Backend, acts: list[Tensor], path: Sequence[int], steps: int, form: Form) -> float:
    """The path's JAS, mean over prompts: one batched forward/backward over the m alphas."""
    alphas = torch.arange(steps, dtype=torch.float64) / steps
    grads = backend.grads({i: _scaled(acts[i], alphas, j) for i, j in enumerate(path)}, steps)
    sums, values = _path_terms(grads, acts, path, steps)
    return float(_joint(sums, values, form, steps).mean())


def _locate(backend: _Backend, acts: list[Tensor], steps: int, form: Form) -> list[int]:
    """Layer-progressive locating: one neuron per path layer, each chosen given the earlier ones."""
    alphas = torch.arange(steps, dtype=torch.float64) / steps
    path: list[int] = []
    for layer, act in enumerate(acts):
        sources = {i: _scaled(acts[i], alphas, j) for i, j in enumerate(path)}
        sources[layer] = _scaled(act, alphas, None)
        grads = backend.grads(sources, steps)
        sums, values = _path_terms(grads, acts, path, steps)
        here = grads[layer].unflatten(0, (steps, -1)).sum(0)
        score = _joint([s[:, None] for s in sums] + [here], [v[:, None] for v in values] + [act], form, steps)
        path.append(int(score.mean(0).argmax()))
    return path


def _evaluate(
    backend: _Backend,
    acts: list[Tensor],
    p_clean: Tensor,
    path: list[int],
    steps: int,
    form: Form,
    layer_ids: list[int],
) -> NeuronPathResult:
    def change(factor: float) -> float:
        return float(((backend.prob(path, factor) - p_clean) / p_clean).mean())

    return NeuronPathResult(
        neurons=[(layer_ids[i], j) for i, j in enumerate(path)],
        jas=_jas(backend, acts, path, steps, form),
        removal=change(_REMOVE),
        enhancement=change(_ENHANCE),
    )


def _search(backend: _Backend, steps: int, form: Form, layer_ids: list[int]) -> NeuronPathResult:
    acts, p_clean = backend.clean()
    result = _evaluate(backend, acts, p_clean, _locate(backend, acts, steps, form), steps, form, layer_ids)
    baseline = [int(a.mean(0).argmax()) for a in acts]
    result.baseline = _evaluate(backend, acts, p_clean, baseline, steps, form, layer_ids)
    return result


# ---- checks and helpers shared by both entry points --------------------------------------------------------


def _check_options(steps: int, form: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PathlensError(
            f"steps is {steps!r}; pass an integer >= 1 (the number of integrated-gradient steps, e.g. 20)."
        )
    if form not in _FORMS:
        raise PathlensError(f"form is {form!r}; pass 'code' (product of sums, the default) or 'paper'.")


def _per_prompt(value: int | Sequence[int] | Tensor, batch: int, what: str) -> Tensor:
    """One integer per prompt (targets, positions) as a long tensor (B,); a single int is used for all prompts."""
    t = torch.as_tensor(value).reshape(-1).long()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise PathlensError(
            f"{what} has {t.numel()} entries but there are {batch} prompts; give one per prompt or one."
        )
    return t


def _target_prob(logits: Tensor, targets: Tensor, what: str) -> Tensor:
    """p_y (N,) from logits (N, C) and targets (N,); computed in at least float32."""
    if bool(((targets < 0) | (targets >= logits.shape[-1])).any()):
        raise PathlensError(
            f"{what} {targets.unique().tolist()} out of range: the model has {logits.shape[-1]} classes "
            f"(valid: 0..{logits.shape[-1] - 1})."
        )
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return probs.gather(-1, targets.to(logits.device)[:, None])[:, 0]


# ---- language models: pathlens.Model and its mlp_post sites ------------------------------------------------


@dataclass
class _ModelBackend:
    """`Model.run` with `mlp_post` sites: Replace to set unit vectors, Scale to remove / enhance neurons.

    ids, mask: (B, P); units: unit position per prompt (B,); answers: where p_y is read (B,); targets (B,).
    """

    model: Model
    ids: Tensor
    mask: Tensor | None
    layers: list[int]
    units: Tensor
    answers: Tensor
    targets: Tensor

    def _run(self, repeat: int, interventions: list[Intervention], grad: bool, cache: Sequence[Site] = ()) -> Any:
        mask = None if self.mask is None else self.mask.repeat(repeat, 1)
        return self.model.run(
            self.ids.repeat(repeat, 1), attention_mask=mask, cache=cache, interventions=interventions, grad=grad
        )

    def _groups(self, repeat: int) -> list[tuple[int, Tensor]]:
        """(position, rows of the repeated batch whose unit sits there), one entry per distinct unit position."""
        rows = torch.arange(repeat * len(self.units))
        units = self.units.repeat(repeat)
        return [(int(q), rows[units == q]) for q in self.units.unique()]

    def _prob(self, logits: Tensor, repeat: int) -> Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return _target_prob(
            logits[rows, self.answers.repeat(repeat).to(logits.device)], self.targets.repeat(repeat), "target_ids"
        )

    def clean(self) -> tuple[list[Tensor], Tensor]:
        sites = [Site("mlp_post", layer) for layer in self.layers]
        run = self._run(1, [], grad=False, cache=sites)
        rows = torch.arange(len(self.units))
        acts = [run.cache[s][rows, self.units.to(run.cache[s].device)] for s in sites]
        return acts, self._prob(run.logits, 1)

    def grads(self, sources: dict[int, Tensor], steps: int) -> dict[int, Tensor]:
        sites = {i: Site("mlp_post", self.layers[i]) for i in sources}
        interventions = []
        for i, source in sources.items():
            leaf = source.detach().requires_grad_(True)
            for q, rows in self._groups(steps):
                interventions.append(Intervention(sites[i], Replace(leaf[rows][:, None]), positions=[q], rows=rows))
        run = self._run(steps, interventions, grad=True, cache=list(sites.values()))
        values = [run.cache[s] for s in sites.values()]
        grads = torch.autograd.grad(self._prob(run.logits, steps).sum(), values, materialize_grads=True)
        rows = torch.arange(steps * len(self.units))
        units = self.units.repeat(steps)
        return {i: g[rows, units.to(g.device)].detach() for i, g in zip(sources, grads, strict=True)}

    def prob(self, path: Sequence[int], factor: float) -> Tensor:
        interventions = [
            Intervention(Site("mlp_post", self.layers[i], j), Scale(factor), positions=[q], rows=rows)
            for i, j in enumerate(path)
            for q, rows in self._groups(1)
        ]
        return self._prob(self._run(1, interventions, grad=False).logits, 1)


def _unit_positions(position: int | Sequence[int] | Tensor | None, answers: Tensor, seq_len: int) -> Tensor:
    """Unit position per prompt (B,): the answer position by default; negatives count from the end."""
    if position is None:
        return answers
    pos = _per_prompt(position, len(answers), "position")
    if bool(((pos < -seq_len) | (pos >= seq_len)).any()):
        raise PathlensError(
            f"position {pos.tolist()} out of range for {seq_len} tokens; valid: 0..{seq_len - 1} "
            f"(or -{seq_len}..-1 from the end), or None for each prompt's answer position."
        )
    return pos % seq_len


def neuron_path(
    model: Model,
    ids: Any,
    target_ids: int | Sequence[int] | Tensor,
    position: int | Sequence[int] | Tensor | None = None,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    *,
    attention_mask: Tensor | None = None,
    form: Form = "code",
) -> NeuronPathResult:
    """The NeuronPath of a language model: one `mlp_post` neuron per layer that jointly drives p(target).

    ids: token ids (B, P) (right-padded, with `attention_mask` (B, P)), texts, or a tokenizer output.
    target_ids: the answer token of every prompt (B,), or one id for all; p_y is read at each prompt's answer
        position (its last real token).
    position: the units' token position — None for each prompt's answer position, one int, or one per prompt.
    layers: the layers the path runs through, strictly increasing (default: all).
    steps: integrated-gradient steps m; each forward/backward runs m·B rows.
    form: "code" or "paper" JAS (module docstring). Returns the path, its JAS, removal and enhancement effects,
    and the activation baseline; neurons are (layer, neuron) with the model's layer numbers.
    """
    _check_options(steps, form)
    tokens, mask = model._prepare(ids, attention_mask)
    batch, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    chosen = list(range(model.n_layers)) if layers is None else [int(layer) for layer in layers]
    if not chosen or any(b <= a for a, b in zip(chosen, chosen[1:], strict=False)):
        raise PathlensError(f"layers is {chosen}; pass a non-empty, strictly increasing list such as [0, 1, 2].")
    for layer in chosen:
        model.resolve(Site("mlp_post", layer))
    answers = torch.full((batch,), seq_len - 1) if mask is None else mask.long().sum(dim=1).clamp(min=1).cpu() - 1
    backend = _ModelBackend(
        model,
        tokens,
        mask,
        chosen,
        _unit_positions(position, answers, seq_len),
        answers,
        _per_prompt(target_ids, batch, "target_ids"),
    )
    return _search(backend, steps, form, chosen)


# ---- any nn.Module: per-layer activations are outputs of named submodules ---------------------------------


@dataclass
class _ModuleBackend:
    """Forward hooks on the named activation modules, held by a `HookSession` for one call.

    inputs: the module's positional inputs, batch first (B, ...); targets (B,); token: the unit's token index in
    an activation (B, T, d), or None for activations (B, d).
    """

    module: nn.Module
    inputs: tuple[Tensor, ...]
    targets: Tensor
    paths: list[str]
    token: int | None

    def _unit(self, out: Tensor, i: int) -> Tensor:
        """The unit vectors (N, d) in the output of path layer i."""
        where = f"the output of {self.paths[i]!r} has shape {tuple(out.shape)}"
        if self.token is None:
            if out.ndim != 2:
                raise PathlensError(
                    f"{where}; with token=None it must be (batch, d) — pass token=<index> for (batch, tokens, d)."
                )
            return out
        if out.ndim != 3:
            raise PathlensError(
                f"{where}; with token={self.token} it must be (batch, tokens, d) — pass token=None for (batch, d)."
            )
        if not -out.shape[1] <= self.token < out.shape[1]:
            raise PathlensError(
                f"token {self.token} is out of range: {where}, so valid tokens are 0..{out.shape[1] - 1}."
            )
        return out[:, self.token]

    def _forward(self, repeat: int, edit: Callable[[int, Tensor], Tensor | None]) -> Tensor:
        """Logits (repeat·B, C) of a run in which `edit(i, unit)` may return new unit vectors for path layer i."""

        def hook_for(i: int) -> Callable[..., Any]:
            def hook(module: nn.Module, args: Any, output: Any) -> Any:
                out = first_output(output)
                new = edit(i, self._unit(out, i))
                if new is None:
                    return None
                if self.token is None:
                    return with_first_output(output, new.to(out.dtype))
                full = out.clone()
                full[:, self.token] = new.to(out.dtype)
                return with_first_output(output, full)

            return hook

        hooks = [(path, "fwd", hook_for(i)) for i, path in enumerate(self.paths)]
        with HookSession(self.module, extra_hooks=hooks):
            out = self.module(*(x.repeat(repeat, *([1] * (x.ndim - 1))) for x in self.inputs))
        logits = out.logits if hasattr(out, "logits") else first_output(out)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise PathlensError(
                "neuron_path_module needs the module's output to be logits (batch, classes) (or a tuple / an object "
                "with .logits holding them); wrap the module so that it returns them."
            )
        return logits

    def _prob(self, logits: Tensor, repeat: int) -> Tensor:
        return _target_prob(logits, self.targets.repeat(repeat), "target")

    def clean(self) -> tuple[list[Tensor], Tensor]:
        acts: dict[int, Tensor] = {}

        def read(i: int, unit: Tensor) -> None:
            acts[i] = unit.detach().clone()

        with torch.no_grad():
            p = self._prob(self._forward(1, read), 1)
        return [acts[i] for i in range(len(self.paths))], p

    def grads(self, sources: dict[int, Tensor], steps: int) -> dict[int, Tensor]:
        leaves = {i: s.detach().requires_grad_(True) for i, s in sources.items()}
        with torch.enable_grad():
            p = self._prob(self._forward(steps, lambda i, unit: leaves.get(i)), steps)
            grads = torch.autograd.grad(p.sum(), list(leaves.values()), materialize_grads=True)
        return dict(zip(leaves, grads, strict=True))

    def prob(self, path: Sequence[int], factor: float) -> Tensor:
        def scale(i: int, unit: Tensor) -> Tensor:
            new = unit.clone()
            new[:, path[i]] *= factor
            return new

        with torch.no_grad():
            return self._prob(self._forward(1, scale), 1)


def neuron_path_module(
    module: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    target: int | Sequence[int] | Tensor,
    layer_modules: Sequence[str],
    token: int | None = 0,
    steps: int = 20,
    *,
    form: Form = "code",
) -> NeuronPathResult:
    """The NeuronPath of any classifier whose per-layer activations are the outputs of named submodules.

    module: returns logits (B, C) (or a tuple / an object with .logits); put it in eval mode for deterministic
        results. It is called as module(*inputs), each input batch first (B, ...).
    target: the class of every input (B,), or one class for all.
    layer_modules: dotted paths of the per-layer activation modules, input to output, e.g.
        ["blocks.0.mlp.act", "blocks.1.mlp.act"] for a ViT; each outputs (B, T, d) or, with token=None, (B, d).
    token: the units' token index (0 = CLS), or None when the activations have no token axis.
    steps, form: as in `neuron_path`. Neurons are (index into layer_modules, neuron).
    """
    _check_options(steps, form)
    if isinstance(layer_modules, str) or not layer_modules:
        raise PathlensError(
            f"layer_modules is {layer_modules!r}; pass a non-empty list of module paths, e.g. ['blocks.0.act']."
        )
    for path in layer_modules:
        get_module(module, path)
    batch_inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not batch_inputs or any(not isinstance(x, Tensor) or x.ndim == 0 for x in batch_inputs):
        raise PathlensError("inputs must be a tensor (batch, ...) or a sequence of such tensors, batch first.")
    backend = _ModuleBackend(
        module, batch_inputs, _per_prompt(target, int(batch_inputs[0].shape[0]), "target"), list(layer_modules), token
    )
    return _search(backend, steps, form, list(range(len(layer_modules))))
