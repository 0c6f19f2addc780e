"""A small attention-only transformer, packaged as a regular Hugging Face causal LM.

The architecture is a stack of pre-LayerNorm blocks that contain a single multi-head self-attention
sub-layer and no MLP, on top of learned token and absolute position embeddings. Without MLPs, every
computation is a composition of attention heads, which makes these models the standard testbed for
circuit discovery (e.g. the two-layer induction circuit).

The attention follows the conventions of ``LlamaAttention`` in transformers 5: the attention kernel is
looked up in ``ALL_ATTENTION_FUNCTIONS`` from ``config._attn_implementation`` (falling back to the
module-level :func:`eager_attention_forward`), and the mask is built with
``transformers.masking_utils.create_causal_mask``, so eager, sdpa, padding masks and
``output_attentions`` all behave like in any other transformers model.

Importing this module registers the config and model with ``AutoConfig`` and ``AutoModelForCausalLM``
under the model type ``"pathlens-attn-only"``.
"""

import inspect
from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

__all__ = [
    "AttnOnlyAttention",
    "AttnOnlyBlock",
    "AttnOnlyConfig",
    "AttnOnlyForCausalLM",
    "AttnOnlyModel",
    "AttnOnlyPreTrainedModel",
    "eager_attention_forward",
]

# transformers 5 renamed create_causal_mask's `past_key_values` to `cache` (the old name warns, then goes away):
# pass whichever name the installed version takes.
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@strict
class AttnOnlyConfig(PretrainedConfig):
    """Configuration of an attention-only transformer.

    Attributes:
        vocab_size: Number of token ids, including special tokens such as BOS.
        hidden_size: Width ``d`` of the residual stream.
        num_hidden_layers: Number of attention-only blocks.
        num_attention_heads: Heads per block; ``hidden_size`` must be divisible by it.
        max_position_embeddings: Number of learned absolute positions ``P`` (longest input).
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Standard deviation of the normal init of linear and embedding weights.
        bos_token_id: Id of the beginning-of-sequence token.
        pad_token_id: Id used for padding, if any (padding is handled by the attention mask).
        eos_token_id: Id of the end-of-sequence token, if any.
        tie_word_embeddings: Always ``False``: the unembedding is a separate matrix.
    """

    model_type = "pathlens-attn-only"

    vocab_size: int = 129
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def validate_architecture(self) -> None:
        """Reject head counts that do not divide the residual width."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})."
            )


def _embedding(value: nn.Module) -> nn.Embedding:
    """`value` if it is an ``nn.Embedding`` (the token embedding is looked up by id), else a TypeError."""
    if not isinstance(value, nn.Embedding):
        raise TypeError(f"the token embedding must be an nn.Embedding, got {type(value).__name__}.")
    return value


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention, the reference implementation the other kernels must match.

    Args:
        module: The calling attention module (only ``module.training`` is read, for dropout).
        query, key, value: ``(batch, heads, seq, head_dim)``.
        attention_mask: Additive float mask broadcastable to ``(batch, heads, q_len, k_len)``
            (``0`` where attention is allowed, a large negative number elsewhere), as returned by
            ``create_causal_mask`` for eager attention, or ``None``.
        scaling: Factor applied to the dot products, normally ``head_dim ** -0.5``.
        dropout: Dropout probability on the attention weights (only active in training mode).
        **kwargs: Extra keyword arguments of the attention interface, ignored here.

    The softmax runs in at least float32 (half-precision inputs are upcast as in Llama) but keeps
    float64 inputs in float64, so double-precision runs can be compared exactly against sdpa.

    Returns:
        ``attn_output`` of shape ``(batch, seq, heads, head_dim)`` and ``attn_weights`` of shape
        ``(batch, heads, q_len, k_len)``; the weights are returned so that ``output_attentions=True``
        can record them.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    softmax_dtype = torch.promote_types(query.dtype, torch.float32)
    attn_weights = nn.functional.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class AttnOnlyAttention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/o projections and no positional rotation.

    Positions enter the model only through the learned absolute position embeddings, so the
    query/key circuits read positional information straight from the residual stream.
    """

    def __init__(self, config: AttnOnlyConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=True)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over the (already normalised) residual stream.

        Args:
            hidden_states: ``(batch, seq, hidden_size)``.
            attention_mask: Mask from ``create_causal_mask`` in the format of the configured
                attention implementation, or ``None`` (pure causal attention).
            **kwargs: Forwarded to the attention interface (e.g. ``output_attentions``).

        Returns:
            The output projection ``(batch, seq, hidden_size)`` and the attention weights
            ``(batch, heads, seq, seq)`` (``None`` for kernels that do not materialise them).
            The input of ``o_proj`` is the concatenation of the per-head outputs, head ``h`` in
            columns ``[h * head_dim, (h + 1) * head_dim)``.
        """
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class AttnOnlyBlock(nn.Module):
    """Pre-LayerNorm residual block with attention only: ``x + self_attn(input_layernorm(x))``."""

    def __init__(self, config: AttnOnlyConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = AttnOnlyAttention(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Map the residual stream ``(batch, seq, hidden_size)`` to its updated value, same shape."""
        attn_output, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask, **kwargs)
        return hidden_states + attn_output


