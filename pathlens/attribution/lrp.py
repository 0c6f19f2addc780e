"""LRP rules as backward-pass modifications: gradient × input becomes LRP relevance, forward values unchanged.

RelP (Rezaei Jafari et al. 2025, arXiv 2508.21258) replaces AtP's gradient by the gradient of a backward pass
that follows these rules. Each is a forward hook returning `y.detach() + (y′ − y′.detach())`, whose value is
y bit for bit while its gradient is that of the surrogate y′:

    "LN"        LayerNorm / RMSNorm (every module whose class name ends in "Norm"): the normalizer is a constant,
                y′ = g ⊙ c(x) / σ(x).detach(), c the centering (if the norm centers); g, centering and eps are
                measured by probing the module (`pathlens.arch.norms.norm_parts`).
    "identity"  elementwise activations inside MLPs (GELU, SiLU, ...): backward act(x)/x, y′ = x ⊙ (y/x̃).detach()
                with x̃ = x + ((x == 0) + sign(x))·1e-6.
    "half"      gated MLPs (act(gate) ⊙ up): the product splits its relevance half to each factor,
                y′ = x/2 on the down projection's input (both factors then receive half their gradient).
    "AH"        attention probabilities are constants: relevance flows through the values only. Every layer also
                runs the model's eager attention for the gradient; the value stays the model's own output.

Linear layers keep their plain gradient (the 0-rule). `DEFAULT_RULES` are the RelP demo's configuration
("LN", "identity", "half"). "AH" is opt-in: on SmolLM2 IOI it lifts RelP's node-level agreement with exact
patching above AtP's on the residual stream and MLP outputs (benchmarks/attribution.py), but it gives every
query and key zero relevance, so circuits that work through attention patterns (induction: previous-token
head → induction head via its key) lose their key edges. The hooks are registered by `HookSession` and exist
only during one run, so a model is never left modified. Each rule is an object (`LNRule`, `IdentityRule`,
`HalfRule`, `AHRule`) that knows how to hook a model; `rule_objects(names)` gives them for `Model.run(rules=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pathlens.arch.base import get_blocks, get_module
from pathlens.arch.norms import norm_parts
from pathlens.errors import PathlensError
from pathlens.hooks import Hook

if TYPE_CHECKING:
    from pathlens.model import Model

RULES = ("LN", "identity", "half", "AH")
DEFAULT_RULES = ("LN", "identity", "half")
_ALIASES = {
    "ln": "LN",
    "ln-rule": "LN",
    "identity": "identity",
    "identity-rule": "identity",
    "half": "half",
    "half-rule": "half",
    "ah": "AH",
    "ah-rule": "AH",
}
_ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")


def rules_for(rules: Collection[str] | None) -> frozenset[str]:
    """`rules` normalized; None means `DEFAULT_RULES`."""
    return normalize_rules(DEFAULT_RULES if rules is None else rules)


def normalize_rules(rules: Collection[str]) -> frozenset[str]:
    """Rule names as canonical names ("LN-rule" → "LN"); an unknown name is an error listing the valid ones."""
    out = set()
    for rule in rules:
        name = _ALIASES.get(str(rule).lower())
        if name is None:
            raise PathlensError(f"unknown LRP rule {rule!r}; use some of {', '.join(RULES)} (or e.g. 'LN-rule').")
        out.add(name)
    return frozenset(out)


def _surrogate(y: Tensor, y_rule: Tensor) -> Tensor:
    """y's value with y_rule's gradient."""
    return y.detach() + (y_rule - y_rule.detach())


def _norm_width(norm: nn.Module, default: int) -> int:
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and weight.ndim == 1:
        return int(weight.shape[0])
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[-1]) if shape else default


def _norm_hook(norm: nn.Module, width: int) -> Callable[..., Any]:
    """LN rule for one norm module, measured once before its hook exists (probing calls the module)."""
    centers, gain, eps = norm_parts(norm, width)
    gain32 = gain.to(torch.float32)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0].float()
        c = x - x.mean(dim=-1, keepdim=True) if centers else x
        sigma = torch.sqrt(c.pow(2).mean(dim=-1, keepdim=True) + eps).detach()
        y = output[0] if isinstance(output, tuple) else output
        new = _surrogate(y, (gain32.to(x.device) * c / sigma).to(y.dtype))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def identity_hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """The identity rule as a forward hook for one elementwise activation module (any `nn.Module`)."""
    x = args[0]
    shifted = x + ((x == 0).to(x.dtype) + torch.sign(x)) * 1e-6
    return _surrogate(output, x * (output / shifted).detach())


def _half_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    return (_surrogate(x, 0.5 * x), *args[1:]), kwargs


def _norms(root: nn.Module) -> Iterator[nn.Module]:
    for module in root.modules():
        if type(module).__name__.endswith("Norm"):
            yield module


def _activations(mlp: nn.Module) -> list[nn.Module]:
    return [m for m in mlp.modules() if type(m).__module__ in _ACTIVATION_MODULES]


def _is_gated(mlp: nn.Module) -> bool:
    return hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj")


@dataclass(frozen=True)
class LNRule:
    """LayerNorm / RMSNorm with a constant normalizer, on every module whose class name ends in "Norm"."""

    name: str = "LN"
    constant_attention: bool = False

    def hooks(self, model: "Model") -> list[Hook]:
        norms = list(_norms(model.hf))
        if not norms:
            raise PathlensError(
                f"the LN rule found no normalization module (class name ending in 'Norm') in {type(model.hf).__name__}."
            )
        return [(m, "fwd", _norm_hook(m, _norm_width(m, model.arch.d_model))) for m in norms]


@dataclass(frozen=True)
class IdentityRule:
    """Elementwise activations inside every MLP pass relevance through unchanged."""

    name: str = "identity"
    constant_attention: bool = False

    def hooks(self, model: "Model") -> list[Hook]:
        hooks: list[Hook] = []
        for layer, mlp in _mlps(model):
            acts = _activations(mlp)
            if not acts:
                raise PathlensError(
                    f"the identity rule found no activation module in layer {layer}'s MLP ({type(mlp).__name__}); "
                    "its activation is a plain function. Drop 'identity' from rules= for this model."
                )
            hooks += [(m, "fwd", identity_hook) for m in acts]
        return hooks


@dataclass(frozen=True)
class HalfRule:
    """Gated MLPs split a product's relevance half to each factor (on the down projection's input)."""

    name: str = "half"
    constant_attention: bool = False

    def hooks(self, model: "Model") -> list[Hook]:
        arch = model.arch
        blocks = get_blocks(model.hf, arch.blocks)
        return [
            (get_module(blocks[layer], arch.mlp_down), "pre", _half_hook)
            for layer, mlp in _mlps(model)
            if _is_gated(mlp) and arch.mlp_down is not None
        ]


@dataclass(frozen=True)
class AHRule:
    """Attention probabilities are constants for the backward pass: the session's constant-attention flag."""

    name: str = "AH"
    constant_attention: bool = True

    def hooks(self, model: "Model") -> list[Hook]:
        return []


Rule = LNRule | IdentityRule | HalfRule | AHRule
_RULE_TYPES: dict[str, type[Rule]] = {"LN": LNRule, "identity": IdentityRule, "half": HalfRule, "AH": AHRule}


def rule_objects(rules: Collection[str]) -> tuple[Rule, ...]:
    """The rule objects for rule names (in `RULES` order), ready for `Model.run(rules=...)` / `Model.session`."""
    names = normalize_rules(rules)
    return tuple(_RULE_TYPES[name]() for name in RULES if name in names)


def _mlps(model: "Model") -> list[tuple[int, nn.Module]]:
    arch = model.arch
    if arch.mlp is None:
        return []
    blocks = get_blocks(model.hf, arch.blocks)
    return [(layer, get_module(block, arch.mlp)) for layer, block in enumerate(blocks)]
