"""Hand-built one-layer Llama models for the subspace tests, where the right answer is known by construction.

Every prompt is [BOS, X]: the token X carries the features, attention writes nothing (W_O = 0), and the MLP
hidden state (`L0.mlp_post`) is h = silu(c)·(W_up n(X)) with one constant gate, so h is linear in the token's
features. Two answer tokens T0, T1 are read from residual dim 1 by the unembedding (±β).

- `illusion_model(illusion=True)`: the paper's distilled example (METHODS-VERIFIED §2). Neuron 0 carries the
  feature x (it varies with the token) but W_down never reads it (disconnected); neuron 1 is always exactly 0 on
  the data (its up-projection is zero) but W_down reads it into dim 1 with weight w (dormant); the answer comes
  from a bypass (the embedding writes γ(2x − 1) into dim 1). Neuron 2 is constant on the data and read into a
  dimension the unembedding ignores (so W_down has rank 2 of 3). Patching the whole MLP hidden state changes nothing;
  patching along (e0 + e1)/√2 moves the output.
- `illusion_model(illusion=False)`: the control — W_down reads neuron 0 (the feature) and not neuron 1, so the
  feature's own direction is faithful.
- `planted_model()`: h spans R^6 isotropically (the 64 tokens are all ±1 patterns, W_up orthogonal) and the
  output reads h only along a random planted unit direction u: DAS must find ±u.
"""

from __future__ import annotations

import torch
import transformers

from pathlens import Model
from pathlens.tasks import Task
from pathlens.tasks.counterfactual import counterfactual_task

BOS, T0, T1 = 1, 2, 3
FIRST = 4  # first feature token


def _llama(vocab: int, d_mlp: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        hidden_size=8,
        intermediate_size=d_mlp,
        vocab_size=vocab,
        max_position_embeddings=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=BOS,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        attn = hf.model.layers[0].self_attn
        attn.q_proj.weight.normal_(0, 0.5)  # attention reads something, but W_O = 0: it writes nothing
        attn.k_proj.weight.normal_(0, 0.5)
        attn.v_proj.weight.normal_(0, 0.5)
        hf.model.embed_tokens.weight[BOS, 0] = 1.0
        hf.lm_head.weight[T1, 1] = 1.0
        hf.lm_head.weight[T0, 1] = -1.0
    return hf


def _set_embeddings(hf: transformers.LlamaForCausalLM, rows: torch.Tensor) -> None:
    """Feature tokens FIRST.. get `rows` (n, 8) scaled to norm √8 (RMS 1, so the norms are the identity)."""
    with torch.no_grad():
        scaled = rows / rows.norm(dim=1, keepdim=True) * 8**0.5
        hf.model.embed_tokens.weight[FIRST : FIRST + len(rows)] = scaled


def illusion_model(illusion: bool = True, w: float = 2.0, gamma: float = 1.0, n_tokens: int = 24) -> Model:
    """The distilled illusion (illusion=True) or its faithful control; token FIRST + i has x = i % 2."""
    gen = torch.Generator().manual_seed(0)
    hf = _llama(FIRST + n_tokens, d_mlp=3)
    x = torch.arange(n_tokens) % 2
    rows = torch.zeros(n_tokens, 8)
    rows[:, 0] = 1.0
    rows[:, 1] = gamma * (2 * x - 1)  # the bypass: the answer is written straight into dim 1
    rows[:, 2] = 2 * x - 1  # the feature, read by neuron 0
    noise = torch.randn(n_tokens, 5, generator=gen)
    rows[:, 3:] = 0.5 * noise / noise.norm(dim=1, keepdim=True)  # every row has one norm: n(X)_0 is constant
    _set_embeddings(hf, rows)
    mlp = hf.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[:, 0] = 8.0  # silu(8·n0) ≈ 8: the same multiplier for every neuron and token
        mlp.up_proj.weight[0, 2] = 0.5  # neuron 0: the feature; neuron 1: up-projection 0, so always exactly 0
        mlp.up_proj.weight[2, 0] = 0.1  # neuron 2: constant on the data, read into dim 5 (unread by the unembedding)
        mlp.down_proj.weight[1, 1 if illusion else 0] = w
        mlp.down_proj.weight[5, 2] = 0.5
    return Model(hf, name="toy-illusion" if illusion else "toy-control")


def illusion_task(n: int = 64, seed: int = 0, n_tokens: int = 24) -> Task:
    """Pairs of tokens with different x: the label is the source's answer (T1 for x = 1)."""
    gen = torch.Generator().manual_seed(seed)
    base_tok = FIRST + torch.randint(0, n_tokens, (n,), generator=gen)
    source_tok = FIRST + torch.randint(0, n_tokens // 2, (n,), generator=gen) * 2 + (1 - (base_tok - FIRST) % 2)
    answer = torch.where((base_tok - FIRST) % 2 == 1, T1, T0)
    label = torch.where((source_tok - FIRST) % 2 == 1, T1, T0)
    bases = torch.stack([torch.full((n,), BOS), base_tok], dim=1)
    sources = torch.stack([torch.full((n,), BOS), source_tok], dim=1)
    return counterfactual_task(bases, sources, label.tolist(), answer.tolist(), (T0 + T1 - answer).tolist(), name="toy")


def planted_model(seed: int = 0, w: float = 1.0) -> tuple[Model, torch.Tensor]:
    """A model reading its 6-dim MLP hidden state only along a random unit direction u; returns (model, u)."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.tensor([[1.0 if (i >> b) & 1 else -1.0 for b in range(6)] for i in range(64)])  # (64, 6)
    hf = _llama(FIRST + 64, d_mlp=6)
    rows = torch.zeros(64, 8)
    rows[:, 0] = 1.0
    rows[:, 2:] = patterns
    _set_embeddings(hf, rows)
    up = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64)).Q.float()
    u = torch.randn(6, generator=gen, dtype=torch.float64)
    u = (u / u.norm()).float()
    mlp = hf.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[:, 0] = 8.0
        mlp.up_proj.weight[:, 2:] = up
        mlp.down_proj.weight[1] = w * u
    return Model(hf, name="toy-planted"), u


def planted_task(model: Model, u: torch.Tensor, n: int = 200, seed: int = 0) -> Task:
    """Random base/source token pairs, each labelled by the sign of u·h of its own prompt; the counterfactual
    label is the source's answer."""
    from pathlens.subspace.reads import answer_values

    everything = torch.arange(FIRST, FIRST + 64)
    probe = counterfactual_task(
        torch.stack([torch.full((64,), BOS), everything], 1),
        torch.stack([torch.full((64,), BOS), everything], 1),
        [T0] * 64,
        [T0] * 64,
        [T1] * 64,
    )
    score = answer_values(model, probe, "L0.mlp_post") @ u  # (64,)
    usable = everything[score.abs() > 0.2 * score.abs().max()]
    gen = torch.Generator().manual_seed(seed)
    base = usable[torch.randint(0, len(usable), (n,), generator=gen)]
    source = usable[torch.randint(0, len(usable), (n,), generator=gen)]
    side = dict(zip(everything.tolist(), (score > 0).tolist(), strict=True))
    answer = [T1 if side[int(t)] else T0 for t in base]
    label = [T1 if side[int(t)] else T0 for t in source]
    bos = torch.full((n,), BOS)
    return counterfactual_task(
        torch.stack([bos, base], 1), torch.stack([bos, source], 1), label, answer, [T0 + T1 - a for a in answer]
    )
