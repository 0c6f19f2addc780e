"""Path patching (Wang et al. 2022): the effect of each sender on chosen receivers only, batched over senders.

For sender u and receivers R, the run changes exactly the edges u → r (r ∈ R): each receiver in R reads the
residual stream with u's write replaced by its source value, and every other component reads the unchanged
stream — so u's effect reaches the metric only through R. With a receiver's own input copy (its q, k or v, its
MLP input, the logits) this is edge patching (METHODS.md §7); the standard two-step implementation (run with u
patched and every other head frozen, record R's inputs, run with R's inputs set) gives the same numbers on
attention-only models, where no MLP sits between u and R (tested). In models with MLPs the two-step version
also lets u act on R through the MLPs between them; here those MLPs see the unpatched u.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pathlens.circuits.edge_effects import metrics_without
from pathlens.circuits.edge_patching import EdgePatcher
from pathlens.errors import PathlensError
from pathlens.results import Scores
from pathlens.sites import Node, parse_node
from pathlens.tasks.metrics import metric_name


def receiver_inputs(patcher: EdgePatcher, receivers: Sequence[str]) -> list[int]:
    """Receiver columns for names: an input ("L3.H1.q", "L3.G0.k", "L3.mlp", "logits") or a head ("L3.H1":
    its query and the key and value of its key-value group)."""
    names = patcher.layout.receivers
    per_group = patcher.model.arch.n_heads // patcher.model.arch.n_kv_heads
    kv_letter = "H" if per_group == 1 else "G"
    cols: list[int] = []
    for name in receivers:
        node = parse_node(name)
        wanted = [name]
        if node is not None and node.kind == "head" and node.index is not None:
            group = node.index // per_group
            wanted = [str(Node("q", node.layer, node.index))]
            wanted += [str(Node(kind, node.layer, group, grouped=per_group > 1)) for kind in ("k", "v")]
        for w in wanted:
            if w not in names:
                raise PathlensError(
                    f"unknown receiver {name!r}; use a head (L3.H1), an input (L3.H1.q, L3.{kv_letter}0.k, L3.mlp) "
                    "or 'logits'."
                )
            cols.append(names.index(w))
    return sorted(set(cols))


def path_patch(patcher: EdgePatcher, senders: Sequence[str], receivers: Sequence[str]) -> Scores:
    """Patched metric (batch mean) for each sender's path to `receivers`, dims ("sender",); meta has the base
    metric and `percent`: (m − m_base) / |m_base| · 100 per sender, the IOI paper's reading."""
    cols = receiver_inputs(patcher, receivers)
    names = patcher.layout.senders
    unknown = [s for s in senders if s not in names]
    if unknown:
        raise PathlensError(f"unknown senders {unknown}; senders are 'input', heads 'L3.H1' and MLPs 'L3.mlp'.")
    n, k = len(senders), len(cols)
    circuit = torch.arange(n).repeat_interleave(k)  # circuit i drops sender i's edges into every column
    sender = torch.tensor([names.index(s) for s in senders], dtype=torch.long).repeat_interleave(k)
    receiver = torch.tensor(cols, dtype=torch.long).repeat(n)
    base, values = metrics_without(patcher, n, circuit, sender, receiver)
    patched = values.float()
    return Scores(
        values=patched,
        dims=("sender",),
        coords={"sender": list(senders)},
        metric=metric_name(patcher.metric),
        method="path-patch",
        meta={
            "base_metric": base,
            "receivers": list(receivers),
            "percent": [float((v - base) / abs(base) * 100) if base else float("nan") for v in patched],
        },
    )
