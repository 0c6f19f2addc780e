"""Training sparse dictionaries: one `Trainer` per dictionary, any number fed from one stream of batches.

A batch is a dict {site name: activations (n, d)} — from the activation store's loader, from `on_the_fly`
(model passes over token windows, nothing written to disk) or from tensors (`tensor_batches`). `train` gives
every dictionary its source (and, for a transcoder, target) columns of each batch, so several dictionaries
learn from one model pass.

Per step (loss summed over the output dims, averaged over tokens, in the scaled units of `Dictionary`):

    relu        ‖y − ŷ‖² + λ_t Σ_i f_i ‖W_dec,i‖         λ warmed up linearly over `l1_warmup` steps;
                dead latents resampled every `resample_every` steps (see `resample_dead`)
    topk        ‖y − ŷ‖² + α·AuxK                          AuxK: the top-k_aux pre-activations of the dead latents
    batchtopk   same as topk                               decode the residual (y − ŷ) (Gao et al. 2024);
                                                           scaled by min(n_dead / k_aux, 1)
    jumprelu    ‖y − ŷ‖² + λ Σ_i H(z_i − θ_i)              straight-through gradients for θ (`sae.Step`);
                                                           θ starts at the data's scale and learns at its own
                                                           rate (see `Trainer.start_thresholds`)

A latent is dead when it has not fired for `dead_steps` steps (SAELens counts steps: 1000). TopK, BatchTopK and
JumpReLU keep unit-norm decoder rows (the parallel part of the gradient is removed before each step, the rows
renormalised after). Adam (the fused kernel where torch has one for the parameters' device). Seeded: the
initialisation, the shuffling and the resampling draw from `seed`.

TopK trains through its sparse code by default (`TrainConfig.sparse`, `pathlens.features.sparse`; float32/64 on a
CPU or CUDA device): the k active latents per token (and AuxK's k_aux dead ones) are gathered, decoded and
backpropagated without the dense (n, width) intermediates, which skips five of the step's six (n, d)·(d, width)
matmuls — the same loss and gradients up to float32 summation order (tests/test_sae.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.features.sae import UNIT_NORM_KINDS, Dictionary, Step
from pathlens.features.sparse import decode_at, gather_pre_acts
from pathlens.features.store import ActivationStore, stream
from pathlens.model import Model
from pathlens.sites import Site


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one dictionary. lr: Adam learning rate. k_aux: dead latents AuxK decodes
    (None: d_in // 2, SAELens); aux_coef: its coefficient (SAELens 1.0). dead_steps: steps without firing
    after which a latent is dead. l1_warmup: steps over which the ReLU L1 coefficient ramps up (0: none).
    resample_every: steps between resamplings of dead ReLU latents (0: never). sparse: train TopK through its
    sparse code (False: the dense reference computation; both give the same numbers up to summation order)."""

    lr: float = 4e-4
    k_aux: int | None = None
    aux_coef: float = 1.0
    dead_steps: int = 1000
    l1_warmup: int = 0
    resample_every: int = 0
    threshold_lr: float = 0.01  # BatchTopK: its running average's rate; JumpReLU: Adam's learning rate for log θ
    start_density: float | None = 0.05  # JumpReLU: θ starts where each latent fires on this share of the first batch
    sparse: bool = True


