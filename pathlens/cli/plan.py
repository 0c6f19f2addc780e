"""`pathlens plan`: what a run will cost (forwards, peak memory, time) before running it."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from pathlens.cli.app import app, console, load_model, option, site_group, task_choice
from pathlens.memory import megabytes
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction
from pathlens.report.studies import task_for

PLANNED_METHODS = ("patch",)


@app.command()
def plan(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help="task name"),
    method: str = typer.Option("patch", help=f"one of {', '.join(PLANNED_METHODS)}"),
    sites: str = typer.Option("heads", help="heads | resid | mlp | attn, or any family of pathlens.patch"),
    positions: str = typer.Option("all", help="all | each"),
    direction: Direction = typer.Option(DEFAULT_DIRECTION, help="noise | denoise"),
    n: int = typer.Option(8, min=1, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    max_memory: Optional[str] = typer.Option(None, help="memory budget, e.g. 2GB (sizes the chunks)"),  # noqa: UP045
    max_batch_tokens: Optional[int] = typer.Option(None, min=1, help="most tokens in one forward"),  # noqa: UP045
) -> None:
    """Print the forwards, tokens per forward, estimated peak memory and time of a run, before running it."""
    from pathlens.patching.estimate import estimate_patch

    if method not in PLANNED_METHODS:
        raise typer.BadParameter(
            f"plan estimates {', '.join(PLANNED_METHODS)} so far, not {method!r}.", param_hint="'--method'"
        )
    if positions not in ("all", "each"):
        raise typer.BadParameter("use all or each.", param_hint="'--positions'")
    family, task = site_group(sites), task_choice(task)
    loaded = load_model(model)
    with option("'--task'"):
        built = task_for(loaded, task, n, seed)
    with option("'--max-memory'"):
        found = estimate_patch(
            loaded,
            built,
            sites=family,
            positions=positions,
            direction=direction,
            max_batch_tokens=max_batch_tokens,
            max_memory=max_memory,
        )
    table = Table(title=f"plan: {method} {family} ({positions}) of {loaded.name} on {task}, {built.n} prompts")
    table.add_column("quantity")
    table.add_column("estimate", justify="right")
    for name, value in (
        ("variants (cells)", str(found.variants)),
        ("forwards (2 base runs + chunks)", str(found.forwards)),
        ("tokens per forward (at most)", str(found.max_batch_tokens)),
        ("peak memory (MB, besides weights)", f"{megabytes(found.peak_bytes)}"),
        ("least budget that runs it (MB)", f"{megabytes(found.least_bytes)}"),
        ("time (s, from one timed forward)", f"{found.seconds:.1f}"),
    ):
        table.add_row(name, value)
    console.print(table)
