"""Sparse dictionaries: sparse autoencoders (ReLU + L1, TopK, BatchTopK, JumpReLU) and transcoders.

One module, `Dictionary`, holds every variant (names follow SAELens, METHODS.md §23):

    z = (x·s_in − b_dec) W_enc + b_enc        pre-activations (an autoencoder subtracts b_dec first; a
                                               transcoder, whose input and output spaces differ, does not)
    f = act(z)                                 latents (..., width)
    x̂ = (f W_dec + b_dec) / s_out             reconstruction (..., d_out)

`s_in`, `s_out` are scalars set from the data before training (`fit_scales`) so that E‖x·s‖² = d: the same
learning rate and coefficients then work at any site. act is, per `kind`:

    relu       ReLU(z)
    topk       the k largest of ReLU(z) per token, the rest 0
    batchtopk  training: the k·B largest of ReLU(z) over the B tokens of the batch; inference: ReLU(z) where
               z > θ, θ a running average of the smallest kept activation (SAELens)
    jumprelu   z · H(z − θ), θ = exp(log θ) per latent, trained with straight-through pseudo-derivatives
               (Rajamanoharan et al. 2024, GemmaScope): a rectangle kernel of bandwidth ε around the threshold

A *transcoder* is a `Dictionary` with `d_out` set: it reads the MLP's input and reconstructs its output.
`save` / `load` write safetensors + JSON (no pickle); a round trip is bit-identical. A `Dictionary` can be
spliced into a model (`pathlens.features.splice`): it offers `encode`, `decode`, `d_in`, `d_out`, `width`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from pathlens.errors import PathlensError
from pathlens.results.io import load_pair, save_pair

Kind = Literal["relu", "topk", "batchtopk", "jumprelu"]
KINDS: tuple[str, ...] = get_args(Kind)
FORMAT = "pathlens.dictionary"
UNIT_NORM_KINDS = ("topk", "batchtopk", "jumprelu")  # kinds whose decoder rows are kept at unit norm


@dataclass(frozen=True)
class DictionaryConfig:
    """The shape and sparsity settings of a dictionary.

    kind: "relu" | "topk" | "batchtopk" | "jumprelu". d_in: input width; width: number of latents; d_out: the
    output width of a transcoder (None: an autoencoder, d_out = d_in). k: active latents per token (topk,
    batchtopk). l1: the ReLU dictionary's L1 coefficient (on f_i·‖W_dec,i‖). l0: the JumpReLU L0 coefficient.
    threshold: JumpReLU's initial θ. bandwidth: JumpReLU's kernel bandwidth ε. meta: where it came from (model,
    sites, tokens, seed), recorded in the JSON.
    """

    kind: Kind
    d_in: int
    width: int
    d_out: int | None = None
    k: int = 32
    l1: float = 1.0
    l0: float = 1.0
    threshold: float = 0.01
    bandwidth: float = 0.05
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PathlensError(f"dictionary kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}.")
        for name in ("d_in", "width", "k"):
            if int(getattr(self, name)) < 1:
                raise PathlensError(f"dictionary {name} must be at least 1, got {getattr(self, name)}.")
        if self.d_out is not None and self.d_out < 1:
            raise PathlensError(f"a transcoder's d_out must be at least 1, got {self.d_out}.")
        if self.kind in ("topk", "batchtopk") and self.k > self.width:
            raise PathlensError(f"k = {self.k} exceeds the dictionary width {self.width}; pick k <= width.")
        if self.bandwidth <= 0 or self.threshold <= 0:
            raise PathlensError("JumpReLU threshold and bandwidth must be positive.")

    @property
    def transcoder(self) -> bool:
        return self.d_out is not None


class Dictionary(nn.Module):
    """A sparse autoencoder or transcoder (see module docstring). Parameters: W_enc (d_in, width), b_enc
    (width,), W_dec (width, d_out), b_dec (d_out,), log_threshold (width,) for JumpReLU; buffers: s_in, s_out
    (input / output scale) and threshold (BatchTopK's inference threshold)."""

    s_in: Tensor
    s_out: Tensor
    threshold: Tensor
    log_threshold: nn.Parameter

    def __init__(self, config: DictionaryConfig, seed: int = 0):
        super().__init__()
        self.config = config
        c = config
        gen = torch.Generator().manual_seed(seed)
        d_out = self.d_out
        w_dec = torch.randn(c.width, d_out, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        if c.kind == "relu":
            w_dec *= 0.1  # SAELens `decoder_init_norm`
        w_enc = w_dec.T.clone() if not c.transcoder else torch.randn(c.d_in, c.width, generator=gen) / math.sqrt(c.d_in)
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(c.width))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if c.kind == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((c.width,), math.log(c.threshold)))
        self.register_buffer("s_in", torch.ones(()))
        self.register_buffer("s_out", torch.ones(()))
        self.register_buffer("threshold", torch.zeros(()))

    # ---- the splice protocol: widths, encode, decode ---------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_out(self) -> int:
        return self.config.d_out or self.config.d_in

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def kind(self) -> str:
        return self.config.kind

    def centered(self, x: Tensor) -> Tensor:
        """The encoder's input: x·s_in, minus b_dec for an autoencoder (..., d_in)."""
        x = x.to(self.W_enc.dtype) * self.s_in
        return x if self.config.transcoder else x - self.b_dec

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations z (..., width) of inputs x (..., d_in) in the model's units."""
        return self.centered(x) @ self.W_enc + self.b_enc  # (..., width)

    def activate(self, z: Tensor, train: bool = False) -> Tensor:
        """Latents from pre-activations; `train` selects BatchTopK's batch-level selection and JumpReLU's
        straight-through gradients."""
        c = self.config
        if c.kind == "relu":
            return torch.relu(z)
        if c.kind == "topk":
            values, indices = torch.topk(z, c.k, dim=-1)  # (..., k)
            return torch.zeros_like(z).scatter(-1, indices, torch.relu(values))
        if c.kind == "batchtopk":
            if not train:
                return torch.where(z > self.threshold, torch.relu(z), torch.zeros_like(z))
            flat = torch.relu(z).reshape(-1)  # (B·width,)
            keep = min(flat.numel(), c.k * (flat.numel() // c.width))
            values, indices = torch.topk(flat, keep)
            return torch.zeros_like(flat).scatter(0, indices, values).view_as(z)
        theta = torch.exp(self.log_threshold)  # (width,)
        if train:
            return JumpReLU.apply(z, theta, c.bandwidth)  # type: ignore[no-any-return]
        return z * (z > theta)

    def encode(self, x: Tensor) -> Tensor:
        """Latents f (..., width) of x (..., d_in), in inference mode."""
        return self.activate(self.pre_acts(x))

    def decode_scaled(self, f: Tensor) -> Tensor:
        """f W_dec + b_dec: the reconstruction in the training (scaled) units (..., d_out)."""
        return f @ self.W_dec + self.b_dec

    def decode(self, f: Tensor) -> Tensor:
        """The reconstruction (..., d_out) in the model's units."""
        return self.decode_scaled(f.to(self.W_dec.dtype)) / self.s_out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ---- decoder norms ---------------------------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (TopK, BatchTopK, JumpReLU keep them there)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row, so a step does not change its norm to
        first order (Gao et al.); the renormalisation after the step removes the rest."""
        grad, w = self.W_dec.grad, self.W_dec
        if grad is not None:  # grad −= (grad·w / ‖w‖²) w per row, in place
            along = torch.linalg.vecdot(grad, w) / w.norm(dim=1).clamp_min(1e-12).square()  # (width,)
            grad.addcmul_(w, along.unsqueeze(1), value=-1.0)

    # ---- files -----------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (parameters and scales) and `<path>.json` (the config), atomically."""
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_pair(path, FORMAT, tensors, {"config": asdict(self.config)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Dictionary":
        """Read a dictionary written by `save`; the tensors come back bit for bit."""
        names = ["W_enc", "b_enc", "W_dec", "b_dec", "s_in", "s_out", "threshold"]
        if _saved_kind(path) == "jumprelu":
            names.append("log_threshold")
        tensors, header = load_pair(path, FORMAT, names, ["config"])
        try:
            config = DictionaryConfig(**header["config"])
        except TypeError as exc:
            raise PathlensError(f"Dictionary.load: {path}: the config is not a dictionary config ({exc}).") from exc
        out = cls(config)
        missing = sorted(set(out.state_dict()) - set(tensors))
        if missing:
            raise PathlensError(f"Dictionary.load: {path} lacks the tensors {missing}; save the dictionary again.")
        for name, value in out.state_dict().items():
            if tuple(tensors[name].shape) != tuple(value.shape):
                raise PathlensError(
                    f"Dictionary.load: {path}: tensor {name} has shape {tuple(tensors[name].shape)}, the config "
                    f"says {tuple(value.shape)}; the files do not belong together."
                )
        out.load_state_dict({name: tensors[name] for name in out.state_dict()})
        return out

    def __repr__(self) -> str:
        c = self.config
        what = "Transcoder" if c.transcoder else "SAE"
        return f"{what}({c.kind}, d_in={c.d_in}, width={c.width}, d_out={self.d_out}, k={c.k})"


def _saved_kind(path: str | os.PathLike[str]) -> object:
    """The kind recorded in a saved dictionary's JSON (None if unreadable: `load_pair` then says what is wrong)."""
    p = Path(path)
    json_path = p.with_suffix(".json") if p.suffix in (".json", ".safetensors") else Path(f"{p}.json")
    try:
        return json.loads(json_path.read_text(encoding="utf-8"))["config"]["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1 for |u| < 1/2, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """z · H(z − θ) with the pseudo-derivatives of Rajamanoharan et al. (2024): ∂/∂z = H(z − θ) (z passes where
    it fires), ∂/∂θ = −(θ/ε)·K((z − θ)/ε) with the rectangle kernel K."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta)
        grad_theta = grad * (-(theta / eps) * _rectangle((z - theta) / eps))
        return grad_z, grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


class Step(torch.autograd.Function):
    """H(z − θ) (the L0 count) with ∂/∂z = 0 and ∂/∂θ = −(1/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = grad * (-(1.0 / eps) * _rectangle((z - theta) / eps))
        return torch.zeros_like(z), grad_theta.reshape(-1, theta.shape[-1]).sum(0), None
