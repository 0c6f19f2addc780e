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

Spliced dictionaries (`Model.splice`, `pathlens.features.splice`) whose latents decompose an MLP's write make
those latents nodes of the graph (`latent_families`):

- a transcoder (reads `L{l}.mlp_in`, rebuilds `L{l}.mlp_out`, named e.g. "tc"): the sender `L{l}.mlp` is
  replaced by one sender per node latent, `L{l}.tc.F{i}`, writing f_i · W_dec[i] / s_out (`feature_direction`),
  and the error sender `L{l}.tc.err`, writing the rest of the MLP's output: mlp_out − Σ_nodes f_i W_dec[i] / s_out,
  which holds the decoder bias, the latents that are not nodes and the reconstruction error. The receiver
  `L{l}.mlp` is replaced the same way: latent i reads the MLP input (through the MLP's input norm) and is
  f_i(x_i) = encode(x_i)[i], its own input x_i (for TopK the whole encoding decides whether i is active, so the
  encoding of x_i is computed and entry i taken); the error node reads x_e, the input of the MLP's own call, and
  writes MLP(x_e) − Σ_nodes f_i(x_e) W_dec[i] / s_out. With every input equal, the latents and the error sum to the
  model's MLP output exactly, so keeping every edge is the spliced model's own run.
- an SAE on `L{l}.mlp_out` (named e.g. "sae"): the MLP stays the receiver `L{l}.mlp` (its output is encoded into
  the latents inside the MLP node: MLP → latent edges are internal), and the sender `L{l}.mlp` is replaced by
  `L{l}.sae.F{i}` and `L{l}.sae.err` as above; `Layout.feeds` maps the receiver to the senders it feeds.

- an SAE on `L{l}.attn_out` (named e.g. "att"): the same for the attention's write: the heads of layer l stay
  receivers (their q/k/v inputs feed the latents and the error, `Layout.feeds`), and the senders `L{l}.H{h}` are
  replaced by `L{l}.att.F{i}` and `L{l}.att.err`, the error writing the rest of the attention's output (the
  output projection's bias included; behind a Gemma post-attention norm, the norm's output, with no
  linearisation needed).
- an SAE on the residual stream between two layers (`L{l}.resid_post` for l below the last layer, or
  `L{l}.resid_pre` for l above 0; named e.g. "res"): a bottleneck. Its latents and error are senders and
  receivers placed at the input of the next layer (`Layout.cuts`): every sender before it reaches it, and no
  receiver after it reads a sender before it (`Layout.read_from`, so those pairs are not edges): what came before
  reaches the rest of the model only through `L{l}.res.F{i}` and `L{l}.res.err`. Latent i reads the stream with
  no norm in between, f_i(x_i) = encode(x_i)[i]; the error node reads x_e and writes x_e − Σ_nodes f_i(x_e)
  W_dec[i] / s_out, which holds the decoder bias, the non-node latents, the reconstruction error and the biases no
  sender carries (so after the cut the stream is exactly the sum of the senders from it on).

Nodes are the latents whose value differs between the clean and the corrupted run at some real (unpadded)
position of the task: the others have no first-order effect (Δf = 0) and would only widen every sender ×
receiver matrix (a 4608-wide dictionary is mostly silent on a task). A latent that is not a node is carried by
the error node, so edge patching stays exact whatever the node set. A dictionary spliced anywhere else (the
residual stream before the first or after the last layer, inside the MLP or the attention) raises a PathlensError that
names `node_circuit` and the supported splices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.arch.base import get_module, own_tensor, weight_out_in
from pathlens.arch.norms import norm_parts
from pathlens.errors import PathlensError
from pathlens.hooks import Splice
from pathlens.model import Model
from pathlens.sites import Site
from pathlens.tasks.base import Task