@dataclass
class Trainer:
    """Trains one `Dictionary` on batches of (source, target) activations; `source`/`target` name the batch
    columns it reads (target None: an autoencoder, which reconstructs its source)."""

    dictionary: Dictionary
    source: str
    target: str | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    steps: int = 0
    tokens: int = 0
    since_fired: Tensor = field(init=False)
    optimizer: torch.optim.Adam = field(init=False)
    _gen: torch.Generator = field(init=False)
    _fitted: bool = False

    def __post_init__(self) -> None:
        self.since_fired = torch.zeros(self.dictionary.width, dtype=torch.long)
        params = list(self.dictionary.parameters())
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
        self.optimizer = torch.optim.Adam(
            _param_groups(self.dictionary, self.config), lr=self.config.lr, fused=fused or None
        )
        self._gen = torch.Generator().manual_seed(self.seed)
        if self.dictionary.kind in UNIT_NORM_KINDS:
            self.dictionary.normalize_decoder()

    @property
    def dead(self) -> Tensor:
        """Latents that have not fired for `dead_steps` steps (width,) bool."""
        return self.since_fired >= self.config.dead_steps

    @torch.no_grad()
    def fit_scales(self, x: Tensor, y: Tensor) -> None:
        """Set the input/output scales so E‖x·s‖² = d, and b_dec to the mean target (scaled): a start at the
        data's centre (Gao et al. use the geometric median)."""
        d = self.dictionary
        d.s_in.fill_(math.sqrt(d.d_in / float(x.float().pow(2).sum(-1).mean().clamp_min(1e-12))))
        out_scale = math.sqrt(d.d_out / float(y.float().pow(2).sum(-1).mean().clamp_min(1e-12)))
        d.s_out.copy_(d.s_in if self.target is None else torch.tensor(out_scale))
        d.b_dec.copy_((y.float() * d.s_out).mean(0))
        if d.kind == "jumprelu" and self.config.start_density is not None:
            self.start_thresholds(x, self.config.start_density)
        self._fitted = True

    @torch.no_grad()
    def start_thresholds(self, x: Tensor, density: float) -> None:
        """JumpReLU: set each latent's θ to its pre-activation quantile on `x` (n, d_in) above which it fires on a
        share `density` of the tokens (at least the config's `threshold`).

        Why: θ's learning signal is weak and Adam moves log θ by about its learning rate per step whatever the
        gradient's size, so from the paper's start (0.001 on unit-norm inputs; 0.01 here, ~1% of a pre-activation's
        spread on inputs scaled to E‖x‖² = d) θ needs thousands of steps to reach the scale of the data, and a
        short run ends with half the latents firing. Started at the data's scale and learning at `threshold_lr`,
        θ settles within a few hundred steps."""
        d = self.dictionary
        if not 0.0 < density <= 1.0:
            raise PathlensError(f"start_density must be in (0, 1], got {density}.")
        z = d.pre_acts(x)  # (n, width)
        rank = min(int(z.shape[0]), max(1, round((1.0 - density) * int(z.shape[0]))))
        theta = z.kthvalue(rank, dim=0).values.clamp_min(d.config.threshold)  # (width,)
        d.log_threshold.copy_(theta.log())

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The loss terms on one batch (x (n, d_in), y (n, d_out) in the model's units): "mse", "sparsity" (L1,
        AuxK or L0 by kind, already weighted), "loss", and the latents "f" (n, width)."""
        d, c = self.dictionary, self.dictionary.config
        target = y.to(d.W_dec.dtype) * d.s_out  # (n, d_out)
        z = d.pre_acts(x)  # (n, width)
        f = d.activate(z, train=True)  # (n, width)
        recon = d.decode_scaled(f)  # (n, d_out)
        mse = (recon - target).pow(2).sum(-1).mean()
        if c.kind == "relu":
            warm = 1.0 if self.config.l1_warmup <= 0 else min(1.0, (self.steps + 1) / self.config.l1_warmup)
            sparsity = warm * c.l1 * (f * d.W_dec.norm(dim=1)).sum(-1).mean()
        elif c.kind == "jumprelu":
            sparsity = c.l0 * Step.apply(z, torch.exp(d.log_threshold), c.bandwidth).sum(-1).mean()
        else:
            sparsity = self.config.aux_coef * self.aux_loss(z, (target - recon).detach())
        return {"mse": mse, "sparsity": sparsity, "loss": mse + sparsity, "f": f}

    def sparse_topk_losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """`losses` for a TopK dictionary through its sparse code: the same "mse", "sparsity" (AuxK) and "loss",
        and the latents as "values"/"indices" (n, k) instead of "f". z is computed once without gradient (top-k
        reads all of it); the kept entries are gathered again with a sparse backward (`gather_pre_acts`)."""
        d, c = self.dictionary, self.dictionary.config
        target = y.to(d.W_dec.dtype) * d.s_out  # (n, d_out)
        shift = None if c.transcoder else d.b_dec
        with torch.no_grad():
            centered = d.centered(x)  # (n, d_in)
            z = torch.addmm(d.b_enc, centered, d.W_enc)  # (n, width)
            indices = torch.topk(z, c.k, dim=-1).indices.sort(dim=-1).values  # (n, k)
        values = torch.relu(gather_pre_acts(centered, d.W_enc, d.b_enc, shift, z, indices))  # (n, k)
        recon = decode_at(values, indices, d.W_dec) + d.b_dec  # (n, d_out)
        mse = (recon - target).pow(2).sum(-1).mean()
        sparsity = z.new_zeros(())
        dead = self.dead.nonzero().flatten().to(z.device)
        if dead.numel():
            k_aux = self.config.k_aux or d.d_in // 2
            picked = torch.topk(z[:, dead], min(k_aux, int(dead.numel())), dim=-1).indices  # (n, k_aux')
            aux_indices = dead[picked].sort(dim=-1).values  # (n, k_aux')
            aux_values = gather_pre_acts(centered, d.W_enc, d.b_enc, shift, z, aux_indices)  # (n, k_aux')
            aux_recon = decode_at(aux_values, aux_indices, d.W_dec)  # (n, d_out)
            residual = (target - recon).detach()  # (n, d_out)
            scale = min(int(dead.numel()) / k_aux, 1.0)
            sparsity = self.config.aux_coef * scale * (residual - aux_recon).pow(2).sum(-1).mean()
        return {"mse": mse, "sparsity": sparsity, "loss": mse + sparsity, "values": values, "indices": indices}

    def aux_loss(self, z: Tensor, residual: Tensor) -> Tensor:
        """AuxK: decode the top-k_aux pre-activations (raw) of the dead latents (z: (n, width)) and compare with
        the residual y − ŷ (n, d_out): min(n_dead / k_aux, 1)·mean_n ‖residual − f_aux W_dec‖². 0 without dead
        latents."""
        dead = self.dead.nonzero().flatten().to(z.device)
        if dead.numel() == 0:
            return z.new_zeros(())
        return self._aux(z[:, dead], dead, residual)

    def _aux(self, z_dead: Tensor, dead: Tensor, residual: Tensor) -> Tensor:
        """AuxK from the dead latents' pre-activations (n, n_dead) (`dead`: their indices)."""
        k_aux = self.config.k_aux or self.dictionary.d_in // 2
        values, picked = torch.topk(z_dead, min(k_aux, int(dead.numel())), dim=-1)  # (n, k)
        f_aux = torch.zeros_like(z_dead).scatter(-1, picked, values)  # (n, n_dead)
        recon = f_aux @ self.dictionary.W_dec[dead]  # (n, d_out)
        return min(int(dead.numel()) / k_aux, 1.0) * (residual - recon).pow(2).sum(-1).mean()

    def step(self, x: Tensor, y: Tensor | None = None) -> dict[str, float]:
        """One optimiser step on x (n, d_in) → y (n, d_out; default x); returns the loss terms and L0."""
        y = x if y is None else y
        if x.shape[-1] != self.dictionary.d_in or y.shape[-1] != self.dictionary.d_out:
            raise PathlensError(
                f"batch columns {self.source!r}/{self.target or self.source!r} have widths {x.shape[-1]}/"
                f"{y.shape[-1]}, the dictionary expects d_in={self.dictionary.d_in}, d_out={self.dictionary.d_out}."
            )
        if not self._fitted:
            self.fit_scales(x, y)
        d = self.dictionary
        sparse = (
            d.kind == "topk"
            and self.config.sparse
            and d.W_enc.device.type in ("cpu", "cuda")
            and d.W_enc.dtype in (torch.float32, torch.float64)
        )
        parts = self.sparse_topk_losses(x, y) if sparse else self.losses(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if d.kind in UNIT_NORM_KINDS:
            d.remove_parallel_grad()
        self.optimizer.step()
        if d.kind in UNIT_NORM_KINDS:
            d.normalize_decoder()
        if sparse:
            active = parts["values"].detach() > 0  # (n, k)
            fired = torch.zeros(d.width, dtype=torch.bool, device=active.device)
            fired[parts["indices"][active]] = True  # (width,)
            l0 = active.sum(-1).float().mean()
        else:
            f = parts["f"].detach()
            fired = (f > 0).any(0)  # (width,)
            l0 = (f > 0).sum(-1).float().mean()
            if d.kind == "batchtopk":
                self._update_threshold(f)
        self.since_fired = torch.where(fired.cpu(), 0, self.since_fired + 1)
        self.steps += 1
        self.tokens += int(x.shape[0])
        if d.kind == "relu" and self.config.resample_every and self.steps % self.config.resample_every == 0:
            self.resample_dead(x, y)
        return {
            "loss": float(parts["loss"].detach()),
            "mse": float(parts["mse"].detach()),
            "sparsity": float(parts["sparsity"].detach()),
            "l0": float(l0),
        }

    @torch.no_grad()
    def _update_threshold(self, f: Tensor) -> None:
        positive = f[f > 0]
        if positive.numel():
            low = positive.min()
            t = self.dictionary.threshold
            t.copy_(low if self.steps == 0 else (1 - self.config.threshold_lr) * t + self.config.threshold_lr * low)

    @torch.no_grad()
    def resample_dead(self, x: Tensor, y: Tensor) -> int:
        """Give each dead latent a new direction: an input drawn with probability ∝ its squared reconstruction
        error; the decoder row is that error's unit direction, the encoder column the same direction at 0.2× the
        mean live encoder norm, its bias 0, and its Adam moments are reset (Bricken et al. 2023). Returns how many
        latents were resampled."""
        d = self.dictionary
        dead = self.dead.nonzero().flatten()
        if dead.numel() == 0:
            return 0
        target = y.to(d.W_dec.dtype) * d.s_out  # (n, d_out)
        error = target - d.decode_scaled(d.encode(x))  # (n, d_out)
        weight = error.pow(2).sum(-1)  # (n,)
        picks = torch.multinomial(weight.cpu() + 1e-12, dead.numel(), replacement=True, generator=self._gen)
        directions = error[picks.to(error.device)]
        directions /= directions.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_dead, d_out)
        alive = (~self.dead).nonzero().flatten()
        enc_norm = d.W_enc[:, alive].norm(dim=0).mean() if alive.numel() else torch.tensor(1.0)
        d.W_dec[dead] = directions * (d.W_dec[alive].norm(dim=1).mean() if alive.numel() else 1.0)
        if d.d_in == d.d_out:
            d.W_enc[:, dead] = (directions * 0.2 * enc_norm).T
        else:
            d.W_enc[:, dead] = torch.randn(d.d_in, dead.numel(), generator=self._gen) * 0.2 * enc_norm / d.d_in**0.5
        d.b_enc[dead] = 0.0
        for param, index in ((d.W_dec, (dead,)), (d.W_enc, (slice(None), dead)), (d.b_enc, (dead,))):
            state = self.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        self.since_fired[dead] = 0
        return int(dead.numel())


