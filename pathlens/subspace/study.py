"""`subspace_study`: find a direction on training pairs, check it for the illusion on held-out pairs, write it all.

What `pathlens subspace` runs: builds the counterfactual train/test split of the task (IOI: disjoint templates,
names, places and objects; test pairs all change the answer), finds a 1-D subspace at the site with the chosen
finder on the training pairs, runs `illusion_check` on the test pairs, and writes `direction.safetensors` +
`direction.json` (the subspace), `subspace.json` (the flag, every table row, the decomposition, the split) and
`subspace.png`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pathlens.errors import PathlensError
from pathlens.model import Model
from pathlens.patching import patch
from pathlens.sites import Site
from pathlens.subspace.basis import Subspace
from pathlens.subspace.das import das
from pathlens.subspace.finders import FINDERS
from pathlens.subspace.illusion import IllusionReport, illusion_check
from pathlens.tasks.base import Task
from pathlens.tasks.ioi import ioi

STUDY_FINDERS = ("das", *FINDERS)
IMPORTANT_PROMPTS = 40
"""How many test pairs the head-patching sweep behind heads="important" runs on."""
COUNTERFACTUAL_TASKS = ("ioi",)


def counterfactual_split(model: Model, task: str, n_train: int, n_test: int, seed: int) -> tuple[Task, Task]:
    """(train, test) counterfactual tasks: disjoint halves of templates and names; every test pair flips."""
    if task not in COUNTERFACTUAL_TASKS:
        raise PathlensError(
            f"task {task!r} has no built-in counterfactual pairs; use one of {', '.join(COUNTERFACTUAL_TASKS)}, or "
            "build your own with pathlens.tasks.counterfactual_task and call pathlens.subspace.das / illusion_check."
        )
    train = ioi(model.tokenizer, n=n_train, seed=seed, corrupt="position", split="train")
    test = ioi(model.tokenizer, n=n_test, seed=seed + 1, corrupt="position", split="test", flip=1.0)
    return train, test


def find_subspace(model: Model, finder: str, train: Task, site: Site | str, seed: int = 0, **das_kw: Any) -> Subspace:
    """The 1-D subspace of `finder` ("das", "mean-diff", "probe", "gradient") at `site` from the training pairs."""
    if finder == "das":
        return das(model, train, site, seed=seed, **das_kw)
    if finder not in FINDERS:
        raise PathlensError(f"unknown finder {finder!r}; use one of {', '.join(STUDY_FINDERS)}.")
    return FINDERS[finder](model, train, site)


def important_heads(model: Model, task: Task, after_layer: int, k: int = 3) -> list[str]:
    """The k heads of layers > `after_layer` whose patching (noising, the task's metric) moves it most."""
    layers = list(range(after_layer + 1, model.n_layers))
    if not layers:
        raise PathlensError(f"important_heads: no layer after {after_layer}; pick an earlier site.")
    scores = patch(model, task, sites="heads", layers=layers, progress=False)
    effect = (scores.values - float(scores.meta["base_metric"])).abs().flatten()
    top = torch.topk(effect, min(k, effect.numel())).indices
    n = model.n_heads
    return [f"L{layers[int(i) // n]}.H{int(i) % n}" for i in top]


def subspace_study(
    model: Model,
    task: str,
    site: str,
    finder: str,
    out: str | os.PathLike[str],
    n_train: int = 200,
    n_test: int = 200,
    seed: int = 0,
    heads: Sequence[str] | None = None,
    parts: Sequence[str] = ("q", "k", "v"),
    **das_kw: Any,
) -> tuple[IllusionReport, Subspace, dict[str, Any]]:
    """Find, check and write (module docstring); returns (report, subspace, the split record).

    heads: for residual sites, the heads whose q/k/v (`parts`) read the site; ["important"]: the 3 heads after
    the site that noising patching on the test pairs finds most important (`important_heads`); None: every head
    of the next attention layer."""
    resolved = model.resolve(site, write=True)
    train, test = counterfactual_split(model, task, n_train, n_test, seed)
    subspace = find_subspace(model, finder, train, resolved, seed, **das_kw)
    if heads is not None and list(heads) == ["important"]:
        if resolved.kind not in ("resid_pre", "resid_mid", "resid_post") or resolved.layer is None:
            raise PathlensError(f"heads='important' names the heads that read a residual site, not {resolved}.")
        after = resolved.layer - (1 if resolved.kind == "resid_pre" else 0)
        heads = important_heads(model, test.rows(list(range(min(IMPORTANT_PROMPTS, test.n)))), after)
    report = illusion_check(model, subspace, test, heads=heads, parts=parts)
    folder = Path(out)
    subspace.save(folder / "direction")
    train_split, test_split = train.meta.get("split", {}), test.meta.get("split", {})
    split: dict[str, Any] = {"train": {"n": train.n, **train_split}, "test": {"n": test.n, **test_split}}
    for key in ("names", "templates"):
        split[f"disjoint_{key}"] = not set(train_split.get(key, [])) & set(test_split.get(key, []))
    report.meta.update({"finder": finder, "split": split, "heads": list(heads) if heads else None})
    report.save(folder, "subspace")
    return report, subspace, split
