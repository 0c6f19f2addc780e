"""Weighted activation steering with a lightweight controller ("Guiding Giants", Hegazy, Elhoushi, Alanwar,
arXiv 2505.20309; official code Amr-Hegazy1/GuidingGiantsWAS).

A small network reads the last-token outputs (resid_post) of the model's last 4 layers and decides, per prompt and
per generation step, how strongly to steer and in which layers:

    out = Linear(hidden → 1 + L)(ReLU(Linear(4·d → hidden)(concat h^{−4..−1})))      hidden = 1024
    s = out[0],  w_ℓ = out[1 + ℓ],  gain_ℓ = g(s) · σ(w_ℓ) · α                        α = 4.0 (α_global)
    h^ℓ ← h^ℓ + gain_ℓ · d_ℓ   at every steered site ℓ, at the last position of each forward

`g` is the identity ("raw", the paper's inference: s is not squashed, so a prompt the controller finds not to need
steering gets a negative gain, pushed away from the concept) or the sigmoid ("sigmoid": a gain in (0, α), zero-ish
for prompts that need no steering). `d_ℓ` is the steering direction at site ℓ — any `SteeringVector` with one
vector per steered site (e.g. `mean_difference` at every layer's resid_post, normalized to each layer's typical
norm); the paper's public code adds one unit direction at every layer.

Training (`train_controller`) follows the official code: the model is frozen and only its unsteered last-token
activations are read; the controller learns binary cross-entropy with logits on s — prompts that need steering
labelled 1, prompts that do not labelled 0 — and on the batches that need steering adds
0.1·(mean|σ(w) − 0.5| + 0.01·mean σ(w)); AdamW (lr 5e-5), gradient clipping at 1.0, batches of 8, 10 epochs, one
pass over the "steer" batches then one over the "keep" batches per epoch, the state of the epoch with the lowest
mean loss kept (a true copy; the official `state_dict().copy()` is shallow and so keeps the last). Nothing but
that loss trains w: the regulariser pulls every σ(w_ℓ) to about 0.5, so the per-layer weights stay near uniform
under the paper's loss. One deviation, on by default (`standardize=True`; False reproduces the paper): the inputs
are standardized per coordinate by the training set's mean and standard deviation (kept in the controller), since
residual streams with massive activations (SmolLM2's last layers have norms near 1400) otherwise saturate every
σ(w) to 0 or 1 from the first step. Initialization and shuffling are seeded inside a forked RNG (the caller's
random state is untouched).

Lagged, not two-pass. Within one forward the layers that the controller reads (the last 4) come after most of the
layers it steers, so the gains of a forward cannot depend on that same forward's late activations. Two ways out:
two-pass (an unsteered forward of each step first, then the steered one: twice the cost, and a second key/value
cache that `model.hf.generate` cannot hold) or lagged (each forward is steered with the output the controller
computed from the previous forward's late activations). We use **lagged**, primed by one unsteered pass over the
prompts: before generation starts, the prompts run once unsteered and the controller reads each row's last prompt
token — exactly the activations it was trained on — which sets the gains of the prompt forward; from then on every
forward's late activations (read after that forward's own steering) set the next forward's gains. With
`update="prompt"` the gains from that unsteered pass are kept for the whole generation (a two-pass decision made
once per prompt). Measured on SmolLM2 with the shipped sentiment set (benchmarks/steering_controller.py): a
controller trained on prompt-final activations reads the states of generated tokens as "no steering needed", so
the lagged mode steers the first token or two and then switches itself off; `update="prompt"` keeps the decision
and, at the shift of a fixed vector, changes the distributions of prompts that need no steering far less. The
public code's hooks read the current step's unsteered late activations and in effect patch
only the last layer; that is neither choice and not what the paper describes, so we do not reproduce it.

Everything runs in one `model.session` (pathlens.generate opens it): `AddDynamic` ops at the steered sites whose
per-row gain is the controller's current output, and `Tap` ops at the read sites that hand the late activations to
the controller as the forward passes them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pathlens.errors import PathlensError
from pathlens.interventions import AddDynamic, Intervention, Selection, Tap
from pathlens.model import Model
from pathlens.results.io import load_pair, save_pair
from pathlens.sites import parse_site
from pathlens.steering.finders import layer_sites
from pathlens.steering.vector import SteeringVector, check_scale

FORMAT = "pathlens.WeightedSteering"
READ_LAYERS = 4
HIDDEN = 1024
ALPHA = 4.0
Gate = Literal["raw", "sigmoid"]
Update = Literal["step", "prompt"]
Prompts = Sequence[str] | Tensor


class Controller(nn.Module):
    """The controller network: Linear(d_in → hidden) → ReLU → Linear(hidden → 1 + n_weights), on inputs
    standardized as (x − shift) / scale (buffers; 0 and 1 — no standardization — unless training sets them)."""

    def __init__(self, d_in: int, n_weights: int, hidden: int = HIDDEN):
        super().__init__()
        self.hidden = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, 1 + n_weights)
        self.shift: Tensor
        self.scale: Tensor
        self.register_buffer("shift", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(d_in))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, d_in) → (s (B,), w (B, n_weights)): the raw scale and the per-layer weight logits."""
        z = (x - self.shift) / self.scale  # (B, d_in)
        out = self.out(torch.relu(self.hidden(z)))  # (B, 1 + n_weights)
        return out[:, 0], out[:, 1:]


