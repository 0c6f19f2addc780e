"""Architecture maps of the supported transformers families, keyed by `config.model_type`.

Each builder reads sizes from the config; module paths follow transformers 5.x. A family not listed here is
tried by `pathlens.arch.generic.infer_arch`, and a user can always pass an `ArchMap` of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pathlens.arch.base import ArchMap


def _head_dim(cfg: Any, n_heads: int, d_model: int) -> int:
    return int(getattr(cfg, "head_dim", None) or d_model // n_heads)


def gpt2(cfg: Any) -> ArchMap:
    d, h = cfg.n_embd, cfg.n_head
    return ArchMap(
        family="gpt2",
        blocks="transformer.h",
        embed="transformer.wte",
        unembed="lm_head",
        final_norm="transformer.ln_f",
        attn="attn",
        o_proj="attn.c_proj",
        attn_out="attn",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        mlp_out="mlp",
        n_layers=cfg.n_layer,
        n_heads=h,
        n_kv_heads=h,
        d_model=d,
        d_head=d // h,
        d_mlp=cfg.n_inner or 4 * d,
        qkv_proj=("attn.c_attn",) * 3,
        qkv_layout="fused",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        notes=("resid_pre[0] includes the learned position embedding (wpe); 'embed' is the token embedding only",),
    )


def gpt_neo(cfg: Any) -> ArchMap:
    d, h = cfg.hidden_size, cfg.num_heads
    return ArchMap(
        family="gpt_neo",
        blocks="transformer.h",
        embed="transformer.wte",
        unembed="lm_head",
        final_norm="transformer.ln_f",
        attn="attn.attention",
        o_proj="attn.attention.out_proj",
        attn_out="attn",
        mlp="mlp",
        mlp_down="mlp.c_proj",
        mlp_out="mlp",
        n_layers=cfg.num_layers,
        n_heads=h,
        n_kv_heads=h,
        d_model=d,
        d_head=d // h,
        d_mlp=cfg.intermediate_size or 4 * d,
        qkv="projections",
        qkv_proj=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
        attn_norm="ln_1",
        mlp_norm="ln_2",
        notes=("q/k/v are the projection outputs (GPT-Neo has no rotary embedding); attention patterns are read-only",),
    )


def gpt_neox(cfg: Any) -> ArchMap:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    return ArchMap(
        family="gpt_neox",
        blocks="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        unembed="lm_head",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        o_proj="attention.dense",
        attn_out="attention",
        mlp="mlp",
        mlp_down="mlp.dense_4h_to_h",
        mlp_out="mlp",
        n_layers=cfg.num_hidden_layers,
        n_heads=h,
        n_kv_heads=h,
        d_model=d,
        d_head=d // h,
        d_mlp=cfg.intermediate_size,
        parallel=bool(cfg.use_parallel_residual),
        qkv_proj=("attention.query_key_value",) * 3,
        qkv_layout="interleaved",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
    )


def llama_like(cfg: Any, family: str, sandwich_norms: bool = False) -> ArchMap:
    """Llama, Mistral, Qwen2/3 and Gemma 2/3: `model.layers[L].self_attn.o_proj`, `mlp.down_proj`.

    Gemma 2/3 normalize each sublayer's output before adding it to the residual stream ("sandwich" norms):
    attn_out / mlp_out are then the outputs of post_attention_layernorm / post_feedforward_layernorm, and the
    heads sum to the o_proj output rather than to attn_out.
    """
    d, h = cfg.hidden_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or h
    return ArchMap(
        family=family,
        blocks="model.layers",
        embed="model.embed_tokens",
        unembed="lm_head",
        final_norm="model.norm",
        attn="self_attn",
        o_proj="self_attn.o_proj",
        attn_out="post_attention_layernorm" if sandwich_norms else "self_attn",
        mlp="mlp",
        mlp_down="mlp.down_proj",
        mlp_out="post_feedforward_layernorm" if sandwich_norms else "mlp",
        n_layers=cfg.num_hidden_layers,
        n_heads=h,
        n_kv_heads=kv,
        d_model=d,
        d_head=_head_dim(cfg, h, d),
        d_mlp=cfg.intermediate_size,
        qkv_proj=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_norm="input_layernorm",
        mlp_norm="pre_feedforward_layernorm" if sandwich_norms else "post_attention_layernorm",
        notes=("heads sum to the o_proj output; attn_out is post_attention_layernorm(o_proj output)",)
        if sandwich_norms
        else (),
    )


def attn_only(cfg: Any) -> ArchMap:
    """pathlens' own attention-only models (pathlens.zoo.attn_only): no MLP sites."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    return ArchMap(
        family="pathlens-attn-only",
        blocks="model.layers",
        embed="model.embed_tokens",
        unembed="lm_head",
        final_norm="model.norm",
        attn="self_attn",
        o_proj="self_attn.o_proj",
        attn_out="self_attn",
        mlp=None,
        mlp_down=None,
        mlp_out=None,
        n_layers=cfg.num_hidden_layers,
        n_heads=h,
        n_kv_heads=h,
        d_model=d,
        d_head=d // h,
        d_mlp=None,
        qkv_proj=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_norm="input_layernorm",
        notes=("resid_pre[0] includes the learned position embedding; 'embed' is the token embedding only",),
    )


FAMILIES: dict[str, Callable[[Any], ArchMap]] = {
    "gpt2": gpt2,
    "gpt_neo": gpt_neo,
    "gpt_neox": gpt_neox,
    "llama": lambda c: llama_like(c, "llama"),
    "mistral": lambda c: llama_like(c, "mistral"),
    "qwen2": lambda c: llama_like(c, "qwen2"),
    "qwen3": lambda c: llama_like(c, "qwen3"),
    "smollm3": lambda c: llama_like(c, "smollm3"),
    "gemma2": lambda c: llama_like(c, "gemma2", sandwich_norms=True),
    "gemma3_text": lambda c: llama_like(c, "gemma3", sandwich_norms=True),
    "pathlens-attn-only": attn_only,
}
