"""`pathlens subspace`: find a direction at a site, check it for the interpretability illusion, write it all."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pathlens.cli.app import app, console, load_model, option, output_folder


@app.command()
def subspace(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help="a task with built-in counterfactual pairs: ioi"),
    site: str = typer.Option("L15.mlp_post", help="where the direction lives, e.g. L15.mlp_post or L15.resid_post"),
    finder: str = typer.Option("das", help="das | mean-diff | probe | gradient"),
    n_train: int = typer.Option(200, min=2, help="training pairs (disjoint templates and names from the test pairs)"),
    n_test: int = typer.Option(200, min=1, help="held-out test pairs (every one flips the position label)"),
    epochs: int = typer.Option(30, min=1, help="DAS epochs"),
    seed: int = typer.Option(0, help="seed of the pairs, the DAS initialisation and order, and the placebo"),
    heads: Optional[str] = typer.Option(  # noqa: UP045
        None,
        help="residual sites: comma list of heads whose weights read the site, or 'important' (the 3 heads after "
        "it that patching finds most important); default: every head of the next layer",
    ),
    parts: str = typer.Option("q,k,v", help="which of the named heads' q/k/v weights read a residual site"),
    out: Path = typer.Option(Path("out/subspace"), help="output folder"),
) -> None:
    """Find a 1-D subspace at SITE with FINDER on training pairs, check it for the interpretability illusion on
    held-out pairs, and write the decomposition table (subspace.json, subspace.png) and the direction
    (direction.safetensors + direction.json)."""
    from pathlens.subspace.study import COUNTERFACTUAL_TASKS, STUDY_FINDERS, subspace_study

    if finder not in STUDY_FINDERS:
        raise typer.BadParameter(
            f"unknown finder {finder!r}; use one of {', '.join(STUDY_FINDERS)}.", param_hint="'--finder'"
        )
    if task not in COUNTERFACTUAL_TASKS:
        raise typer.BadParameter(
            f"task {task!r} has no built-in counterfactual pairs; use {', '.join(COUNTERFACTUAL_TASKS)}.",
            param_hint="'--task'",
        )
    part_list = [p.strip() for p in parts.split(",") if p.strip()]
    if not part_list or any(p not in ("q", "k", "v") for p in part_list):
        raise typer.BadParameter(f"{parts!r}: give a comma list of q, k, v.", param_hint="'--parts'")
    head_list = [h.strip() for h in heads.split(",") if h.strip()] if heads else None
    output_folder(out)
    loaded = load_model(model)
    with option("'--site' or '--heads'"):
        loaded.resolve(site, write=True)
    with console.status(f"{finder} at {site} …"):
        report, _, split = subspace_study(
            loaded,
            task,
            site,
            finder,
            out,
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            heads=head_list,
            parts=part_list,
            **({"epochs": epochs} if finder == "das" else {}),
        )
    table = Table(title=f"{finder} at {site}: illusion {'RAISED' if report.illusion else 'not raised'}")
    for column in ("intervention", "accuracy", "logit_diff", "fldd %"):
        table.add_column(column, justify="right")
    for row in report.rows:
        acc = "—" if row["intervention"] == "clean" else f"{row['accuracy']:.3f}"
        table.add_row(row["intervention"], acc, f"{row['logit_diff']:.3f}", f"{row['fldd']:.2f}")
    console.print(table)
    console.print(report.meta["flag_rule"])
    parts_of = report.decomposition
    console.print(
        f"row-space part {parts_of['row_norm']:.3f}, null-space part {parts_of['null_norm']:.3f} of the direction"
        f" (readers: {', '.join(parts_of['readers'][:6])}"
        f"{' …' if len(parts_of['readers']) > 6 else ''}); split: {split['train']['n']} train / "
        f"{split['test']['n']} test pairs, disjoint templates {split['disjoint_templates']}, names "
        f"{split['disjoint_names']}"
    )
    console.print(f"[green]wrote[/] {out / 'subspace.json'}, {out / 'subspace.png'}, {out / 'direction.safetensors'}")