class AttnOnlyPreTrainedModel(PreTrainedModel):
    """Shared Hugging Face plumbing: config class, supported kernels and output recording."""

    config: AttnOnlyConfig
    config_class = AttnOnlyConfig
    base_model_prefix = "model"
    _no_split_modules = ["AttnOnlyBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": AttnOnlyBlock,
        "attentions": AttnOnlyAttention,
    }


class AttnOnlyModel(AttnOnlyPreTrainedModel):
    """Embeddings, attention-only blocks and the final LayerNorm (everything except the unembedding)."""

    def __init__(self, config: AttnOnlyConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([AttnOnlyBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``(vocab_size, hidden_size)``."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding (an ``nn.Embedding``, as ``get_input_embeddings`` returns)."""
        self.embed_tokens = _embedding(value)

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> BaseModelOutput:
        """Run the residual stream through all blocks.

        Args:
            input_ids: ``(batch, seq)`` token ids; exactly one of ``input_ids`` / ``inputs_embeds``.
            attention_mask: ``(batch, seq)`` with 1 for real tokens and 0 for padding, or ``None``.
            position_ids: ``(batch, seq)`` or ``(1, seq)`` absolute positions; defaults to
                ``0..seq-1`` (so right padding leaves the real tokens' positions untouched).
            inputs_embeds: ``(batch, seq, hidden_size)`` token embeddings used instead of
                ``embed_tokens(input_ids)``, e.g. for gradient-based attribution; position
                embeddings are still added.
            **kwargs: ``output_attentions`` / ``output_hidden_states`` and attention-kernel options.

        Returns:
            ``last_hidden_state`` ``(batch, seq, hidden_size)`` after the final LayerNorm, plus the
            recorded ``hidden_states`` / ``attentions`` tuples when requested.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        positions = (
            torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
            if position_ids is None
            else position_ids
        )

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            **{_MASK_CACHE_ARG: None},
        )

        hidden_states = inputs_embeds + self.embed_positions(positions)
        for block in self.layers:
            hidden_states = block(hidden_states, attention_mask=causal_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class AttnOnlyForCausalLM(AttnOnlyPreTrainedModel):
    """:class:`AttnOnlyModel` followed by an untied, bias-free unembedding ``lm_head``."""

    def __init__(self, config: AttnOnlyConfig) -> None:
        super().__init__(config)
        self.model = AttnOnlyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``(vocab_size, hidden_size)``."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding (an ``nn.Embedding``, as ``get_input_embeddings`` returns)."""
        self.model.embed_tokens = _embedding(value)

    def get_output_embeddings(self) -> nn.Linear:
        """The unembedding ``lm_head`` (weight ``(vocab_size, hidden_size)``)."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the unembedding."""
        self.lm_head = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> CausalLMOutput:
        """Next-token logits, and the shifted cross-entropy when ``labels`` are given.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            attention_mask: ``(batch, seq)`` padding mask (1 = real token), or ``None``.
            labels: ``(batch, seq)`` targets aligned with ``input_ids`` (shifted internally);
                ``-100`` marks positions excluded from the loss.
            position_ids: Optional ``(batch, seq)`` absolute positions.
            inputs_embeds: Optional ``(batch, seq, hidden_size)`` token embeddings.
            **kwargs: Forwarded to :class:`AttnOnlyModel` (``output_attentions``, ...).

        Returns:
            ``CausalLMOutput`` with ``logits`` ``(batch, seq, vocab_size)``, ``loss`` (scalar or
            ``None``) and the optional ``hidden_states`` / ``attentions``.
        """
        outputs: BaseModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


AutoConfig.register(AttnOnlyConfig.model_type, AttnOnlyConfig, exist_ok=True)
AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM, exist_ok=True)