@dataclass(eq=False)
class WeightedSteering:
    """A trained controller and the direction it modulates; pass it as `steer=` to `pathlens.generate`.

    controller: the network; direction: one (d,) vector per steered site (its `effective` vectors are added);
    read_sites: the sites the controller reads at each row's last token (the last 4 layers' resid_post);
    alpha: α_global; gate: "raw" (the paper) or "sigmoid" (see module docstring); update: "step" (lagged, the
    default) or "prompt" (decided once from the unsteered prompt); meta: provenance and the training record.
    """

    controller: Controller
    direction: SteeringVector
    read_sites: tuple[str, ...]
    alpha: float = ALPHA
    gate: Gate = "raw"
    update: Update = "step"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_scale(self.alpha, "alpha")
        if self.gate not in ("raw", "sigmoid"):
            raise PathlensError(f"WeightedSteering: gate {self.gate!r} is not 'raw' or 'sigmoid'.")
        if self.update not in ("step", "prompt"):
            raise PathlensError(f"WeightedSteering: update {self.update!r} is not 'step' or 'prompt'.")
        n_weights = self.controller.out.out_features - 1
        if n_weights != len(self.direction.sites):
            raise PathlensError(
                f"WeightedSteering: the controller outputs {n_weights} layer weights but the direction has "
                f"{len(self.direction.sites)} sites; give one direction per weighted site."
            )

    @property
    def sites(self) -> list[str]:
        """The steered sites, in the order of the controller's weights."""
        return self.direction.sites

    def with_(self, **changes: Any) -> "WeightedSteering":
        """A copy with `alpha`, `gate` or `update` changed (the controller is shared)."""
        return replace(self, **changes)

    def outputs(self, late: Tensor) -> tuple[Tensor, Tensor]:
        """late (B, n_read·d) → (s (B,), σ(w) (B, L)), computed without gradients."""
        with torch.no_grad():
            s, w = self.controller(late.to(self.controller.hidden.weight))
        return s, torch.sigmoid(w)

    def gains(self, late: Tensor) -> Tensor:
        """The per-row, per-site steering gains g(s)·σ(w)·α (B, L) for late activations (B, n_read·d)."""
        s, weights = self.outputs(late)
        scale = s if self.gate == "raw" else torch.sigmoid(s)
        return scale[:, None] * weights * self.alpha  # (B, L)

    def read(self, model: Model, prompts: Prompts, mask: Tensor | None = None) -> Tensor:
        """The controller's input for each prompt (N, n_read·d): the read sites at each row's last real token of an
        unsteered forward. prompts: texts, or token ids (N, P) (with `mask`, right- or left-padded)."""
        return late_inputs(model, prompts, self.read_sites, mask)

    def interventions(self, gains: Tensor) -> list[Intervention]:
        """The interventions of one generation whose first forward is steered with `gains` (B, L): an `AddDynamic`
        per steered site at each forward's last position and, with update="step", a `Tap` per read site that
        replaces the gains with the controller's output on that forward's late activations (lagged)."""
        state = _State(self, gains)
        adds = [
            Intervention(parse_site(site), AddDynamic(self.direction.effective(site), state.gain(i)), positions="last")
            for i, site in enumerate(self.sites)
        ]
        if self.update == "prompt":
            return adds
        taps = [
            Intervention(parse_site(site), Tap(state.tap(j)), positions="last")
            for j, site in enumerate(self.read_sites)
        ]
        return adds + taps

    def generation_interventions(self, model: Model, ids: Tensor, mask: Tensor) -> list[Intervention]:
        """For `pathlens.generate`: prime the gains with one unsteered pass over the left-padded prompts, then
        steer (see module docstring)."""
        self.check(model)
        return self.interventions(self.gains(self.read(model, ids, mask)))

    def check(self, model: Model) -> None:
        """Raise PathlensError unless the direction and read sites fit `model`."""
        self.direction.check(model)
        for site in self.read_sites:
            model.resolve(site)
        d_in = self.controller.hidden.in_features
        if d_in != len(self.read_sites) * model.arch.d_model:
            raise PathlensError(
                f"WeightedSteering: the controller reads {d_in} values but {len(self.read_sites)} sites of "
                f"{model.name} give {len(self.read_sites) * model.arch.d_model}; train it on this model."
            )

    # ---- files --------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `<path>.safetensors` (controller weights, directions) and `<path>.json` (how it applies)."""
        tensors = {f"controller.{k}": v.detach().contiguous().cpu() for k, v in self.controller.state_dict().items()}
        tensors.update({f"direction.{s}": self.direction.effective(s).contiguous().cpu() for s in self.sites})
        header = {
            "sites": self.sites,
            "read_sites": list(self.read_sites),
            "hidden": self.controller.hidden.out_features,
            "alpha": self.alpha,
            "gate": self.gate,
            "update": self.update,
            "meta": self.meta,
        }
        save_pair(path, FORMAT, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "WeightedSteering":
        """Read what `save` wrote (checksums checked)."""
        keys = ["sites", "read_sites", "hidden", "alpha", "gate", "update", "meta"]
        names = [
            f"controller.{k}" for k in ("hidden.weight", "hidden.bias", "out.weight", "out.bias", "shift", "scale")
        ]
        sites = _saved_sites(path)
        tensors, header = load_pair(path, FORMAT, names + [f"direction.{s}" for s in sites], keys)
        weight = tensors["controller.hidden.weight"]
        ctrl = Controller(int(weight.shape[1]), len(header["sites"]), int(header["hidden"]))
        ctrl.load_state_dict({k.removeprefix("controller."): tensors[k] for k in names})
        ctrl.eval().requires_grad_(False)
        direction = SteeringVector({s: tensors[f"direction.{s}"] for s in header["sites"]}, meta=header["meta"])
        return cls(
            ctrl,
            direction,
            tuple(header["read_sites"]),
            float(header["alpha"]),
            header["gate"],
            header["update"],
            header["meta"],
        )


def _saved_sites(path: str | os.PathLike[str]) -> list[str]:
    """The steered sites listed in a saved pair's JSON (empty if unreadable: `load_pair` then names the problem)."""
    base = Path(os.fspath(path)).expanduser()
    base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
    try:
        sites = json.loads(base.with_name(base.name + ".json").read_text(encoding="utf-8")).get("sites")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(s) for s in sites] if isinstance(sites, list) else []


