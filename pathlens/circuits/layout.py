"""The edge graph's layout for one model: which senders write into the residual stream, which receivers read it,
which sender precedes which receiver, and each layer's q/k/v projections per receiver.

Senders: the input embedding, every head, every MLP. Receivers: every head's query, every key-value group's key
and value, every MLP, the logits. A receiver reads the senders before it (in a parallel block the MLP reads only
the senders before its layer's attention). Edge attribution (`pathlens.circuits.edge_attribution`), edge patching and
path patching all index their sender × receiver matrices by this one layout.

Gemma 2/3 normalise each sublayer's output before adding it to the residual stream (sandwich norms), so the
heads of a layer write g ⊙ (Σ_h z_h W_O[h]) / σ together, not a sum of per-head terms. `post_norms` linearises
that norm: holding σ at its value in each run, head h writes (g / σ) ⊙ z_h W_O[h] (`PostNorm.head_writes`), so
every run's residual stream is again the sum of its senders' writes and edges are defined. The MLP, the only
sender behind its post-norm, writes the norm's output itself, so nothing changes for it. Graphs scored this
way say so (`linearisation_meta`); node patching stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pathlens.arch.base import get_module, own_tensor, weight_out_in
from pathlens.arch.norms import norm_parts
from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.sites import Site


@dataclass(frozen=True)
class Layout:
    """Names and positions of the graph's senders and receivers for one model."""

    senders: list[str]
    receivers: list[str]
    sender_stop: list[int]  # senders [0, stop) precede layer L's attention (index L); [L_total] = all
    mlp_sender_stop: list[int]  # senders preceding layer L's MLP
    attn_cols: list[slice]  # receiver columns of layer L's q, k, v inputs
    mlp_col: list[int | None]  # receiver column of layer L's MLP


def graph_layout(model: Model) -> Layout:
    """The senders and receivers of `model`'s graph, in the order every sender × receiver matrix uses."""
    a = model.arch
    h, g = a.n_heads, a.n_kv_heads
    kv_letter = "H" if g == h else "G"
    senders: list[str] = ["input"]
    receivers: list[str] = []
    sender_stop: list[int] = []
    mlp_stop: list[int] = []
    attn_cols: list[slice] = []
    mlp_col: list[int | None] = []
    for layer in range(a.n_layers):
        sender_stop.append(len(senders))
        first = len(receivers)
        receivers += [f"L{layer}.H{i}.q" for i in range(h)]
        receivers += [f"L{layer}.{kv_letter}{i}.k" for i in range(g)]
        receivers += [f"L{layer}.{kv_letter}{i}.v" for i in range(g)]
        attn_cols.append(slice(first, len(receivers)))
        senders += [f"L{layer}.H{i}" for i in range(h)]
        if a.mlp is None:
            mlp_stop.append(len(senders))
            mlp_col.append(None)
            continue
        mlp_stop.append(sender_stop[-1] if a.parallel else len(senders))
        mlp_col.append(len(receivers))
        receivers.append(f"L{layer}.mlp")
        senders.append(f"L{layer}.mlp")
    sender_stop.append(len(senders))
    receivers.append("logits")
    return Layout(senders, receivers, sender_stop, mlp_stop, attn_cols, mlp_col)


def check_supported(model: Model) -> None:
    """Raise a PathlensError naming the fix if `model`'s graph has no well-defined edges."""
    a = model.arch
    if a.qkv_proj is None:
        raise PathlensError(
            f"edge attribution needs the q/k/v projection layers of {a.family}; pass an ArchMap with qkv_proj= "
            "and qkv_layout=."
        )


LINEARISATION_NOTE = (
    "linearised post-sublayer norms: each attention output norm's scale is held at its value in each run, so a "
    "head writes (g / σ) ⊙ z_h W_O[h]; edge scores and edge-patched metrics are exact for this linearised "
    "model, node patching is exact for the real one"
)