def _param_groups(dictionary: Dictionary, config: TrainConfig) -> list[dict[str, Any]]:
    """Adam's parameter groups: every parameter at `lr`, JumpReLU's log θ at `threshold_lr` (Adam steps a parameter
    by about its learning rate, so log θ at the weights' rate, ~1e-3, would take thousands of steps to move θ by
    the data's scale)."""
    if dictionary.kind != "jumprelu":
        return [{"params": list(dictionary.parameters())}]
    rest = [p for name, p in dictionary.named_parameters() if name != "log_threshold"]
    return [{"params": rest}, {"params": [dictionary.log_threshold], "lr": config.threshold_lr}]


def train(
    trainers: Sequence[Trainer],
    batches: Iterable[Mapping[str, Tensor]],
    max_tokens: int | None = None,
    log_every: int = 0,
) -> list[list[dict[str, float]]]:
    """Train every trainer on each batch of `batches` (until it ends or `max_tokens` tokens have passed);
    returns each trainer's per-step logs (every `log_every`-th step and the last; all with 0)."""
    if not trainers:
        raise PathlensError("train: no dictionaries to train; pass at least one Trainer.")
    logs: list[list[dict[str, float]]] = [[] for _ in trainers]
    seen = 0
    for batch in batches:
        for trainer, log in zip(trainers, logs, strict=True):
            for column in (trainer.source, trainer.target):
                if column is not None and column not in batch:
                    raise PathlensError(
                        f"the batches hold {sorted(batch)} but a dictionary reads {column!r}; collect that site."
                    )
            entry = trainer.step(batch[trainer.source], None if trainer.target is None else batch[trainer.target])
            if not log_every or trainer.steps % log_every == 0:
                log.append({"step": trainer.steps, **entry})
        seen += int(next(iter(batch.values())).shape[0])
        if max_tokens is not None and seen >= max_tokens:
            break
    return logs


