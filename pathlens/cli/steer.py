"""`pathlens steer`: find a steering vector from a contrast set, sweep its scale, explain it, write an HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from pathlens.cli.app import app, console, load_model, option, output_folder

_COLUMNS = ("scale", "vader_mean", "vader_shift", "ppl_increase", "kl")

DEFAULT_SCALES = "-0.2,-0.1,0.1,0.2"  # for vectors; learned methods read this default as their own


def print_steering(record: dict[str, Any], title: str) -> None:
    """The dose–response table, one before/after example and the pathways of a steer study's record."""
    table = Table(title=title)
    for column in _COLUMNS:
        table.add_column(column, justify="right")
    for row in record["rows"]:
        table.add_row(*(f"{row[c]:+.3f}" if c != "scale" else f"{row[c]:g}" for c in _COLUMNS))
    console.print(table)
    for example in record.get("examples", [])[:1]:
        for key, text in example.items():
            console.print(f"[bold]{key}[/]: {text!r}", markup=True, highlight=False)
    explanation = record.get("explanation")
    if explanation and "skipped" in explanation:
        console.print(f"why it works: not computed ({explanation['skipped']})", highlight=False)
    elif explanation:
        console.print(
            f"why it works: concept metric {explanation['unsteered_metric']:+.3f} unsteered → "
            f"{explanation['steered_metric']:+.3f} steered (scale {explanation['scale']:g}); strongest pathways:"
        )
        for path in explanation["paths"][:5]:
            console.print(f"  {' → '.join(path['nodes'])}  ({path['score']:.3g})", highlight=False)


@app.command()
def steer(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    concept: str = typer.Option("sentiment", help="a shipped contrast set: sentiment, formality, refusal, joy, ..."),
    method: str = typer.Option(
        "mean-diff", help="mean-diff | pca | probe | lineas | linear-act | controller | eigenshift"
    ),
    layer: Optional[int] = typer.Option(None, help="layer whose resid_post is steered (default: a third up)"),  # noqa: UP045
    scales: str = typer.Option(
        DEFAULT_SCALES,
        help="comma list of scales: fractions of the typical norm (vectors), strengths λ (lineas, linear-act; "
        "default 1,2,3), α (controller) or β (eigenshift)",
    ),
    prompts: int = typer.Option(16, min=1, max=64, help="how many shipped neutral prompts to generate from"),
    max_new_tokens: int = typer.Option(32, min=1, help="tokens generated per prompt"),
    positions: str = typer.Option("all", help="where the vector is added: all | prompt | generated | last"),
    sample: bool = typer.Option(False, "--sample/--greedy", help="seeded sampling instead of greedy decoding"),
    seed: int = typer.Option(0, help="sampling seed"),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="attribute the effect to heads, MLPs, edges"),
    out: Path = typer.Option(Path("out/steer"), help="output folder"),
) -> None:
    """Find a steering vector from a contrast set, sweep its scale, explain why it works, and write the vector,
    generations, dose-response table and PNG, steer.json and steer.html."""
    from pathlens.report.steer_page import write_steer_page
    from pathlens.steering.data import CONCEPTS
    from pathlens.steering.finders import FINDERS
    from pathlens.steering.learned.study_controller import LEARNED_METHODS, learned_study
    from pathlens.steering.learned.study_transport import METHODS as TRANSPORT_METHODS
    from pathlens.steering.learned.study_transport import transport_study
    from pathlens.steering.sweep import steer_study
    from pathlens.steering.vector import POLICIES

    if concept not in CONCEPTS:
        raise typer.BadParameter(
            f"unknown concept set {concept!r}; use one of {', '.join(CONCEPTS)}.", param_hint="'--concept'"
        )
    if method not in FINDERS and method not in TRANSPORT_METHODS and method not in LEARNED_METHODS:
        raise typer.BadParameter(
            f"unknown method {method!r}; use one of {', '.join([*FINDERS, *TRANSPORT_METHODS, *LEARNED_METHODS])}.",
            param_hint="'--method'",
        )
    if positions not in POLICIES:
        raise typer.BadParameter(
            f"unknown positions policy {positions!r}; use one of {', '.join(POLICIES)}.", param_hint="'--positions'"
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
        if method in TRANSPORT_METHODS:  # scales are strengths λ of the fitted maps (1: the maps as fitted)
            strengths = [1.0, 2.0, 3.0] if scales == DEFAULT_SCALES else scale_list  # the vector default means λ's
            record = transport_study(
                loaded, concept, method, out, layer, strengths, prompts, max_new_tokens, seed, do_sample=sample
            )
        elif method in LEARNED_METHODS:  # scales are α (controller) or β (eigenshift); the vector default means theirs
            chosen = None if scales == DEFAULT_SCALES else scale_list
            record = learned_study(loaded, concept, method, out, chosen, min(prompts, 32), max_new_tokens, seed)
        else:
            record = steer_study(
                loaded,
                concept,
                method,
                out,
                layer,
                scale_list,
                prompts,
                max_new_tokens,
                seed,
                do_sample=sample,
                positions=positions,  # type: ignore[arg-type]  # checked against POLICIES above
                explain_vector=explain,
            )
    page = write_steer_page(out, record)
    print_steering(record, title=f"{concept} / {method} at {record['site']}")
    written = [Path(record["vector"]).name, "steer.json", *(Path(f).name for f in record.get("files", {}).values())]
    console.print(f"wrote {page} and, in {out}: {', '.join(dict.fromkeys(written))}")
