"""Node circuits over any mix of sites — heads, MLP outputs and the latents of spliced dictionaries.

Edge circuits with feature nodes need no code here: while a transcoder, an SAE on an MLP's output or an SAE on the
residual stream between two layers is spliced (`pathlens.features.splice`), its latents and error term are nodes of
the edge graph, so `pathlens.circuits.edge_attribution`, `EdgePatcher` and `discover` return circuits whose edges
run e.g. `L2.H0 → L3.tc.F12 → L5.H1.q` (`pathlens.circuits.layout`, "Spliced dictionaries").

`node_circuit` is the node-level analogue of `pathlens.circuits.discover`, for any set of sites including those
the edge graph does not hold (the sparse feature circuits of Marks et al. 2024): every node is scored by AtP
(`pathlens.atp`, one forward pair and one backward for all of them), nodes are ranked by |effect|, and the
circuit is the smallest top-K whose exact faithfulness reaches `target` (sizes 1, 2, 4, ... and then a bisection
between the last two):

    faithfulness(C) = (m(C) − m(∅)) / (m(M) − m(∅))

where m(C) is the metric of the base run with every node *outside* C patched to its source-run value (direction
"noise": the clean prompts, corrupted values — what discovery and faithfulness patch everywhere in pathlens),
m(M) the base run and m(∅) every node patched. The nodes should not overlap (e.g. every head and MLP of the
layers after a residual-stream dictionary's layer, plus that dictionary's latents and error term); a latent whose
value is the same in both runs is left out of the patches (patching it changes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pathlens.attribution import atp
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from pathlens.model import Model
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction, runs_for
from pathlens.sites import parse_site
from pathlens.tasks.base import Task
from pathlens.tasks.metrics import Metric


@dataclass
class NodeCircuit:
    """The kept nodes (ranked by |AtP effect|), every scored node's effect, the circuit's faithfulness, the
    faithfulness at each size tried and the metric of the full and the fully patched runs."""

    nodes: list[str]
    effects: dict[str, float]
    faithfulness: float
    curve: list[tuple[int, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"circuit of {len(self.nodes)} nodes, faithfulness {self.faithfulness:.3f} "
            f"(m(M) = {self.meta['full']:.3f}, m(empty) = {self.meta['empty']:.3f}):"
        ]
        lines += [f"  {i + 1:>3}. {n:<16} AtP effect {self.effects[n]:+.4f}" for i, n in enumerate(self.nodes)]
        return "\n".join(lines)


def node_circuit(
    model: Model,
    task: Task,
    nodes: Sequence[str],
    target: float = 0.8,
    sizes: Sequence[int] | None = None,
    direction: Direction = DEFAULT_DIRECTION,
    metric: Metric | None = None,
) -> NodeCircuit:
    """The smallest top-K circuit of `nodes` (site strings; latents of spliced dictionaries included) reaching
    `target` faithfulness, trying `sizes` (default: 1, 2, 4, ... up to all nodes, then bisecting between the last
    size below the target and the first above it; the faithfulness may not grow monotonically with the size, so
    the bisection finds a size reaching the target, not always the smallest); see the module docstring."""
    if not nodes:
        raise PathlensError("node_circuit: give at least one node (a site such as 'L3.H2' or 'L6.sae.F12').")
    names = [str(model.resolve(n, write=True)) for n in nodes]
    metric = metric or task.metric
    scores = atp(model, task, sites=names, direction=direction, metric=metric)
    base_metric = float(scores.meta["base_metric"])
    effects = {n: float(v) - base_metric for n, v in zip(names, scores.values.tolist(), strict=True)}
    ranked = sorted(names, key=lambda n: -abs(effects[n]))
    base_ids, source_ids = runs_for(task, direction)
    mask = task.attention_mask
    with torch.no_grad():
        source = model.run(source_ids, attention_mask=mask, cache=names).cache
        base = model.run(base_ids, attention_mask=mask, cache=names).cache
    moving = [n for n in names if not torch.equal(source[n], base[n])]

    def patched_metric(kept: set[str]) -> float:
        ivs = [Intervention(parse_site(n), Replace(source[n])) for n in moving if n not in kept]
        with torch.no_grad():
            logits = model.run(base_ids, attention_mask=mask, interventions=ivs).logits
        return float(metric(logits, task).mean())

    full, empty = patched_metric(set(names)), patched_metric(set())
    if abs(full - empty) < 1e-9:
        raise PathlensError(
            "node_circuit: patching every node does not change the metric, so no circuit of these nodes explains "
            "it; include the components that carry the behaviour."
        )

    def faithfulness(size: int) -> float:
        value = (patched_metric(set(ranked[:size])) - empty) / (full - empty)
        curve.append((size, value))
        return value

    tried = sorted({min(len(ranked), max(1, int(s))) for s in sizes} if sizes else _doubling(len(ranked)))
    curve: list[tuple[int, float]] = []
    below = 0
    for size in tried:
        if faithfulness(size) >= target:
            break
        below = size
    chosen, score = curve[-1]
    if score >= target and not sizes:  # bisect between the last size below the target and the first above it
        low, high = below, chosen
        while high - low > 1:
            middle = (low + high) // 2
            value = faithfulness(middle)
            low, high = (low, middle) if value >= target else (middle, high)
            if value >= target:
                chosen, score = middle, value
    curve.sort()
    return NodeCircuit(
        nodes=ranked[:chosen],
        effects=effects,
        faithfulness=score,
        curve=curve,
        meta={"full": full, "empty": empty, "target": target, "direction": direction, "n_nodes": len(names)},
    )


def _doubling(n: int) -> list[int]:
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return [*sizes, n]
