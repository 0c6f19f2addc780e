"""Interventions: one way to change an activation during a run.

`Intervention(site, op, positions=None, rows=None)` applies `op` to the site's value at the chosen positions
and batch rows. `rows` lets many different interventions share one batched forward, each acting on its own
slice of the batch (e.g. K patched variants of N prompts as K*N rows).

Ops: `Replace(source)`, `Add(vector, scale)`, `Ablate("zero"|"mean"|"resample")`, `Scale(factor)`,
`Project(basis, source)`, `StopGradient()`, `ProjectOut(direction)`, `Affine(weight, bias, strength, lo, hi)`,
`ScaleSubspace(basis, factor)`, and two for steering that changes from one forward to the next: `Tap(fn)` (hands
the values to a callback, unchanged) and `AddDynamic(vector, gain)` (a per-row scale read at every forward).
Each receives the selected values `x` of shape (R, P', *rest) — R selected rows, P' selected positions, `rest` the
site's remaining dims (e.g. (d_model,), (d_head,), or (H, d_head) for a whole-layer head site) — and returns the new
values of the same shape.

Positions: `None` or `"all"` (every position of the call), `"last"` (each row's last real token, if the call
holds it), `"prompt"` / `"generated"` (each row's prompt — the forward that starts a sequence — or the tokens
generated after it, under a session held across generation), explicit positions (an int, a list, a tensor, a
boolean mask; negatives count from each row's end) or a `slice`.
Explicit positions count each row's own tokens, so a left-padded row's position 0 is its first real token;
they are resolved per forward by the session (`pathlens.hooks`), so under generation with a key/value cache
the position n is touched by whichever forward holds it.

Sources and references are given in the site's own layout (the shape `model.run` caches) and are aligned to
the selection axis by axis: along the batch axis a tensor with the full batch size is indexed by `rows`, one
with R rows is used as is, one with 1 row is broadcast; the position axis is treated the same way with the
call's length (indexed by each row's columns), P', or 1. `Op.restrict(rows, positions)` cuts an op's tensors
to given rows and a position range (a causal-cone run, a forward that continues a cached prefix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.sites import Site, parse_site

Index = None | int | slice | Sequence[int] | Tensor
Positions = Index | Literal["all", "last", "prompt", "generated"]


@dataclass
class Selection:
    """Which cells of a site's value an intervention touches in one forward.

    `rows` (R,) are batch rows of the call; `cols` (R or 1, P') the call-local column of each selected
    (row, position) — one row when every row has the same columns; `present` (R, P') marks the cells the call
    holds (None: all of them). `full_batch` / `full_len` are the call's batch size and length, used to align
    sources (see module docstring).
    """

    rows: Tensor
    cols: Tensor
    full_batch: int
    full_len: int
    present: Tensor | None = None

    @property
    def n_positions(self) -> int:
        return int(self.cols.shape[1])

    def align(self, source: Tensor, what: str) -> Tensor:
        """Index/broadcast `source` (batch, pos, *rest) to (R, P', *rest)."""
        if source.ndim < 2:
            raise PathlensError(
                f"{what}: expected a tensor with batch and position axes first (batch, pos, ...), got shape "
                f"{tuple(source.shape)}; use Add for a single vector."
            )
        src = _align_axis(source, 0, self.rows, self.full_batch, what, "batch")
        return self.align_positions(src, what)

    def align_positions(self, t: Tensor, what: str) -> Tensor:
        """Index/broadcast axis 1 of `t` (R or 1, pos, *rest) to the selected positions (.., P', *rest)."""
        size, n_sel = t.shape[1], self.n_positions
        if size == n_sel:
            return t
        if size == 1:
            return t.expand(t.shape[0], n_sel, *t.shape[2:])
        if size == self.full_len:
            cols = self.cols.to(t.device).clamp(max=size - 1)  # (R or 1, P')
            if cols.shape[0] == 1:
                return t.index_select(1, cols[0])
            return t[torch.arange(cols.shape[0], device=t.device)[:, None], cols]
        raise PathlensError(
            f"{what}: its position axis has size {size}, but the run has {self.full_len} and the intervention "
            f"selects {n_sel}; give the full size, the selected size, or 1."
        )


def _align_axis(t: Tensor, axis: int, index: Tensor, full: int, what: str, axis_name: str) -> Tensor:
    size, n_sel = t.shape[axis], index.numel()
    if size == n_sel:
        return t
    if size == full:
        return t.index_select(axis, index.to(t.device))
    if size == 1:
        return t.expand(*t.shape[:axis], n_sel, *t.shape[axis + 1 :])
    raise PathlensError(
        f"{what}: its {axis_name} axis has size {size}, but the run has {full} and the intervention selects "
        f"{n_sel}; give the full size, the selected size, or 1."
    )


def _broadcasts(shape: tuple[int, ...], cell: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` broadcasts to (rows, positions, *cell) without growing it: its trailing dims
    broadcast to `cell`, any dims before those are 1."""
    lead, tail = shape[: max(len(shape) - len(cell), 0)], shape[max(len(shape) - len(cell), 0) :]
    if len(lead) > 2 or any(d != 1 for d in lead):
        return False
    return all(a in (1, b) for a, b in zip(reversed(tail), reversed(cell), strict=False))


def restrict_tensor(t: Tensor, rows: Tensor | None, positions: slice) -> Tensor:
    """A (batch, pos, ...) tensor cut to `rows` (None: all) and `positions`; axes of size 1 broadcast and stay."""
    if rows is not None and t.shape[0] != 1:
        t = t[rows.to(t.device)]
    return t if t.shape[1] == 1 else t[:, positions]


class Op:
    """Base class: `apply(x, full, sel)` -> new values for the selected cells (same shape as x).

    `x` (R, P', *rest) holds the selected values; `full` (B, P, *rest) the site's whole current value (used by
    batch statistics such as mean ablation); `sel` the selection.
    """

    name: str = "op"
    laid_out: ClassVar[tuple[str, ...]] = ()
    example_rows: ClassVar[tuple[str, ...]] = ()
    laid_out_ndim: ClassVar[int] = 2
    broadcast: ClassVar[tuple[str, ...]] = ()

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        raise NotImplementedError

    def check_fits(self, cell: tuple[int, ...], site: str) -> None:
        """Raise PathlensError unless the op's tensors fit a site whose every (row, position) cell has shape
        `cell`: tensors laid out (batch, pos, *cell), or (for Add) a vector broadcasting to `cell`."""
        for name in self.laid_out:
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                continue
            if value.ndim >= max(self.laid_out_ndim, 2) and tuple(value.shape[2:]) == cell:
                continue
            if name in self.broadcast and _broadcasts(tuple(value.shape), cell):
                continue
            expected = f"(batch, pos, {', '.join(map(str, cell))})"
            if self.broadcast:
                expected += f" or a vector broadcasting to {cell}"
            raise PathlensError(
                f"{type(self).__name__} on {site}: its {name} has shape {tuple(value.shape)}, but each cell of the "
                f"site is {cell}; give {expected}."
            )

    def restrict(self, rows: Tensor | None, positions: slice) -> "Op":
        """This op for a run of the given task `rows` (None: all) at absolute `positions` only: its tensors laid
        out (batch, pos, ...) — the fields named in `laid_out` — are cut to match; tensors of examples that are
        not batch rows (`example_rows`, e.g. a mean-ablation reference) are cut along positions only.
        Tensors with fewer than two axes (a (d,) vector) apply everywhere and are kept."""
        changes: dict[str, Tensor] = {}
        for name in self.laid_out:
            value = getattr(self, name)
            if isinstance(value, Tensor) and value.ndim >= self.laid_out_ndim:
                changes[name] = restrict_tensor(value, None if name in self.example_rows else rows, positions)
        return dataclasses.replace(self, **changes) if changes else self  # type: ignore[type-var]


@dataclass
class Replace(Op):
    """Set the selected values to `source` (activation patching)."""

    source: Tensor
    name: str = "replace"
    laid_out: ClassVar[tuple[str, ...]] = ("source",)

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        src = sel.align(self.source, "Replace source").to(device=x.device, dtype=x.dtype)
        return src.expand_as(x) if src.shape != x.shape else src


@dataclass
class Add(Op):
    """Add `scale * vector`; vector broadcasts over the trailing dims (e.g. a (d_model,) steering vector)."""

    vector: Tensor
    scale: float = 1.0
    name: str = "add"
    laid_out: ClassVar[tuple[str, ...]] = ("vector",)
    laid_out_ndim: ClassVar[int] = 3  # a (d,) or (H, d) vector applies everywhere; (batch, pos, ...) is laid out
    broadcast: ClassVar[tuple[str, ...]] = ("vector",)

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        vec = self.vector.to(device=x.device, dtype=x.dtype)
        if vec.ndim >= 2 and vec.ndim == x.ndim:
            vec = sel.align(vec, "Add vector")
        return x + self.scale * vec


@dataclass
class Scale(Op):
    """Multiply the selected values by `factor` (0 removes, 2 enhances)."""

    factor: float
    name: str = "scale"

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        return x * self.factor


@dataclass
class Ablate(Op):
    """Zero, mean or resample ablation.

    mean: the mean over the batch of `reference` (reference examples, in the site's layout) or, without a
    reference, of the running batch — per position. resample: each selected row takes the values of a random
    row of `reference` (or of the running batch), drawn with `seed`.
    """

    how: Literal["zero", "mean", "resample"] = "zero"
    reference: Tensor | None = None
    seed: int = 0
    name: str = field(default="ablate")
    laid_out: ClassVar[tuple[str, ...]] = ("reference",)
    example_rows: ClassVar[tuple[str, ...]] = ("reference",)

    def __post_init__(self) -> None:
        if self.how not in ("zero", "mean", "resample"):
            raise PathlensError(f"Ablate: unknown kind {self.how!r}; use 'zero', 'mean' or 'resample'.")

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        if self.how == "zero":
            return torch.zeros_like(x)
        ref = full.detach() if self.reference is None else self.reference.to(device=x.device, dtype=x.dtype)
        if self.how == "mean":
            mean = ref.mean(dim=0, keepdim=True)
            return sel.align(mean, "Ablate mean reference").expand_as(x).clone()
        gen = torch.Generator().manual_seed(self.seed)
        pick = torch.randint(ref.shape[0], (x.shape[0],), generator=gen).to(ref.device)
        return sel.align_positions(ref.index_select(0, pick), "Ablate resample")


@dataclass
class Project(Op):
    """Subspace patch: replace the component of x in span(basis) with that of `source`.

    basis: (d, k) with orthonormal columns (checked), over the last dim of the site; x <- x + (src - x) B Bᵀ.
    """

    basis: Tensor
    source: Tensor
    name: str = "project"
    laid_out: ClassVar[tuple[str, ...]] = ("source",)

    def __post_init__(self) -> None:
        b = self.basis
        if b.ndim != 2:
            raise PathlensError(f"Project: basis must be (d, k), got shape {tuple(b.shape)}.")
        gram = b.T.double() @ b.double()
        if not torch.allclose(gram, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-4):
            raise PathlensError(
                "Project: basis columns must be orthonormal; orthonormalize with torch.linalg.qr(basis).Q."
            )

    def check_fits(self, cell: tuple[int, ...], site: str) -> None:
        super().check_fits(cell, site)
        if not cell or self.basis.shape[0] != cell[-1]:
            raise PathlensError(
                f"Project on {site}: its basis has shape {tuple(self.basis.shape)}, but the site's last dim is "
                f"{cell[-1] if cell else 'absent'}; give a ({cell[-1] if cell else 'd'}, k) basis."
            )

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        basis = self.basis.to(device=x.device, dtype=x.dtype)
        src = sel.align(self.source, "Project source").to(device=x.device, dtype=x.dtype)
        return x + ((src - x) @ basis) @ basis.T


@dataclass
class StopGradient(Op):
    """Leave the selected values unchanged, but let no gradient flow back through them (e.g. GradDrop in AtP*).

    Only meaningful in a run with `grad=True`: the forward is bit-identical, while everything upstream of the
    selected cells receives no gradient through them.
    """

    name: str = "stop_gradient"

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        return x.detach()


@dataclass
class Intervention:
    """Apply `op` to `site` at `positions` (None or "all", "last", explicit, a slice) in batch `rows` (None = all)."""

    site: Site
    op: Op
    positions: Positions = None
    rows: Index = None
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        self.site = parse_site(self.site)
        if not isinstance(self.op, Op):
            raise PathlensError(
                f"Intervention op must be Replace, Add, Ablate, Scale or Project, got {type(self.op).__name__}."
            )


def index_tensor(index: Sequence[int] | Tensor | int, size: int, what: str) -> Tensor:
    """Explicit rows/positions as a long tensor: integers as given, a boolean mask of length `size` as the indices
    where it is true. Floats and masks of another length are errors naming `what`."""
    t = torch.as_tensor(index)
    if t.dtype == torch.bool:
        if t.ndim != 1 or t.numel() != size:
            raise PathlensError(
                f"{what}: a boolean mask must have one entry per index ({size}), got shape {tuple(t.shape)}; "
                "pass a mask of that length or integer indices."
            )
        return t.nonzero().reshape(-1)
    if t.is_floating_point() or t.is_complex():
        raise PathlensError(
            f"{what}: indices must be integers, got {t.reshape(-1)[:5].tolist()}; round them yourself "
            "(e.g. positions=[6]) or pass a boolean mask."
        )
    return t.to(torch.long).reshape(-1)


def resolve_index(index: Index, size: int, what: str) -> Tensor:
    """Normalize rows/positions to a long tensor in [0, size); negatives count from the end; a boolean mask of
    length `size` selects where it is true."""
    if index is None:
        return torch.arange(size)
    if isinstance(index, slice):
        return torch.arange(size)[index]
    t = index_tensor(index, size, what)
    if t.numel() == 0:
        raise PathlensError(f"{what}: empty selection; pass at least one index or None for all.")
    bad = (t < -size) | (t >= size)
    if bool(bad.any()):
        raise PathlensError(
            f"{what} {t[bad].tolist()} out of range for size {size}; valid indices are 0..{size - 1} "
            f"(or -{size}..-1 from the end)."
        )
    return t % size


def check_finite(iv: Intervention) -> None:
    """Reject an intervention whose op carries NaN or inf (a source, vector, basis, reference or factor): it would
    make whole rows NaN, including positions before the patched one. `Intervention(..., allow_nonfinite=True)`
    opts out."""
    if iv.allow_nonfinite:
        return
    for name, value in vars(iv.op).items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise PathlensError(
                f"the {type(iv.op).__name__} on {iv.site}: its {name} holds {bad} NaN/inf value(s); fix the "
                "tensor, or pass Intervention(..., allow_nonfinite=True) if that is intended."
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise PathlensError(
                f"the {type(iv.op).__name__} on {iv.site}: its {name} is {value}; pass a finite number, or "
                "Intervention(..., allow_nonfinite=True) if that is intended."
            )


@dataclass
class ProjectOut(Op):
    """Remove the component along `direction` from the selected values: x <- x - (x . r) r with r = direction / |r|
    (directional ablation, Arditi et al.). `direction` is (d,) over the site's last dim and applies everywhere;
    a zero direction is an error (it names no direction)."""

    direction: Tensor
    name: str = "project_out"

    def __post_init__(self) -> None:
        d = self.direction
        if not isinstance(d, Tensor) or d.ndim != 1:
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise PathlensError(f"ProjectOut: direction must be a (d,) vector, got {shape}.")
        if not bool(torch.isfinite(d).all()) or float(d.double().norm()) == 0.0:
            raise PathlensError("ProjectOut: direction must be finite and non-zero; it names the direction to remove.")

    def check_fits(self, cell: tuple[int, ...], site: str) -> None:
        if not cell or self.direction.shape[0] != cell[-1]:
            raise PathlensError(
                f"ProjectOut on {site}: its direction has {self.direction.shape[0]} entries, but the site's last dim "
                f"is {cell[-1] if cell else 'absent'}; give a ({cell[-1] if cell else 'd'},) direction."
            )

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        r = self.direction.to(device=x.device, dtype=x.dtype)
        r = r / r.norm()
        return x - (x @ r)[..., None] * r


@dataclass
class Affine(Op):
    """A per-unit affine map, interpolated from the identity by `strength` λ:
    x <- (1 - λ) x + λ (weight ⊙ x + bias), computed as x + λ ((weight - 1) ⊙ x + bias) so that weight 1 and bias 0
    (or λ = 0) leave x bit-identical. With `lo` and/or `hi`, only values strictly inside (lo, hi), unit by unit,
    move (a transport map fitted on a source range leaves values outside it as they are; Linear-AcT).

    weight, bias, lo, hi: (d,) vectors over the site's trailing dims (anything broadcasting to a cell), or laid out
    (batch, pos, *cell) like Add's vector (e.g. (B, 1, d): one map per row); lo / hi None: unbounded. The map is
    computed in at least float32 and written back in the site's dtype; gradients flow to weight and bias (learned
    steering trains them through a session with grad=True).
    """

    weight: Tensor
    bias: Tensor
    strength: float = 1.0
    lo: Tensor | None = None
    hi: Tensor | None = None
    name: str = "affine"
    laid_out: ClassVar[tuple[str, ...]] = ("weight", "bias", "lo", "hi")
    laid_out_ndim: ClassVar[int] = 3
    broadcast: ClassVar[tuple[str, ...]] = ("weight", "bias", "lo", "hi")

    def __post_init__(self) -> None:
        for what in self.laid_out:
            value = getattr(self, what)
            if value is None and what in ("lo", "hi"):
                continue
            if not isinstance(value, Tensor) or not value.is_floating_point():
                kind = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
                raise PathlensError(f"Affine: {what} must be a float tensor ((d,) per unit), got {kind}.")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise PathlensError(f"Affine: strength must be a number, got {self.strength!r}.")

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)  # (R, P', *cell)

        def aligned(t: Tensor, what: str) -> Tensor:
            t = t.to(device=x.device, dtype=dtype)
            return sel.align(t, f"Affine {what}") if t.ndim >= 2 and t.ndim == x.ndim else t

        moved = xf + self.strength * ((aligned(self.weight, "weight") - 1) * xf + aligned(self.bias, "bias"))
        if self.lo is None and self.hi is None:
            return moved.to(x.dtype)
        inside = torch.ones_like(xf, dtype=torch.bool)
        if self.lo is not None:
            inside = inside & (xf > aligned(self.lo, "lo"))
        if self.hi is not None:
            inside = inside & (xf < aligned(self.hi, "hi"))
        return torch.where(inside, moved, xf).to(x.dtype)


@dataclass
class ScaleSubspace(Op):
    """Multiply the component of the selected values in span(basis) by `factor`: x <- x + (factor - 1) (x B) Bᵀ.

    basis: (d, k) with orthonormal columns (checked) over the site's last dim; k = 0 leaves x bit-identical. factor 0
    removes the subspace (ProjectOut for k directions at once). EigenShift applies it at the final norm's output to
    the chosen right singular vectors of the unembedding, which equals scaling their singular values by `factor`.
    """

    basis: Tensor
    factor: float
    name: str = "scale_subspace"

    def __post_init__(self) -> None:
        b = self.basis
        if not isinstance(b, Tensor) or b.ndim != 2 or not b.is_floating_point():
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise PathlensError(f"ScaleSubspace: basis must be a (d, k) float tensor, got {shape}.")
        gram = b.T.double() @ b.double()
        if not torch.allclose(gram, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-4):
            raise PathlensError(
                "ScaleSubspace: basis columns must be orthonormal; orthonormalize with torch.linalg.qr(basis).Q."
            )
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise PathlensError(f"ScaleSubspace: factor must be a number, got {self.factor!r}.")

    def check_fits(self, cell: tuple[int, ...], site: str) -> None:
        if not cell or self.basis.shape[0] != cell[-1]:
            raise PathlensError(
                f"ScaleSubspace on {site}: its basis has shape {tuple(self.basis.shape)}, but the site's last dim is "
                f"{cell[-1] if cell else 'absent'}; give a ({cell[-1] if cell else 'd'}, k) basis."
            )

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        basis = self.basis.to(device=x.device, dtype=dtype)  # (d, k)
        xf = x.to(dtype)  # (R, P', d)
        return (xf + (self.factor - 1.0) * ((xf @ basis) @ basis.T)).to(x.dtype)


@dataclass
class Tap(Op):
    """Leave the selected values unchanged and hand them, detached, to `fn(x, sel)` — x (R, P', *rest) — as the
    forward passes them: for a value that an op later in the same forward, or in the next one, depends on (a
    steering controller reads late layers this way to set the next generation step's strength)."""

    fn: Callable[[Tensor, Selection], None]
    name: str = "tap"

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        self.fn(x.detach(), sel)
        return x


@dataclass
class AddDynamic(Op):
    """Add `gain() * vector`, with `gain` called at every forward: a scalar, or one scale per row of the call —
    (batch,) over the call's full batch, or (R,) over the selected rows. For steering whose strength changes from
    one forward to the next (a controller's current output during generation). `vector` broadcasts over the
    trailing dims like Add's (e.g. a (d_model,) direction)."""

    vector: Tensor
    gain: Callable[[], Tensor]
    name: str = "add_dynamic"
    laid_out: ClassVar[tuple[str, ...]] = ("vector",)
    laid_out_ndim: ClassVar[int] = 3
    broadcast: ClassVar[tuple[str, ...]] = ("vector",)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor) or not self.vector.is_floating_point() or self.vector.ndim > 2:
            shape = tuple(self.vector.shape) if isinstance(self.vector, Tensor) else type(self.vector).__name__
            raise PathlensError(f"AddDynamic: vector must be a float (d,) tensor, got {shape}.")
        if not callable(self.gain):
            raise PathlensError(f"AddDynamic: gain must be a callable returning the scales, got {self.gain!r}.")

    def apply(self, x: Tensor, full: Tensor, sel: Selection) -> Tensor:
        gain = torch.as_tensor(self.gain()).to(device=x.device, dtype=x.dtype)
        rows = sel.rows.numel()
        if gain.ndim == 1 and gain.shape[0] == sel.full_batch:
            gain = gain.index_select(0, sel.rows.to(x.device))
        elif gain.ndim != 0 and tuple(gain.shape) != (rows,):
            raise PathlensError(
                f"AddDynamic: gain returned shape {tuple(gain.shape)}; return a scalar, ({sel.full_batch},) for the "
                f"call's batch or ({rows},) for the selected rows."
            )
        if not bool(torch.isfinite(gain).all()):
            raise PathlensError("AddDynamic: gain returned NaN/inf; the steering scale must be finite.")
        scale = gain.reshape(-1, *([1] * (x.ndim - 1))) if gain.ndim else gain  # (R, 1, ...) or ()
        return x + scale * self.vector.to(device=x.device, dtype=x.dtype)
