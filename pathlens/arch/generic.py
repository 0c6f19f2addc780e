"""Find the architecture map of a model: a known family by `config.model_type`, else by module structure.

Structural discovery: the blocks are the longest `nn.ModuleList` of identical modules; inside a block the
attention is the child whose name mentions attention, its output projection the last linear layer in it, the
MLP the child named mlp / feed_forward / ffn and its down projection the last linear layer in it. Sizes come
from the usual config fields. When anything cannot be found the error says how to pass an `ArchMap`.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from pathlens.arch.base import ArchMap, is_linear
from pathlens.arch.families import FAMILIES
from pathlens.errors import PathlensError

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
_HOW_TO = (
    "Pass an explicit map: pathlens.Model(hf_model, tokenizer, arch=pathlens.ArchMap(family=..., "
    "blocks='path.to.layers', "
    "embed=..., unembed=..., final_norm=..., attn='self_attn', o_proj='self_attn.o_proj', attn_out='self_attn', "
    "mlp='mlp', mlp_down='mlp.down_proj', mlp_out='mlp', n_layers=..., n_heads=..., n_kv_heads=..., d_model=..., "
    "d_head=..., d_mlp=...)); any other module stays reachable as a module('path') site."
)


def arch_for(model: nn.Module) -> ArchMap:
    """The ArchMap of a transformers model (known family) or of any nn.Module (structural discovery)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type](cfg)
    return infer_arch(model)


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise PathlensError(f"module {type(target).__name__} is not inside the model. {_HOW_TO}")


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise PathlensError(f"no list of transformer blocks found in {type(model).__name__}. {_HOW_TO}")
    return best


def _child(block: nn.Module, names: tuple[str, ...], what: str, required: bool) -> str | None:
    children = dict(block.named_children())
    for n in names:
        if n in children:
            return n
    for n in children:
        if any(key in n.lower() for key in names):
            return n
    if required:
        raise PathlensError(f"no {what} module found among block children {list(children)}. {_HOW_TO}")
    return None


def _last_linear(module: nn.Module, prefix: str, what: str) -> str:
    linears = [n for n, m in module.named_modules() if n and is_linear(m)]
    if not linears:
        raise PathlensError(f"no linear layer found in {prefix!r} to use as the {what}. {_HOW_TO}")
    return f"{prefix}.{linears[-1]}"


def _cfg_int(cfg: Any, *names: str) -> int | None:
    for n in names:
        value = getattr(cfg, n, None)
        if isinstance(value, int):
            return value
    return None


def _final_norm(model: nn.Module, blocks_path: str) -> str | None:
    """A sibling of the blocks list whose name says norm (ln_f, norm, final_layer_norm), if any."""
    parent = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    container = model.get_submodule(parent) if parent else model
    for name, _ in container.named_children():
        if "norm" in name.lower() or name == "ln_f":
            return f"{parent}.{name}" if parent else name
    return None


def infer_arch(model: nn.Module) -> ArchMap:
    """Infer an ArchMap from module structure and config fields (see module docstring)."""
    cfg = getattr(model, "config", None)
    blocks_path, blocks = _find_blocks(model)
    block = blocks[0]
    attn = _child(block, _ATTN_NAMES, "attention", required=True)
    assert attn is not None
    mlp = _child(block, _MLP_NAMES, "MLP", required=False)
    o_proj = _last_linear(block.get_submodule(attn), attn, "attention output projection")
    mlp_down = _last_linear(block.get_submodule(mlp), mlp, "MLP down projection") if mlp else None
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embed_mod = get_in() if callable(get_in) else None
    unembed_mod = get_out() if callable(get_out) else None
    if embed_mod is None or unembed_mod is None:
        raise PathlensError(f"cannot find the token embedding / unembedding of {type(model).__name__}. {_HOW_TO}")
    d_model = _cfg_int(cfg, "hidden_size", "n_embd", "d_model")
    n_heads = _cfg_int(cfg, "num_attention_heads", "n_head", "num_heads")
    if d_model is None or n_heads is None:
        raise PathlensError(f"cannot read hidden size / head count from the config. {_HOW_TO}")
    n_kv = _cfg_int(cfg, "num_key_value_heads", "num_kv_heads") or n_heads
    attn_source = inspect.getsource(type(block.get_submodule(attn)).forward)
    uses_interface = "ALL_ATTENTION_FUNCTIONS" in attn_source
    final_norm = _final_norm(model, blocks_path)
    attn_module = block.get_submodule(attn)
    names = ("q_proj", "k_proj", "v_proj")
    qkv_proj = tuple(f"{attn}.{n}" for n in names) if all(hasattr(attn_module, n) for n in names) else None
    children = dict(block.named_children())
    attn_norm = next((n for n in ("input_layernorm", "ln_1") if n in children), None)
    mlp_norm = next((n for n in ("post_attention_layernorm", "ln_2") if n in children), None) if mlp else None
    return ArchMap(
        family=f"generic:{type(model).__name__}",
        blocks=blocks_path,
        embed=_path_of(model, embed_mod),
        unembed=_path_of(model, unembed_mod),
        final_norm=final_norm,
        attn=attn,
        o_proj=o_proj,
        attn_out=attn,
        mlp=mlp,
        mlp_down=mlp_down,
        mlp_out=mlp,
        n_layers=len(blocks),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_model=d_model,
        d_head=_cfg_int(cfg, "head_dim") or d_model // n_heads,
        d_mlp=_cfg_int(cfg, "intermediate_size", "n_inner", "ffn_dim"),
        parallel=bool(getattr(cfg, "use_parallel_residual", False) or getattr(cfg, "parallel_attn", False)),
        qkv="interface" if uses_interface else None,
        qkv_proj=qkv_proj,  # type: ignore[arg-type]
        attn_norm=attn_norm,
        mlp_norm=mlp_norm,
        notes=("discovered from module structure; check it with model.sites",),
    )