@dataclass(frozen=True)
class LatentFamily:
    """A dictionary spliced on layer `layer`'s MLP whose latents `nodes` (ascending indices) are graph nodes (see
    the module docstring): a transcoder's latents send and receive, an mlp_out SAE's latents only send."""

    splice: Splice
    nodes: Tensor  # (L,) long

    @property
    def layer(self) -> int:
        return int(self.splice.target.layer or 0)

    @property
    def dictionary(self) -> Any:
        """The spliced `pathlens.features.Dictionary` (circuits sits beside features, so it is duck-typed here)."""
        return self.splice.dictionary

    @property
    def transcoder(self) -> bool:
        """Whether the latents read the MLP input (a transcoder) rather than its output (an SAE)."""
        return self.splice.source != self.splice.target

    @property
    def attention(self) -> bool:
        """Whether the dictionary decomposes the attention's write (an SAE on attn_out) rather than an MLP's."""
        return self.splice.target.kind == "attn_out"

    @property
    def cut(self) -> int | None:
        """For a residual-stream dictionary, the layer at whose input it sits (resid_post[l] → l + 1,
        resid_pre[l] → l): everything before reaches that layer and later only through its latents and error.
        None for an MLP's dictionary."""
        kind = self.splice.target.kind
        if kind == "resid_post":
            return self.layer + 1
        return self.layer if kind == "resid_pre" else None

    @property
    def site(self) -> Site:
        """The latent family site (`L3.tc`): (B, P, width) latents in a run."""
        return self.splice.latents

    @property
    def names(self) -> list[str]:
        return [f"{self.site}.F{i}" for i in self.nodes.tolist()]

    @property
    def error(self) -> str:
        return str(self.splice.error)

    def writes(self) -> Tensor:
        """What one unit of each node latent writes into the residual stream, W_dec[nodes] / s_out (L, d_model)."""
        d = self.dictionary
        return (d.W_dec[self.nodes] / d.s_out).detach()

    def encoder(self) -> Tensor:
        """∂z_i/∂x of each node latent's pre-activation in the dictionary's input (d_in, L): s_in · W_enc[:, i]
        (a transcoder's input is not centred by b_dec)."""
        d = self.dictionary
        return (d.W_enc[:, self.nodes] * d.s_in).detach()

    def values(self, x: Tensor) -> Tensor:
        """The node latents (..., L) of dictionary inputs x (..., d_in)."""
        with torch.no_grad():
            return self.dictionary.encode(x)[..., self.nodes].to(x.dtype)

    def own_values(self, x: Tensor, latents: Tensor) -> Tensor:
        """Latent `latents[c]` (positions among the nodes) of its own input x[c]: x (C, ..., d_in) → (C, ...).
        Elementwise activations need only the latent's encoder column; TopK needs every pre-activation of each
        input: latent i is kept when fewer than k latents have a larger pre-activation (as `torch.topk` keeps it,
        but for exact ties), in batches of inputs of at most `TOPK_ELEMENTS` pre-activations."""
        d, index = self.dictionary, self.nodes[latents]
        with torch.no_grad():
            if d.kind == "topk":
                per_input = max(1, x[0].numel() // x.shape[-1] * int(d.width))
                step = max(1, TOPK_ELEMENTS // per_input)
                out = []
                for first in range(0, len(index), step):
                    z = d.pre_acts(x[first : first + step])  # (c, ..., width)
                    chosen = _expand(index[first : first + step], z).unsqueeze(-1).expand(*z.shape[:-1], 1)
                    z_i = z.gather(-1, chosen)  # (c, ..., 1)
                    kept = (z > z_i).sum(dim=-1) < d.config.k
                    out.append(torch.where(kept, torch.relu(z_i[..., 0]), torch.zeros_like(z_i[..., 0])))
                return torch.cat(out).to(x.dtype)
            z = torch.einsum("c...d,dc->c...", d.centered(x), d.W_enc[:, index]) + _expand(d.b_enc[index], x)
            if d.kind == "relu":
                f = torch.relu(z)
            elif d.kind == "jumprelu":
                f = z * (z > _expand(torch.exp(d.log_threshold[index]), x))
            else:  # batchtopk at inference: ReLU above the learned threshold
                f = torch.where(z > d.threshold, torch.relu(z), torch.zeros_like(z))
            return f.to(x.dtype)

    def pre_activation_grads(self, x: Tensor, grad_f: Tensor) -> Tensor:
        """∂m/∂z (..., L) of the node latents, from ∂m/∂f (..., width) at inputs x (..., d_in), through the
        dictionary's own activation: the active-set derivative (TopK: the selected latents pass their gradient;
        JumpReLU: above the threshold, the straight-through derivative in z)."""
        d = self.dictionary
        with torch.enable_grad():
            z = d.pre_acts(x.detach()).detach().requires_grad_(True)  # (..., width)
            (grad_z,) = torch.autograd.grad(d.activate(z), z, grad_outputs=grad_f.to(z.dtype))
        return grad_z[..., self.nodes]


TOPK_ELEMENTS = 1 << 24  # pre-activations of one batch of TopK latents' own inputs (64 MiB in float32)


def _expand(per_latent: Tensor, x: Tensor) -> Tensor:
    """A (C,) per-latent value shaped to broadcast against (C, ...) = x's shape without its last axis."""
    return per_latent.view(-1, *([1] * (x.ndim - 2)))


def latent_families(model: Model, task: Task | None = None) -> list[LatentFamily]:
    """The dictionaries spliced into `model` as graph nodes, in layer order; each node set is the latents whose
    value differs between `task`'s clean and corrupted runs at a real position (every latent without a task).
    Raises a PathlensError for a splice the edge graph does not model (see the module docstring)."""
    if not model.splices:
        return []
    splices = sorted(model.splices, key=lambda sp: int(sp.target.layer or 0))
    for sp in splices:
        _check_splice(model, sp)
    if task is None:
        return [LatentFamily(sp, torch.arange(sp.width)) for sp in splices]
    sites = [sp.latents for sp in splices]
    mask = task.attention_mask.bool()[..., None]  # (N, P, 1)
    with torch.no_grad():
        clean = model.run(task.clean_ids, attention_mask=task.attention_mask, cache=sites).cache
        corrupt = model.run(task.corrupt_ids, attention_mask=task.attention_mask, cache=sites).cache
    out = []
    for sp in splices:
        moved = ((clean[sp.latents] != corrupt[sp.latents]) & mask.to(clean[sp.latents].device)).any(dim=(0, 1))
        out.append(LatentFamily(sp, torch.nonzero(moved.cpu())[:, 0]))
    return out


DICTIONARY_PARTS = ("W_enc", "b_enc", "W_dec", "s_in", "s_out", "kind", "centered", "pre_acts", "activate", "encode")


def _check_splice(model: Model, sp: Splice) -> None:
    """Raise unless `sp` is a transcoder L{l}.mlp_in → L{l}.mlp_out, an SAE on L{l}.mlp_out, or an SAE on the
    residual stream between two layers (resid_post of any layer but the last, resid_pre of any but the first) of a
    `pathlens.features` Dictionary."""
    source, target = sp.source, sp.target
    transcoder = source.kind == "mlp_in" and target.kind == "mlp_out" and source.layer == target.layer
    sae = source == target and target.kind in ("mlp_out", "attn_out")
    layer, last = int(target.layer or 0), model.arch.n_layers - 1
    between = source == target and (
        (target.kind == "resid_post" and layer < last) or (target.kind == "resid_pre" and layer > 0)
    )
    if not (transcoder or sae or between):
        where = "the residual stream at the model's edge" if target.kind.startswith("resid") else str(target)
        raise PathlensError(
            f"edge methods cannot use the dictionary spliced as {sp.latents} ({source} → {target}): its latents "
            f"would be nodes of {where}, which the edge graph does not model. Use pathlens.features.node_circuit "
            "for it, or splice a transcoder (L{l}.mlp_in → L{l}.mlp_out), an SAE on L{l}.mlp_out, or an SAE on the "
            "residual stream between two layers."
        )
    if not all(hasattr(sp.dictionary, name) for name in DICTIONARY_PARTS):
        raise PathlensError(
            f"edge methods need the dictionary spliced as {sp.latents} to be a pathlens.features Dictionary (its "
            f"encoder and decoder weights make each latent a node); got {type(sp.dictionary).__name__}."
        )
    if model.arch.mlp is None and target.kind.startswith("mlp"):
        raise PathlensError(f"{model.arch.family} has no MLP, so {sp.latents} has no MLP output to decompose.")


@dataclass(frozen=True)
class Layout:
    """Names and positions of the graph's senders and receivers for one model."""

    senders: list[str]
    receivers: list[str]
    sender_stop: list[int]  # senders [0, stop) precede layer L's attention (index L); [L_total] = all
    mlp_sender_stop: list[int]  # senders preceding layer L's MLP
    attn_cols: list[slice]  # receiver columns of layer L's q, k, v inputs
    mlp_col: list[int | None]  # receiver column of layer L's MLP (a transcoder's: its error node)
    families: dict[int, LatentFamily] = field(default_factory=dict)  # per layer, the MLP's spliced dictionary
    latent_rows: dict[int, slice] = field(default_factory=dict)  # sender rows of a family's node latents
    latent_cols: dict[int, slice] = field(default_factory=dict)  # receiver columns of a transcoder's node latents
    feeds: dict[str, list[str]] = field(default_factory=dict)  # receiver -> the senders it feeds, where not itself
    cuts: dict[int, LatentFamily] = field(default_factory=dict)  # layer -> the residual dictionary at its input
    cut_stop: dict[int, int] = field(default_factory=dict)  # senders [0, stop) precede that dictionary
    cut_cols: dict[int, slice] = field(default_factory=dict)  # its receiver columns: node latents, then error
    read_from: list[int] = field(default_factory=list)  # per receiver: senders before this one are not read
    attention: dict[int, LatentFamily] = field(default_factory=dict)  # layer -> the SAE on its attention's output
    attention_rows: dict[int, slice] = field(default_factory=dict)  # sender rows of its node latents


def graph_layout(model: Model, families: Sequence[LatentFamily] | None = None) -> Layout:
    """The senders and receivers of `model`'s graph, in the order every sender × receiver matrix uses;
    `families`: the spliced dictionaries' nodes (default: every latent of every splice, `latent_families`)."""
    a = model.arch
    chosen = latent_families(model) if families is None else families
    by_layer = {f.layer: f for f in chosen if f.cut is None and not f.attention}
    by_attention = {f.layer: f for f in chosen if f.attention}
    cuts = {f.cut: f for f in chosen if f.cut is not None}
    h, g = a.n_heads, a.n_kv_heads
    kv_letter = "H" if g == h else "G"
    senders: list[str] = ["input"]
    receivers: list[str] = []
    sender_stop: list[int] = []
    mlp_stop: list[int] = []
    attn_cols: list[slice] = []
    mlp_col: list[int | None] = []
    latent_rows: dict[int, slice] = {}
    latent_cols: dict[int, slice] = {}
    feeds: dict[str, list[str]] = {}
    cut_stop: dict[int, int] = {}
    cut_cols: dict[int, slice] = {}
    attn_rows: dict[int, slice] = {}
    read_from: list[int] = []
    start = 0  # senders before the latest residual dictionary are read by no later receiver

    def read(count: int) -> None:
        read_from.extend([start] * (count - len(read_from)))

    for layer in range(a.n_layers):
        cut = cuts.get(layer)
        if cut is not None:
            read(len(receivers))
            cut_stop[layer] = len(senders)
            cut_cols[layer] = slice(len(receivers), len(receivers) + len(cut.nodes) + 1)
            receivers += [*cut.names, cut.error]
            read(len(receivers))
            start = len(senders)
            senders += [*cut.names, cut.error]
        sender_stop.append(len(senders))
        first = len(receivers)
        receivers += [f"L{layer}.H{i}.q" for i in range(h)]
        receivers += [f"L{layer}.{kv_letter}{i}.k" for i in range(g)]
        receivers += [f"L{layer}.{kv_letter}{i}.v" for i in range(g)]
        attn_cols.append(slice(first, len(receivers)))
        heads = by_attention.get(layer)
        if heads is None:
            senders += [f"L{layer}.H{i}" for i in range(h)]
        else:  # an attn_out SAE: the heads still read, their write is the latents' and the error's
            attn_rows[layer] = slice(len(senders), len(senders) + len(heads.nodes))
            senders += [*heads.names, heads.error]
            feeds.update({r: [*heads.names, heads.error] for r in receivers[attn_cols[-1]]})
        if a.mlp is None:
            mlp_stop.append(len(senders))
            mlp_col.append(None)
            continue
        mlp_stop.append(sender_stop[-1] if a.parallel else len(senders))
        family = by_layer.get(layer)
        if family is None:
            mlp_col.append(len(receivers))
            receivers.append(f"L{layer}.mlp")
            senders.append(f"L{layer}.mlp")
            continue
        if family.transcoder:
            latent_cols[layer] = slice(len(receivers), len(receivers) + len(family.nodes))
            receivers += family.names
            mlp_col.append(len(receivers))
            receivers.append(family.error)
        else:
            mlp_col.append(len(receivers))
            receivers.append(f"L{layer}.mlp")
            feeds[f"L{layer}.mlp"] = [*family.names, family.error]
        latent_rows[layer] = slice(len(senders), len(senders) + len(family.nodes))
        senders += [*family.names, family.error]
    sender_stop.append(len(senders))
    receivers.append("logits")
    read(len(receivers))
    return Layout(
        senders, receivers, sender_stop, mlp_stop, attn_cols, mlp_col, by_layer, latent_rows, latent_cols, feeds,
        cuts, cut_stop, cut_cols, read_from if cuts else [], by_attention, attn_rows,
    )  # fmt: skip


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
        latents = layout.latent_cols.get(layer)
        if latents is not None:
            mask[: layout.mlp_sender_stop[layer], latents] = True
    for layer, cols in layout.cut_cols.items():
        mask[: layout.cut_stop[layer], cols] = True
    mask[:, -1] = True
    if layout.read_from:
        mask &= torch.arange(len(layout.senders))[:, None] >= torch.tensor(layout.read_from)[None]
    return mask