@dataclass(frozen=True)
class PostNorm:
    """A norm applied to the sum of a layer's head outputs before it enters the residual stream, y = g ⊙ (x −
    [mean x]) / σ(x) + b, measured by probing (`pathlens.arch.norms.norm_parts`, which covers Gemma's (1 + w)
    gain). Holding σ at one run's value makes it linear in x, so each head's share is a sum term."""

    centers: bool
    gain: Tensor  # (d_model,) float64
    eps: float

    def head_writes(self, z: Tensor, w_o: Tensor, total: Tensor) -> Tensor:
        """Each head's write (H, B, P, d) = g ⊙ (c_h − [mean c_h]) / σ(total), c_h = z_h W_O[h], for head
        outputs `z` (B, P, H, d_head), per-head output weights `w_o` (H, d_head, d) and the norm's input in the
        same run `total` (B, P, d) (the output projection's output, bias included)."""
        parts = torch.einsum("bphe,hed->hbpd", z, w_o.to(z.dtype))
        return self.linearised(parts, total)

    def linearised(self, parts: Tensor, total: Tensor) -> Tensor:
        """Shares `parts` (A, ..., d) of the norm input `total` (..., d) through the norm with σ held at
        σ(total): g ⊙ (part − [mean part]) / σ(total), in the dtype of `parts`."""
        dtype = torch.promote_types(total.dtype, torch.float32)  # the norm's own precision, at least float32
        x, shares = total.to(dtype), parts.to(dtype)
        if self.centers:
            x = x - x.mean(dim=-1, keepdim=True)
            shares = shares - shares.mean(dim=-1, keepdim=True)
        scale = self.gain.to(dtype) * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (shares * scale).to(parts.dtype)


def post_norms(model: Model) -> list[PostNorm] | None:
    """Per layer, the norm between the heads' output projection and the residual stream (Gemma 2/3's
    post_attention_layernorm, the ArchMap's attn_out when that module is a norm); None for models without one,
    whose heads' writes are plain sum terms."""
    a = model.arch
    blocks = [get_module(model.hf, f"{a.blocks}.{layer}") for layer in range(a.n_layers)]
    modules = [get_module(block, a.attn_out) for block in blocks]
    is_norm = [type(m).__name__.endswith("Norm") for m in modules]
    if not any(is_norm):
        return None
    if not all(is_norm):
        raise PathlensError(
            f"{a.family}: attn_out ({a.attn_out}) is a norm in layers {[i for i, n in enumerate(is_norm) if n]} "
            "only; edges are defined when every layer has one or none has. Use node-level attribution (atp / relp) "
            "for this model."
        )
    out = []
    for module in modules:
        centers, gain, eps = norm_parts(module, a.d_model)
        out.append(PostNorm(centers, gain, eps))
    return out


def o_proj_output(model: Model, layer: int) -> Site:
    """The output of layer `layer`'s head output projection: the input of its post-attention norm."""
    return Site("module", path=f"{model.arch.blocks}.{layer}.{model.arch.o_proj}")


def linearisation_meta(model: Model) -> dict[str, object]:
    """What a Graph of `model` records about linearised post-norms: nothing for models without them."""
    if post_norms(model) is None:
        return {}
    return {"linearised_post_norms": True, "linearisation": LINEARISATION_NOTE}


