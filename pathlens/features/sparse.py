"""Sparse latent codes for training TopK dictionaries: gather only the chosen pre-activations, decode only the
active decoder rows, and backpropagate through just those entries.

A TopK dictionary keeps k of `width` latents per token (k = 32 of 4608 in the SmolLM2 benchmark). Training it
densely spends five of its six (n, d)·(d, width)-sized matmuls on zeros: the decoder forward f·W_dec, its two
gradients, and the encoder's two gradients, which all multiply a (n, width) matrix with k non-zeros per row.
Here a code is a pair (values (n, m), indices (n, m)) of m latents per token, and

    gather_pre_acts   values = z[b, indices[b]]        z = (x·s − b_dec) W_enc + b_enc, computed by the caller
    decode_at         out[b] = Σ_j values[b, j] · W_dec[indices[b, j]]

carry hand-written backwards that touch n·m entries: the encoder's gradients are a scatter-add of m scaled
input rows per token into W_enc's columns (a sparse (width, n) × (n, d) product) and, since every token's
centred input subtracts the same b_dec, b_dec's gradient is −W_enc · (b_enc's gradient); the decoder's are a
sampled product ⟨grad_b, W_dec[j]⟩ at the code's entries and a scatter-add into W_dec's rows. Only the
encoder's forward matmul, which top-k needs in full, stays dense. The results equal the dense computation up to
float32 summation order (tests/test_sae.py compares both).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


def gather_pre_acts(
    centered: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, z: Tensor, indices: Tensor
) -> Tensor:
    """z gathered at `indices` (n, m), differentiable in W_enc, b_enc and (an autoencoder's) b_dec.

    centered (n, d_in): the encoder's input x·s − b_dec (x·s for a transcoder, whose b_dec is then None), without
    gradient; z (n, width): centered·W_enc + b_enc, computed by the caller without gradient (top-k needs it all);
    indices (n, m): the latents to keep, each row's entries distinct. The gradient does not reach `centered`."""
    return GatherPreActs.apply(centered, W_enc, b_enc, b_dec, z, indices)  # type: ignore[no-any-return]


def decode_at(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[:, j] · W_dec[indices[:, j]] (n, d_out), without b_dec; differentiable in values and W_dec.
    indices (n, m): each row's entries distinct."""
    return DecodeAt.apply(values, indices, W_dec)  # type: ignore[no-any-return]


def token_major(indices: Tensor, values: Tensor, width: int) -> Tensor:
    """The code as a sparse CSR matrix (n, width): row b holds values[b] at columns indices[b]."""
    n, m = indices.shape
    crow = torch.arange(0, n * m + 1, m, device=indices.device)  # (n + 1,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow, indices.reshape(-1), values.reshape(-1), (n, width), check_invariants=False
        )


def latent_major(indices: Tensor, values: Tensor, width: int) -> Tensor:
    """The code's transpose as a sparse CSR matrix (width, n): row j holds, for every token b that keeps latent j,
    values[b, j'] at column b (tokens in increasing order)."""
    n, m = indices.shape
    flat = indices.reshape(-1)  # (n·m,)
    # grouped by latent, tokens ascending within a group; sorted as one row of a 2-D tensor, since torch's
    # multithreaded 1-D sort takes ~100× longer (180 ms vs 1.7 ms for 32k entries on 2 busy cores)
    order = torch.argsort(flat.unsqueeze(0), dim=1, stable=True).squeeze(0)  # (n·m,)
    crow = torch.zeros(width + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.cumsum(torch.bincount(flat, minlength=width), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, order // m, values.reshape(-1)[order], (width, n), check_invariants=False)


class GatherPreActs(torch.autograd.Function):
    """See `gather_pre_acts`. Backward, with G the (n, width) matrix holding the incoming gradient at the code's
    entries: ∂W_enc = centeredᵀ G (a scatter-add), ∂b_enc = Σ_b G_b, ∂b_dec = −W_enc ∂b_enc."""

    @staticmethod
    def forward(
        ctx: Any, centered: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, z: Tensor, indices: Tensor
    ) -> Tensor:
        ctx.save_for_backward(centered, W_enc, indices)
        ctx.shifted = b_dec is not None
        return z.gather(1, indices)  # (n, m)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        centered, W_enc, indices = ctx.saved_tensors
        width = int(W_enc.shape[1])
        grad = grad.contiguous()  # (n, m)
        grad_w = grad_b = grad_shift = None
        if ctx.needs_input_grad[1]:
            grad_w = (latent_major(indices, grad, width) @ centered).T  # (d_in, width)
        if ctx.needs_input_grad[2] or ctx.shifted:
            grad_b = torch.zeros(width, dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))  # (width,)
            if ctx.shifted and ctx.needs_input_grad[3]:
                grad_shift = -(W_enc @ grad_b)  # (d_in,)
        return None, grad_w, grad_b if ctx.needs_input_grad[2] else None, grad_shift, None, None


class DecodeAt(torch.autograd.Function):
    """See `decode_at`. Forward: an embedding bag (sum of the m weighted rows). Backward: ∂values[b, j] =
    ⟨grad_b, W_dec[indices[b, j]]⟩ (a sampled matmul) and ∂W_dec = Gᵀ grad with G the code as a (n, width)
    matrix (a scatter-add of m scaled gradient rows per token)."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")  # (n, d_out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        values, indices, W_dec = ctx.saved_tensors
        width = int(W_dec.shape[0])
        grad = grad.contiguous()  # (n, d_out)
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            pattern = token_major(indices, torch.zeros_like(values), width)
            sampled = torch.sparse.sampled_addmm(pattern, grad, W_dec.T, beta=0.0)  # ⟨grad_b, W_dec[j]⟩ at the code
            grad_values = sampled.values().view_as(values)  # (n, m)
        if ctx.needs_input_grad[2]:
            grad_w = latent_major(indices, values.contiguous(), width) @ grad  # (width, d_out)
        return grad_values, None, grad_w
