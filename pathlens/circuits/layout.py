"""The edge graph's layout for one model: which senders write into the residual stream, which receivers read it,
which sender precedes which receiver, and each layer's q/k/v projections per receiver.

Senders: the input embedding, every head, every MLP. Receivers: every head's query, every key-value group's key
and value, every MLP, the logits. A receiver reads the senders before it (in a parallel block the MLP reads only
the senders before its layer's attention). Edge attribution (`pathlens.circuits.edge_attribution`), edge patching and
path patching all index their sender × receiver matrices by this one layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pathlens.arch.base import get_module, weight_out_in
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
    block = get_module(model.hf, f"{a.blocks}.0")
    writers = [a.attn_out] + ([a.mlp_out] if a.mlp_out else [])
    if any(type(get_module(block, path)).__name__.endswith("Norm") for path in writers):
        raise PathlensError(
            f"{a.family} normalizes each sublayer's output before adding it to the residual stream (sandwich "
            "norms), so a head's write is not a sum term of the next inputs and edge scores are undefined; "
            "use node-level attribution (atp / relp) for this model."
        )
    if a.qkv_proj is None:
        raise PathlensError(
            f"edge attribution needs the q/k/v projection layers of {a.family}; pass an ArchMap with qkv_proj= "
            "and qkv_layout=."
        )


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
        biases: list[Tensor | None] = [getattr(m, "bias", None) for m in modules]
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
