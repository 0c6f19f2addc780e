"""What a patching sweep costs in memory, from the model's shapes: the chunk size a `max_memory=` budget allows.

A sweep holds, for its whole life, the base runs' state (`fixed`): the cone runner's block inputs and key/value
cache for every layer, the source run's cache of every patched site family, the logits at the scored positions
and the per-row results. Each chunk then adds, per token it runs (`per_token`), what one block call keeps alive
at its peak — hidden states and norms (≈ 6·d_model), queries/keys/values and head outputs with their rotary copies
(2·(2H + 2G)·d_head), attention scores and probabilities against every key (2·H·P), the MLP's hidden layer
(3·d_mlp) — plus, per row, the key/value cache of the prefix for every layer after the cone's start (at most
2·G·d_head·2P per layer) and the logits with the metric's temporaries (3·V), spread over the row's tokens. The
per-token figure is the worst over the sweep's cone starts (a one-position cone at the end pays a row's whole
prefix cache for one token; a sweep patching all positions at once starts every cone at 0 and needs none), so
every chunk fits. The base runs (one forward of all N·P tokens) must fit too.

`sweep_cost(...).tokens_for(budget)` is the `max_batch_tokens` a budget allows; the sweep then chunks exactly as
with that token count. These are estimates from shapes: `pathlens.memory.TensorPeak` measures the real peak,
and the tests check it stays under the budget.

Engines that run rows in chunks (edge patching's (circuit, prompt) rows, edge attribution's and integrated
gradients' (prompt, step) rows) describe their cost as a `RowCost` (state kept for every prompt, bytes per row,
the set-up's peak): `rows_for(budget)` is the rows per chunk, which they run as `max_batch_tokens` = rows × P.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pathlens.errors import PathlensError
from pathlens.memory import megabytes
from pathlens.model import Model
from pathlens.sites import Site

_HIDDEN_COPIES = 6  # block input, norm outputs, attention output, resid_mid, MLP output, block output
_ROTARY_COPIES = 2  # q/k/v and head outputs, and their rotated or reshaped copies
_SCORE_COPIES = 2  # attention scores and probabilities
_MLP_COPIES = 3  # gate, up and activation (gated MLPs); in, activation and a temporary otherwise
_LOGIT_COPIES = 3  # logits, and the metric's softmax / gathered temporaries


@dataclass(frozen=True)
class SweepCost:
    """Bytes a sweep holds throughout (`fixed`), per token of a chunk at its worst cone start (`per_token`), and
    at the peak of its base runs (`base_peak`, beyond `fixed`)."""

    fixed: int
    per_token: int
    base_peak: int
    seq_len: int

    @property
    def least(self) -> int:
        """The smallest budget that runs the sweep: its fixed state plus the larger of the base runs and one row."""
        return self.fixed + max(self.base_peak, self.per_token * self.seq_len)

    def tokens_for(self, budget: int) -> int:
        """The most tokens one chunk may hold under `budget` bytes; PathlensError if not even one row fits."""
        if budget < self.least:
            raise PathlensError(
                f"max_memory={megabytes(budget)} MB is too small for one row of this sweep: it needs at least "
                f"{megabytes(self.least)} MB ({megabytes(self.fixed)} MB of it the base runs' caches, which grow "
                "with the number of prompts and their length); raise max_memory, or patch fewer prompts or sites."
            )
        return max(self.seq_len, (budget - self.fixed) // self.per_token)

    def peak(self, max_batch_tokens: int) -> int:
        """The estimated peak of a sweep whose chunks hold at most `max_batch_tokens` tokens."""
        return self.fixed + max(self.base_peak, self.per_token * max(max_batch_tokens, self.seq_len))


def site_width(model: Model, site: Site, seq_len: int) -> int:
    """Values one (row, position) cell of a site family holds."""
    a = model.arch
    widths = {
        "head_z": a.n_heads * a.d_head,
        "head": a.n_heads * a.d_model,
        "q": a.n_heads * a.d_head,
        "k": a.n_kv_heads * a.d_head,
        "v": a.n_kv_heads * a.d_head,
        "mlp_post": a.d_mlp or 0,
        "attn_pattern": a.n_heads * seq_len,
    }
    return widths.get(site.kind, a.d_model)


def element_size(model: Model) -> int:
    """Bytes per activation value: the model's floating dtype."""
    dtype = next((p.dtype for p in model.hf.parameters() if p.is_floating_point()), torch.float32)
    return torch.empty(0, dtype=dtype).element_size()


