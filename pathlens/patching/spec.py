"""What a patching experiment is, said once for every method that runs or estimates one.

`patch`, `atp`, `relp`, `atp_star` and `integrated_gradients` share their first eight parameters: the model,
the task, and the six options a `PatchSpec` holds (`edge_attribution` shares the direction and the metric).
`PatchSpec.resolve(model, task)` does what each of them did first: pick the metric (the task's unless one is
given), give the task that metric, choose the base and source prompts of the direction, plan the variants, and
start the `meta` dict every result records. The option types (`Direction`, `SweepGroup`, `Positions`) are
`Literal`s, so a type checker catches a misspelt option before a run does.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.interventions import Project
from pathlens.model import Model
from pathlens.patching.plan import Plan, make_plan
from pathlens.sites import Site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric, metric_name

Direction = Literal["denoise", "noise"]
""""denoise": the corrupted prompts run with clean activations patched in; "noise": the reverse."""
DIRECTIONS: tuple[str, ...] = get_args(Direction)
DEFAULT_DIRECTION: Direction = "noise"
"""The direction of every method when none is given (`patch`, `atp`, `atp_star`, `integrated_gradients`,
`relp`, `edge_attribution`, `edge_effects`, `discover`, the CLI): "noise", the clean prompts run with
corrupted activations patched in. It is what circuit discovery and faithfulness measure (ACDC, EAP/EAP-IG and
MIB's circuit track all remove edges from the clean run), so a node score, the edge scores summed over its
outgoing edges and a circuit's faithfulness describe the same experiment: how much the clean behaviour needs
that component. Pass direction="denoise" to ask what restores the clean behaviour in the corrupted run."""

SweepGroup = Literal[
    "heads",
    "z",
    "q",
    "k",
    "v",
    "attn_out",
    "mlp_in",
    "mlp_out",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "neurons",
    "attn",
    "mlp",
    "resid",
]
"""A named group of sites to sweep (see `pathlens.patching.plan`); "neurons" takes `neurons={layer: [i, ...]}`;
"attn", "mlp" and "resid" are short for "attn_out", "mlp_out" and "resid_pre"."""

Sites = SweepGroup | Sequence[Site | str]
Positions = Literal["all", "each"] | Sequence[int]


def check_option(name: str, value: object, choices: Collection[object]) -> None:
    """Raise PathlensError naming the option, its valid values and the value given, unless `value` is one."""
    if value not in choices:
        raise PathlensError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def runs_for(task: Task, direction: str) -> tuple[Tensor, Tensor]:
    """(base ids, source ids) of a direction: denoise runs the corrupted prompts with clean activations."""
    check_option("direction", direction, DIRECTIONS)
    return (task.corrupt_ids, task.clean_ids) if direction == "denoise" else (task.clean_ids, task.corrupt_ids)


@dataclass(frozen=True)
class PatchSpec:
    """The patching experiment a method runs or estimates: `sites` at `positions`, patched in `direction`,
    scored by `metric` (None: the task's), restricted to `layers`, with `neurons` for sites="neurons".
    `subspace` (d, k) orthonormal columns: patch only the component of each site in its span (`Project`, the
    subspace patch of METHODS §2) instead of the whole value; None patches the whole value."""

    sites: Sites = "heads"
    positions: Positions = "all"
    direction: Direction = DEFAULT_DIRECTION
    metric: Metric | None = None
    layers: Sequence[int] | None = None
    neurons: Mapping[int, Sequence[int]] | None = None
    subspace: Tensor | None = None

    def __post_init__(self) -> None:
        check_option("direction", self.direction, DIRECTIONS)
        if self.subspace is not None:
            basis = getattr(self.subspace, "basis", self.subspace)  # a pathlens.subspace.Subspace or its basis
            if not isinstance(basis, Tensor):
                raise PathlensError(f"subspace must be a (d, k) tensor or a Subspace, got {type(basis).__name__}.")
            object.__setattr__(self, "subspace", basis)
            Project(basis, basis.new_zeros(1, 1, basis.shape[0]))  # checks the shape and orthonormal columns

    def resolve(self, model: Model, task: Task) -> ResolvedSpec:
        """This spec for `model` and `task`: the metric chosen and the task carrying it."""
        task.check_vocab(model.vocab_size)
        metric = task.metric if self.metric is None else self.metric
        return ResolvedSpec(self, model, task.with_metric(metric), metric)


@dataclass(frozen=True)
class ResolvedSpec:
    """A `PatchSpec` for one model and task: what every method needs before its first forward."""

    spec: PatchSpec
    model: Model
    task: Task  # carries `metric`
    metric: Metric

    @property
    def direction(self) -> Direction:
        return self.spec.direction

    @property
    def metric_name(self) -> str:
        return metric_name(self.metric)

    @property
    def runs(self) -> tuple[Tensor, Tensor]:
        """(base ids, source ids) of the direction (see `runs_for`)."""
        return runs_for(self.task, self.direction)

    @cached_property
    def plan(self) -> Plan:
        """The variants of the sweep (planned on first use: edge methods need none)."""
        s = self.spec
        return make_plan(self.model, s.sites, s.positions, self.task.seq_len, layers=s.layers, neurons=s.neurons)

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The meta every result records (model, task, number of prompts), then `extra`."""
        return {"model": self.model.name, "task": self.task.name, "n_prompts": self.task.n, **extra}