class QKV:
    """One layer's q/k/v projections: which module outputs to read, and how to turn the gradient at them into
    per-receiver gradients at the projection input, (B, P, H + 2G, d_model), in the receiver order q, k, v."""

    def __init__(self, model: Model, layer: int):
        a = model.arch
        assert a.qkv_proj is not None
        block = f"{a.blocks}.{layer}"
        self.h, self.g, self.dh, self.layout = a.n_heads, a.n_kv_heads, a.d_head, a.qkv_layout
        self.paths = list(dict.fromkeys(f"{block}.{p}" for p in a.qkv_proj))
        modules = [get_module(model.hf, p) for p in self.paths]
        weights = [weight_out_in(m, "q/k/v projection (ArchMap qkv_proj)").detach() for m in modules]
        d = weights[0].shape[1]
        self.cols, self.part_module = self._columns(), [0, 1, 2] if self.layout == "separate" else [0, 0, 0]
        biases: list[Tensor | None] = [
            None if getattr(m, "bias", None) is None else own_tensor(m, "bias") for m in modules
        ]
        part_bias = (biases[i] for i in self.part_module)
        self.bias = [None if b is None else b.detach()[c] for b, c in zip(part_bias, self.cols, strict=True)]
        if self.layout == "separate":
            wq, wk, wv = weights
            self.w = [wq.view(self.h, self.dh, d), wk.view(self.g, self.dh, d), wv.view(self.g, self.dh, d)]
        elif self.layout == "fused":
            q_end, k_end = self.h * self.dh, (self.h + self.g) * self.dh
            (w,) = weights
            self.w = [
                w[:q_end].view(self.h, self.dh, d),
                w[q_end:k_end].view(self.g, self.dh, d),
                w[k_end:].view(self.g, self.dh, d),
            ]
        elif self.layout == "interleaved":
            (w,) = weights
            per_head = w.view(self.h, 3, self.dh, d)
            self.w = [per_head[:, 0], per_head[:, 1], per_head[:, 2]]
        else:
            raise PathlensError(f"unknown qkv_layout {self.layout!r}; use 'separate', 'fused' or 'interleaved'.")

    def _columns(self) -> list[Tensor]:
        """Output columns (receivers, d_head) of q, k and v in their module's output."""
        h, g, dh = self.h, self.g, self.dh
        if self.layout == "separate":
            return [
                torch.arange(h * dh).view(h, dh),
                torch.arange(g * dh).view(g, dh),
                torch.arange(g * dh).view(g, dh),
            ]
        if self.layout == "fused":
            return [
                torch.arange(h * dh).view(h, dh),
                h * dh + torch.arange(g * dh).view(g, dh),
                (h + g) * dh + torch.arange(g * dh).view(g, dh),
            ]
        per_head = torch.arange(h * 3 * dh).view(h, 3, dh)
        return [per_head[:, 0], per_head[:, 1], per_head[:, 2]]

    def project(self, part: int, y: Tensor, receivers: Tensor) -> Tensor:
        """Projection `part` (0 = q, 1 = k, 2 = v) of per-receiver inputs (R, B, P, d) → (R, B, P, d_head), for the
        R receivers `receivers` (indices among the part's heads or key-value groups)."""
        w = self.w[part][receivers].to(y.dtype)
        out = torch.bmm(y.flatten(1, 2), w.transpose(1, 2)).view(*y.shape[:3], -1)
        bias = self.bias[part]
        return out if bias is None else out + bias[receivers][:, None, None].to(y.dtype)

    @property
    def sites(self) -> list[Site]:
        return [Site("module", path=p) for p in self.paths]

    def input_grads(self, grads: list[Tensor]) -> Tensor:
        """Gradients at the projection outputs (one per module) → (B, P, H + 2G, d_model) at its input."""
        b, p = grads[0].shape[:2]
        if self.layout == "separate":
            gq, gk, gv = (x.view(b, p, -1, self.dh) for x in grads)
        elif self.layout == "fused":
            (x,) = grads
            gq, gk, gv = x.split([self.h * self.dh, self.g * self.dh, self.g * self.dh], dim=-1)
            gq, gk, gv = (t.reshape(b, p, -1, self.dh) for t in (gq, gk, gv))
        else:
            (x,) = grads
            per_head = x.view(b, p, self.h, 3, self.dh)
            gq, gk, gv = per_head[:, :, :, 0], per_head[:, :, :, 1], per_head[:, :, :, 2]
        parts = [torch.einsum("bphe,hed->bphd", gx, w.to(gx.dtype)) for gx, w in zip((gq, gk, gv), self.w, strict=True)]
        return torch.cat(parts, dim=2)


def valid_mask(layout: Layout, n_layers: int) -> Tensor:
    """(senders, receivers) bool: True where the sender precedes the receiver, i.e. where an edge exists."""
    mask = torch.zeros(len(layout.senders), len(layout.receivers), dtype=torch.bool)
    for layer, cols in enumerate(layout.attn_cols):
        mask[: layout.sender_stop[layer], cols] = True
        col = layout.mlp_col[layer]
        if col is not None:
            mask[: layout.mlp_sender_stop[layer], col] = True
    mask[:, -1] = True
    return mask
