"""`pathlens steer`: find a steering vector from a contrast set and sweep its scale."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

if TYPE_CHECKING:
    pass

from pathlens.cli.app import app, console, load_model, option, output_folder


@app.command()
def steer(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    concept: str = typer.Option("sentiment", help="a shipped contrast set: sentiment, formality, refusal, joy, ..."),
    method: str = typer.Option("mean-diff", help="mean-diff | pca | probe"),
    layer: Optional[int] = typer.Option(None, help="layer whose resid_post is steered (default: a third up)"),  # noqa: UP045
    scales: str = typer.Option("-0.2,-0.1,0.1,0.2", help="comma list of scales, fractions of the typical norm"),
    prompts: int = typer.Option(16, min=1, max=64, help="how many shipped neutral prompts to generate from"),
    max_new_tokens: int = typer.Option(32, min=1, help="tokens generated per prompt"),
    out: Path = typer.Option(Path("out/steer"), help="output folder"),
) -> None:
    """Find a steering vector from a contrast set, sweep its scale, and write the vector, generations,
    dose-response table and PNG, and steer.json."""
    from pathlens.steering.data import CONCEPTS
    from pathlens.steering.finders import FINDERS
    from pathlens.steering.sweep import steer_study

    if concept not in CONCEPTS:
        raise typer.BadParameter(
            f"unknown concept set {concept!r}; use one of {', '.join(CONCEPTS)}.", param_hint="'--concept'"
        )
    if method not in FINDERS:
        raise typer.BadParameter(
            f"unknown method {method!r}; use one of {', '.join(FINDERS)}.", param_hint="'--method'"
        )
    try:
        scale_list = [float(s) for s in scales.split(",") if s.strip()]
    except ValueError as err:
        raise typer.BadParameter(
            f"{scales!r} is not a comma list of numbers ({err}).", param_hint="'--scales'"
        ) from err
    output_folder(out)
    loaded = load_model(model)
    with option("'--layer' or '--scales'"), console.status(f"steering {concept} with {method} …"):
        record = steer_study(loaded, concept, method, out, layer, scale_list, prompts, max_new_tokens)
    table = Table(title=f"{concept} / {method} at {record['site']}")
    for column in ("scale", "vader_mean", "vader_shift", "ppl_increase", "kl"):
        table.add_column(column, justify="right")
    for row in record["rows"]:
        table.add_row(
            *(
                f"{row[c]:+.3f}" if c != "scale" else f"{row[c]:g}"
                for c in ("scale", "vader_mean", "vader_shift", "ppl_increase", "kl")
            )
        )
    console.print(table)
    console.print(f"wrote {out}/steer.json, vector.safetensors/.json, generations.json, dose_response.csv/.png")