def tensor_batches(
    columns: Mapping[str, Tensor], batch_size: int, seed: int = 0, epochs: int = 1
) -> Iterator[dict[str, Tensor]]:
    """Shuffled batches (batch_size, d) of in-memory activations {site: (n, d)}, the same rows across columns."""
    n = _rows(columns)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {name: t[rows] for name, t in columns.items()}


def _rows(columns: Mapping[str, Tensor]) -> int:
    sizes = {name: int(t.shape[0]) for name, t in columns.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise PathlensError(f"activation columns must be non-empty and of one length, got {sizes}.")
    return next(iter(sizes.values()))


def on_the_fly(
    model: Model,
    windows: Tensor,
    sites: Sequence[Site | str],
    batch_size: int,
    seed: int = 0,
    chunk: int = 8,
    buffer_windows: int = 64,
    skip_first: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Training batches straight from model passes, nothing on disk (`pathlens.features.store.stream`: one forward
    per `chunk` windows for every site, stopped after the last block needed): `buffer_windows` windows at a time,
    each window's first position left out with `skip_first`, their tokens shuffled together (seeded) and cut into
    batches of `batch_size` tokens; leftovers carry over to the next buffer."""
    names = [str(model.resolve(s)) for s in sites]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(int(windows.shape[0]), generator=gen)
    carry: dict[str, Tensor] | None = None
    for start in range(0, int(windows.shape[0]), buffer_windows):
        part = windows[order[start : start + buffer_windows]]
        fresh: dict[str, list[Tensor]] = {name: [] for name in names}
        for batch in stream(model, names, part, batch_size=chunk):
            for name in names:
                rows = batch[name].float().reshape(-1, int(part.shape[1]), batch[name].shape[-1])  # (b, p, d)
                fresh[name].append(rows[:, int(skip_first) :].reshape(-1, rows.shape[-1]))
        pool = {k: torch.cat(v if carry is None else [carry[k], *v]) for k, v in fresh.items()}
        n = _rows(pool)
        perm = torch.randperm(n, generator=gen)
        usable = n - n % batch_size
        for lo in range(0, usable, batch_size):
            rows_at = perm[lo : lo + batch_size]
            yield {k: v[rows_at] for k, v in pool.items()}
        carry = {k: v[perm[usable:]] for k, v in pool.items()}


def store_batches(
    store: ActivationStore,
    sites: Sequence[str],
    batch_size: int,
    seed: int = 0,
    epochs: int = 1,
    windows: int | None = None,
    skip_first: bool = True,
) -> Iterator[dict[str, Tensor]]:
    """Shuffled training batches {site: (batch_size, d)} of an activation store's rows, restricted to its first
    `windows` windows (the rest held out for evaluation; None: all) and, with `skip_first`, to positions > 0 of
    each window. Each epoch visits the shards in a seeded order, two at a time, shuffling their rows together."""
    store.check(sites=sites)
    gen = torch.Generator().manual_seed(seed)
    starts = [0]
    for entry in store.manifest["shards"]:
        starts.append(starts[-1] + int(entry["rows"]))
    for _ in range(epochs):
        order = torch.randperm(store.n_shards, generator=gen).tolist()
        carry: dict[str, Tensor] | None = None
        for at in range(0, len(order), 2):
            pool: dict[str, list[Tensor]] = {s: [] if carry is None else [carry[s]] for s in sites}
            for index in order[at : at + 2]:
                shard = store.shard(index, list(sites))
                window, position = store.origin(torch.arange(starts[index], starts[index + 1]))
                keep = (
                    (position >= int(skip_first))
                    if windows is None
                    else (position >= int(skip_first)) & (window < windows)
                )
                for s in sites:
                    pool[s].append(shard[s][keep].float())
            merged = {s: torch.cat(v) for s, v in pool.items()}
            n = _rows(merged)
            perm = torch.randperm(n, generator=gen)
            usable = n - n % batch_size
            for lo in range(0, usable, batch_size):
                rows = perm[lo : lo + batch_size]
                yield {s: v[rows] for s, v in merged.items()}
            carry = {s: v[perm[usable:]] for s, v in merged.items()}