def sweep_cost(
    model: Model, n: int, seq_len: int, families: Iterable[Site], n_variants: int, last_start: int | None = None
) -> SweepCost:
    """The memory cost of a sweep of `n_variants` variants of `n` prompts of `seq_len` tokens on `model`, patching
    the site `families` (as the sweep executes them), whose latest cone starts at position `last_start` (None:
    the worst, P − 1; 0 when every variant patches all positions, so no chunk needs a prefix cache)."""
    a = model.arch
    e = element_size(model)
    d, h, g, dh, layers = a.d_model, a.n_heads, a.n_kv_heads, a.d_head, a.n_layers
    vocab = model.vocab_size
    runner = layers * n * seq_len * (d + 2 * g * dh) + n * vocab + 2 * n * seq_len * dh
    cached = sum(layers * n * seq_len * site_width(model, f, seq_len) for f in set(families))
    source = cached + n * min(n, seq_len) * vocab  # logits at the scored positions only
    fixed = e * (runner + source) + 8 * n_variants * n
    activation = (
        _HIDDEN_COPIES * d + _ROTARY_COPIES * (2 * h + 2 * g) * dh + _SCORE_COPIES * h * seq_len
    ) + _MLP_COPIES * (a.d_mlp or 0)
    start = seq_len - 1 if last_start is None else min(max(last_start, 0), seq_len - 1)
    prefix_cache = layers * 2 * g * dh * 2 * seq_len if start > 0 else 0  # per row: every layer's keys and values
    per_token = e * (activation + (prefix_cache + _LOGIT_COPIES * vocab) // (seq_len - start))
    base_peak = e * (n * seq_len * activation + n * min(n, seq_len) * vocab)
    return SweepCost(fixed=fixed, per_token=per_token, base_peak=base_peak, seq_len=seq_len)


@dataclass(frozen=True)
class RowCost:
    """Bytes an engine that runs rows (circuit × prompt, prompt × step) in chunks holds throughout (`fixed`), per
    row of a chunk (`per_row`), and at the peak of its set-up runs (`setup_peak`, beyond `fixed`)."""

    fixed: int
    per_row: int
    setup_peak: int
    engine: str

    @property
    def least(self) -> int:
        """The smallest budget that runs the engine: its fixed state plus the larger of its set-up and one row."""
        return self.fixed + max(self.setup_peak, self.per_row)

    def rows_for(self, budget: int) -> int:
        """The most rows one chunk may hold under `budget` bytes; PathlensError if not even one row fits."""
        if budget < self.least:
            raise PathlensError(
                f"max_memory={megabytes(budget)} MB is too small for one row of {self.engine}: it needs at least "
                f"{megabytes(self.least)} MB ({megabytes(self.fixed)} MB of it state kept for every prompt, which "
                "grows with the number of prompts and their length); raise max_memory, or pass fewer prompts."
            )
        return max(1, (budget - self.fixed) // self.per_row)

    def peak(self, rows: int) -> int:
        """The estimated peak with chunks of at most `rows` rows."""
        return self.fixed + max(self.setup_peak, self.per_row * max(rows, 1))


def forward_activation(model: Model, seq_len: int) -> int:
    """Values one token of a forward keeps alive at the peak of a block call (see the module docstring)."""
    a = model.arch
    d, h, g, dh = a.d_model, a.n_heads, a.n_kv_heads, a.d_head
    hidden = _HIDDEN_COPIES * d + _ROTARY_COPIES * (2 * h + 2 * g) * dh + _SCORE_COPIES * h * seq_len
    return hidden + _MLP_COPIES * (a.d_mlp or 0)


def edge_patch_cost(model: Model, n: int, seq_len: int, n_senders: int, post_norm: bool) -> RowCost:
    """The memory cost of exact edge patching (`circuits.EdgePatcher`) of `n` prompts of `seq_len` tokens on a
    graph of `n_senders` senders; `post_norm`: the model has post-attention norms (linearised head writes kept).

    Fixed, per prompt token: the source run's sender outputs (input, head z, MLP outputs), the source residual
    before every read point and its normed copies, the row-wise modules' outputs on the source input, the
    gather buffer (one row of sender differences per prompt) and, with post-norms, every head's source write.
    Per row: the sender differences D (senders × d_model per token), every layer's recorded block input and
    attention output, one layer's corrected receiver inputs and their normed copies ((2H + 2G)·d_model per
    token, each twice), the forward itself, and the logits with the metric's temporaries (3·V per row). The
    set-up is one source forward caching those sites and the residual stream."""
    a = model.arch
    e = element_size(model)
    d, h, g, dh, layers = a.d_model, a.n_heads, a.n_kv_heads, a.d_head, a.n_layers
    mlp = a.mlp is not None
    sources = d + layers * (h * dh + (d if mlp else 0))
    residuals = (2 * layers + 1) * d  # source residual before each attention and MLP, and after the last block
    normed = 2 * layers * d
    known = layers * ((h + 2 * g) * dh + (d if mlp else 0))
    writes = layers * h * d if post_norm else 0
    per_token_fixed = sources + residuals + normed + known + writes + n_senders * d
    fixed = e * n * seq_len * per_token_fixed
    per_row_token = n_senders * d + 2 * layers * d + 2 * 2 * (h + 2 * g) * d + d + forward_activation(model, seq_len)
    per_row = e * (seq_len * per_row_token + _LOGIT_COPIES * model.vocab_size)
    run_cache = 2 * layers * d + (layers * d if post_norm else 0)
    setup_peak = e * n * (seq_len * (forward_activation(model, seq_len) + run_cache) + _LOGIT_COPIES * model.vocab_size)
    return RowCost(fixed=fixed, per_row=per_row, setup_peak=setup_peak, engine="edge patching")


def edge_attribution_cost(model: Model, n: int, seq_len: int, n_senders: int, post_norm: bool) -> RowCost:
    """The memory cost of edge attribution (`circuits.edge_attribution`) of `n` prompts of `seq_len` tokens with
    `n_senders` senders (intervention writes included); a row is one (prompt, interpolation step).

    Fixed, per prompt token: every sender's difference Δz (senders × d_model) and the base / source input
    residuals. Per row, a forward that keeps its graph for the backward pass: every layer's activations
    (`forward_activation`) and cached receiver inputs, the logits at every position with the metric's
    temporaries (3·V per token), the gradients at every receiver input (attention receivers' per-head gradients,
    (H + 2G)·d_model per token per layer, kept for every layer, and about three times one layer's of them while
    a batched backward runs), the backward's own temporaries (about two layers' activations) and the per-prompt
    copy of Δz the scores are summed against. The set-up runs the base and the source forward caching the sender
    outputs without grad (one block's activations at a time), then concatenates their differences (a second copy
    of Δz for a moment)."""
    a = model.arch
    e = element_size(model)
    d, h, g, dh, layers = a.d_model, a.n_heads, a.n_kv_heads, a.d_head, a.n_layers
    mlp_out = d if a.mlp is not None else 0
    activation = forward_activation(model, seq_len)
    fixed = e * n * seq_len * (n_senders + 2) * d
    cached = layers * (3 * d + (h + 2 * g) * dh) + d
    receivers = (h + 2 * g) * d
    grads = layers * (receivers + 2 * d + (h + 2 * g) * dh) + 3 * receivers
    per_token = layers * activation + cached + _LOGIT_COPIES * model.vocab_size + grads + 2 * activation
    per_row = e * seq_len * (per_token + n_senders * d)
    sites = d + layers * (h * dh + mlp_out + (d if post_norm else 0))
    setup = seq_len * (n_senders * d + 2 * sites + activation + _LOGIT_COPIES * model.vocab_size)
    return RowCost(fixed=fixed, per_row=per_row, setup_peak=e * n * setup, engine="edge attribution")


def integrated_gradients_cost(model: Model, n: int, seq_len: int, families: Iterable[Site]) -> RowCost:
    """The memory cost of activation integrated gradients (`attribution.integrated_gradients`) of `n` prompts of
    `seq_len` tokens over the site `families`; a row is one (prompt, step).

    Fixed, per prompt token: the base and the source run's logits at every position and their caches of every
    family, and, for the family being scored, its difference, gradient sum and product (three of its widths).
    Per row: a forward that keeps its graph for the backward (every layer's activations), the interpolated
    point and its gradient, the logits with the metric's temporaries (3·V per token) and the backward's own
    temporaries (about two layers' activations). The set-up is the base and source forwards."""
    a = model.arch
    e = element_size(model)
    widths = [site_width(model, f, seq_len) for f in set(families)]
    widest = max(widths, default=a.d_model)
    activation = forward_activation(model, seq_len)
    fixed = e * n * seq_len * (2 * model.vocab_size + 2 * sum(widths) + 3 * widest)
    per_token = (a.n_layers + 2) * activation + 3 * widest + _LOGIT_COPIES * model.vocab_size
    return RowCost(
        fixed=fixed,
        per_row=e * seq_len * per_token,
        setup_peak=e * n * seq_len * activation,
        engine="integrated gradients",
    )


def first_order_cost(
    model: Model, seq_len: int, families: Iterable[Site], n_variants: int, qk_layers: int = 0
) -> RowCost:
    """The memory cost of a first-order estimate (`attribution.atp`, `relp`, `atp_star`) of prompts of `seq_len`
    tokens over the site `families` (those the estimate caches, with AtP*'s patterns, queries and keys) scored as
    `n_variants` cells; `qk_layers` attention layers get AtP*'s exact softmax. A row is one prompt; the chunks
    keep nothing across them but their sums.

    Per row: the source run's logits and cache of every family, and the base run with its graph kept for the
    backward (every layer's activations, the logits with the metric's temporaries), the gradients at every
    family, the backward's own temporaries (about two layers' activations), the products (n_s − n_b)·∂m/∂n with
    their temporaries (four widths of every family in all), the per-variant effects (float64), and for each
    QK-fixed layer the changed softmax rows against every key (about six (H, P) copies per token)."""
    a = model.arch
    e = element_size(model)
    widths = sum(site_width(model, f, seq_len) for f in set(families))
    activation = forward_activation(model, seq_len)
    vocab = model.vocab_size
    per_token = (
        (a.n_layers + 2) * activation + (1 + _LOGIT_COPIES) * vocab + 4 * widths + qk_layers * 6 * a.n_heads * seq_len
    )
    return RowCost(
        fixed=0, per_row=e * seq_len * per_token + 8 * n_variants, setup_peak=0, engine="attribution patching"
    )


def prompt_chunk_for(cost_of: Callable[[int], RowCost], budget: int, rows_per_prompt: int, n: int) -> tuple[int, int]:
    """(prompts per chunk, rows per forward) under `budget` bytes for an engine run on chunks of whole prompts,
    whose cost for a chunk of k prompts is `cost_of(k)` (its state and set-up growing linearly with k) and whose
    prompts take `rows_per_prompt` rows each (integrated gradients' steps): the most prompts (up to `n`) whose
    rows fit one forward; if not even one prompt's do, one prompt per chunk with as many rows per forward as fit
    (PathlensError, naming the budget and the least it needs, if not even one row fits)."""
    one = cost_of(1)
    whole = one.fixed + max(one.setup_peak, one.per_row * rows_per_prompt)
    prompts = min(n, budget // whole)
    if prompts >= 1:
        return prompts, prompts * rows_per_prompt
    return 1, min(rows_per_prompt, one.rows_for(budget))
