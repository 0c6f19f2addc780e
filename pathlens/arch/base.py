"""`ArchMap`: where a model family keeps the parts pathlens reads and writes — module paths, no model code.

Paths are dotted module names. `blocks`, `embed`, `final_norm` and `unembed` are relative to the root model;
the others are relative to one block (`blocks[L]`). The map also records the attention shape (heads, KV
groups, head size) and two structural facts that change which sites exist:

- `parallel`: attention and MLP both read resid_pre (GPT-J / Pythia style), so there is no resid_mid;
- `qkv`: how queries/keys/values are reached — "interface" (the transformers attention-function interface,
  after rotary embeddings and q/k norms, exactly what enters the dot product), "projections" (outputs of the
  q/k/v linear layers, for models without rotary embeddings that compute attention themselves), or None.

`qkv_proj` names the linear layers that project the attention input to queries, keys and values, and
`qkv_layout` how their output columns are laid out: "separate" (three layers, each head-major), "fused" (one
layer, [q | k | v], each head-major: GPT-2's c_attn) or "interleaved" (one layer, per head [q_h k_h v_h]:
GPT-NeoX). Edge attribution uses them to split the attention input's gradient per head and per q/k/v.
`attn_norm` / `mlp_norm` name the norms that turn the residual stream into the attention / MLP input; edge
patching calls them to give each receiver its own input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pathlens.errors import PathlensError


@dataclass(frozen=True)
class ArchMap:
    family: str
    blocks: str
    embed: str
    unembed: str
    final_norm: str | None
    o_proj: str
    attn_out: str
    attn: str | None
    mlp: str | None
    mlp_down: str | None
    mlp_out: str | None
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    parallel: bool = False
    qkv: str | None = "interface"
    qkv_proj: tuple[str, str, str] | None = None
    qkv_layout: str = "separate"
    attn_norm: str | None = None
    mlp_norm: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise PathlensError(
                f"{self.family}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}."
            )


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path; a clear error if it does not exist."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise PathlensError(
            f"module path {path!r} does not exist in {type(root).__name__}: {exc}. List valid paths with "
            "[name for name, _ in model.named_modules()]."
        ) from exc


def get_blocks(root: nn.Module, path: str) -> nn.ModuleList:
    """The list of transformer blocks at `path` (an ArchMap's `blocks`); a clear error if it is not a list."""
    blocks = get_module(root, path)
    if not isinstance(blocks, nn.ModuleList):
        raise PathlensError(
            f"{path!r} in {type(root).__name__} is a {type(blocks).__name__}, not the list of blocks (nn.ModuleList); "
            "pass an ArchMap whose `blocks` names it."
        )
    return blocks


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a linear layer pathlens can read weights from: nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def own_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """`module`'s own parameter or buffer `name`, usable outside its forward: the tensor itself, or, when accelerate
    offloaded it (kept on disk or in CPU memory by the module's hook, a "meta" tensor in the module), a detached
    copy loaded through that hook onto the module's execution device."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor) or value.device.type != "meta":
        return value
    from accelerate.utils import align_module_device  # type: ignore[import-untyped]

    with align_module_device(module):
        return getattr(module, name).detach().clone()


def weight_out_in(module: nn.Module, role: str) -> torch.Tensor:
    """A linear layer's weight as (out_features, in_features): nn.Linear stores it that way, transformers' Conv1D
    (GPT-2) stores the transpose. `role` names the layer in the error raised for any other module. Offloaded
    weights are loaded (`own_tensor`)."""
    if type(module).__name__ == "Conv1D":
        return own_tensor(module, "weight").t()
    if isinstance(module, nn.Linear):
        return own_tensor(module, "weight")
    raise PathlensError(
        f"the {role} is a {type(module).__name__}; pathlens reads the weights of nn.Linear or transformers' Conv1D "
        "only. Pass an ArchMap whose paths name such layers."
    )


def output_weight_per_head(o_proj: nn.Module, n_heads: int, d_head: int) -> torch.Tensor:
    """W_O split per head: (n_heads, d_head, d_model), so head h writes z_h @ W_O[h] into the stream."""
    w_in_out = weight_out_in(o_proj, "attention output projection (ArchMap o_proj)").t()  # (n_heads*d_head, d_model)
    if w_in_out.shape[0] != n_heads * d_head:
        raise PathlensError(
            f"output projection input size {w_in_out.shape[0]} != n_heads*d_head = {n_heads}*{d_head}; "
            "check n_heads / d_head in the ArchMap."
        )
    return w_in_out.reshape(n_heads, d_head, w_in_out.shape[1])