class _State:
    """One generation's controller state: the current gains (B, L) and the late activations read so far."""

    def __init__(self, steering: WeightedSteering, gains: Tensor):
        self.steering = steering
        self.current = gains
        self.parts: dict[int, Tensor] = {}

    def gain(self, i: int) -> Callable[[], Tensor]:
        return lambda: self.current[:, i]

    def tap(self, j: int) -> Callable[[Tensor, Selection], None]:
        n_read = len(self.steering.read_sites)

        def read(x: Tensor, sel: Selection) -> None:
            self.parts[j] = x[:, -1].float()  # (B, d): each row's last position (positions="last", all rows)
            if len(self.parts) == n_read:
                late = torch.cat([self.parts[k] for k in range(n_read)], dim=-1)  # (B, n_read·d)
                self.current = self.steering.gains(late)
                self.parts.clear()

        return read


def late_inputs(model: Model, prompts: Prompts, sites: Sequence[str], mask: Tensor | None = None) -> Tensor:
    """`sites` at each prompt's last real token of an unsteered forward, concatenated (N, len(sites)·d)."""
    if isinstance(prompts, Tensor):
        ids = prompts.unsqueeze(0) if prompts.ndim == 1 else prompts
        model.check_ids(ids, "prompt token ids")
        mask = torch.ones_like(ids) if mask is None else model.check_mask(mask, ids)
    else:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
            raise PathlensError("prompts must be a non-empty list of texts or token ids (batch, pos).")
        ids, mask = model.tokenize(list(prompts))
    with torch.no_grad():
        cache = model.run(ids, attention_mask=mask, cache=list(sites)).cache
    columns = torch.arange(mask.shape[1])
    last = torch.where(mask.bool(), columns, -1).amax(1)  # (N,) each row's last real column
    rows = torch.arange(ids.shape[0])
    return torch.cat([cache[s][rows, last].float() for s in sites], dim=-1)  # (N, n·d)


def _count(prompts: Prompts, what: str) -> int:
    n = int(prompts.shape[0]) if isinstance(prompts, Tensor) and prompts.ndim == 2 else len(prompts)
    if n == 0:
        raise PathlensError(f"train_controller: {what} is empty; give at least one prompt.")
    return n


def train_controller(
    model: Model,
    steer: Prompts,
    keep: Prompts,
    direction: SteeringVector,
    *,
    read_layers: int = READ_LAYERS,
    hidden: int = HIDDEN,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 5e-5,
    clip: float = 1.0,
    seed: int = 0,
    alpha: float = ALPHA,
    gate: Gate = "raw",
    update: Update = "step",
    standardize: bool = True,
) -> WeightedSteering:
    """Train the controller on prompts that need steering (`steer`, label 1) and prompts that do not (`keep`,
    label 0), with the paper's loss (module docstring), the model frozen. `direction` gives one vector per steered
    site (e.g. `mean_difference(model, pos, neg, layer_sites(model))` normalized). Prompts are texts or token ids
    (N, P). Returns a `WeightedSteering` whose meta records the losses per epoch and the training seconds."""
    for name, value in (
        ("read_layers", read_layers),
        ("hidden", hidden),
        ("epochs", epochs),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PathlensError(f"train_controller: {name} must be a positive integer, got {value!r}.")
    if read_layers > model.n_layers:
        raise PathlensError(
            f"train_controller: read_layers is {read_layers} but {model.name} has {model.n_layers} layers."
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise PathlensError(f"train_controller: lr must be a positive number, got {lr!r}.")
    if not isinstance(direction, SteeringVector):
        raise PathlensError(
            f"train_controller: direction must be a SteeringVector (one vector per steered site), got "
            f"{type(direction).__name__}."
        )
    direction.check(model)
    n_steer, n_keep = _count(steer, "steer"), _count(keep, "keep")
    read_sites = tuple(layer_sites(model, "resid_post", range(model.n_layers - read_layers, model.n_layers)))
    start = time.perf_counter()
    x_steer, x_keep = late_inputs(model, steer, read_sites), late_inputs(model, keep, read_sites)
    read_seconds = time.perf_counter() - start
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ctrl = Controller(int(x_steer.shape[1]), len(direction.sites), hidden)
    if standardize:
        pooled = torch.cat([x_steer, x_keep])  # (N, d_in)
        ctrl.shift.copy_(pooled.mean(0))
        ctrl.scale.copy_(pooled.std(0).clamp_min(1e-6) if pooled.shape[0] > 1 else torch.ones_like(pooled[0]))
    shuffle = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(ctrl.parameters(), lr=lr)
    history: list[float] = []
    best: tuple[float, dict[str, Tensor]] = (math.inf, copy.deepcopy(ctrl.state_dict()))
    with torch.enable_grad():
        for _ in range(epochs):
            losses = []
            for label, x in ((1.0, x_steer), (0.0, x_keep)):
                order = torch.randperm(x.shape[0], generator=shuffle)
                for i in range(0, x.shape[0], batch_size):
                    s, w = ctrl(x[order[i : i + batch_size]])  # (b,), (b, L)
                    loss = nn.functional.binary_cross_entropy_with_logits(s, torch.full_like(s, label))
                    if label == 1.0:
                        p = torch.sigmoid(w)
                        loss = loss + 0.1 * ((p - 0.5).abs().mean() + 0.01 * p.mean())
                    opt.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    if clip > 0:
                        nn.utils.clip_grad_norm_(ctrl.parameters(), clip)
                    opt.step()
                    losses.append(float(loss.detach()))
            history.append(sum(losses) / len(losses))
            if history[-1] < best[0]:
                best = (history[-1], copy.deepcopy(ctrl.state_dict()))
    ctrl.load_state_dict(best[1])
    ctrl.eval().requires_grad_(False)
    seconds = time.perf_counter() - start - read_seconds
    meta = {
        "model": model.name,
        "method": "controller",
        "direction": dict(direction.meta),
        "n_steer": n_steer,
        "n_keep": n_keep,
        "read_layers": read_layers,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "standardize": standardize,
        "losses": history,
        "best_loss": best[0],
        "read_seconds": read_seconds,
        "train_seconds": seconds,
    }
    return WeightedSteering(ctrl, direction, read_sites, alpha, gate, update, meta)
