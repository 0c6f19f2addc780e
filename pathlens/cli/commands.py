"""The core commands: list models, print a model's sites, run the demo, patching, attribution, circuit
discovery and the results index."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
import typer
from rich.table import Table

from pathlens.circuits.discover import DiscoveryMethod, Ranking
from pathlens.circuits.edge_attribution import EdgeMethod
from pathlens.errors import PathlensError
from pathlens.loading import EMBEDDED
from pathlens.memory import parse_bytes
from pathlens.model import Model
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction
from pathlens.patching.sweep import DEFAULT_MAX_BATCH_TOKENS
from pathlens.report.index import write_index
from pathlens.report.studies import SweepSummary, circuit_study, demo_study, task_for, write_sweep
from pathlens.results import Scores
from pathlens.results.io import write_text
from pathlens.tasks import TASKS

if TYPE_CHECKING:
    from pathlens.attribution.compare import Comparison

from pathlens.cli.app import app, console, load_model, option, output_folder, site_group, task_choice
from pathlens.cli.steer import print_steering


@app.command()
def models() -> None:
    """List the embedded models (they run offline)."""
    table = Table(title="embedded models")
    table.add_column("name")
    table.add_column("what")
    for name, what in EMBEDDED.items():
        table.add_row(name, what)
    console.print(table)
    console.print("Any local folder or Hugging Face hub name also works: pathlens sites gpt2")


def sites_table(model: Model) -> Table:
    """A rich table of the model's site families, shapes and meanings."""
    table = Table(title=f"sites of {model.name} ({model.arch.family})")
    for col in ("site", "shape", "layers", "meaning"):
        table.add_column(col)
    for info in model.sites:
        table.add_row(info.name, "(" + ", ".join(str(s) for s in info.shape) + ")", info.layers, info.description)
    return table


@app.command()
def sites(model: str = typer.Argument(..., help="embedded name, local folder or hub name")) -> None:
    """Print every site of MODEL with its shape (b = batch, p = positions)."""
    loaded = load_model(model, "MODEL")
    console.print(sites_table(loaded))
    a = loaded.arch
    console.print(
        f"index forms: L{{l}}.H{{h}} (head 0..{a.n_heads - 1}), L{{l}}.G{{g}}.k / .v (key-value group "
        f"0..{a.n_kv_heads - 1}; head h reads group h // {a.n_heads // a.n_kv_heads}), L{{l}}.N{{n}} (neuron)"
    )
    for note in a.notes:
        console.print(f"note: {note}")


@app.command()
def demo(
    model: str = typer.Option("smollm2", help="model to run on"),
    n: int = typer.Option(8, min=1, help="number of IOI prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    out: Path = typer.Option(Path("out/demo"), help="folder for the table, PNG and scores"),
) -> None:
    """IOI on an embedded model: clean vs corrupted logit difference, top heads by direct logit attribution,
    activation patching of every head and of the residual stream per (layer, position), an EAP-IG circuit
    with its faithfulness curve, pathways and HTML report, and a short steering section (a sentiment vector
    steered both ways, with its cost and pathways)."""
    output_folder(out)
    loaded = load_model(model)
    if loaded.tokenizer is None:
        raise typer.BadParameter(
            f"{model} has no tokenizer; the IOI demo needs one (e.g. smollm2 or gemma3-270m).", param_hint="'--model'"
        )
    console.print("running the IOI demo: metric, direct logit attribution, patching sweeps, circuit …")
    study = demo_study(loaded, out, n=n, seed=seed, progress=True)
    task = study.task
    example = task.prompts[0] if task.prompts else ""
    console.print(
        f"IOI task: {task.n} prompt pairs, e.g. [italic]{example!r}[/] → "
        f"{loaded.to_str_tokens(task.answer_ids[:1])[0]!r}"
    )
    table = Table(title="IOI: metric")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("clean_logit_diff", "corrupt_logit_diff", "accuracy_answer_over_wrong", "top1_accuracy"):
        table.add_row(key, f"{study.summary[key]:.3f}")
    console.print(table)
    heads = Table(title="top 10 heads by direct logit attribution (logit diff, mean over prompts)")
    for col in ("head", "DLA"):
        heads.add_column(col, justify="right")
    for row in study.top_heads.to_dict("records"):
        heads.add_row(f"L{row['layer']}.H{row['head']}", f"{row['value']:+.3f}")
    console.print(heads)
    for sweep in study.sweeps:
        console.print(sweep_table(sweep))
    print_circuit(study.circuit, out / "circuit")
    if study.steering is not None:
        print_steering(study.steering, title=f"steering: sentiment (mean-diff) at {study.steering['site']}")
    console.print(
        f"wrote {out}/: dla_heads, patch_heads, patch_resid (.png/.safetensors/.json/.csv), circuit/ (report.html), "
        "steer/ (steer.html), summary.json"
    )


CliPositions = Literal["all", "each"]  # the position choices a command line can name (a library call may list ints)


def sweep_table(sweep: SweepSummary) -> Table:
    """The top-10 table of a written sweep, for printing."""
    table = Table(title=f"{sweep.title}: top 10 by |effect| (patched − base run)")
    for col in [*sweep.dims, "effect"]:
        table.add_column(col, justify="right")
    for row in sweep.top.to_dict("records"):
        table.add_row(*[str(row[d]) for d in sweep.dims], f"{row['value']:+.3f}")
    return table


@app.command()
def patch(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help=f"one of {', '.join(TASKS)}"),
    sites: str = typer.Option("heads", help="heads | resid | mlp | attn, or any family of pathlens.patch"),
    positions: CliPositions = typer.Option("all", help="all | each"),
    direction: Direction = typer.Option(DEFAULT_DIRECTION, help="noise (default: what circuits patch) | denoise"),
    n: int = typer.Option(8, min=1, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    max_batch_tokens: Optional[int] = typer.Option(  # noqa: UP045
        None, min=1, help=f"most tokens in one patched forward (default {DEFAULT_MAX_BATCH_TOKENS})"
    ),
    max_memory: Optional[str] = typer.Option(None, help="memory budget, e.g. 2GB (sizes the chunks instead)"),  # noqa: UP045
    out: Path = typer.Option(Path("out/patch"), help="output folder (a killed sweep resumes from it)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="discard the progress saved in --out and start over"),
) -> None:
    """Activation patching sweep: scores (safetensors + JSON), heatmap PNG and a table."""
    from pathlens.patching import patch as run_patch

    family, task = site_group(sites), task_choice(task)
    if max_memory is not None:
        with option("'--max-memory'"):
            parse_bytes(max_memory, "--max-memory")
            if max_batch_tokens is not None:
                raise PathlensError("pass --max-memory or --max-batch-tokens, not both.")
    output_folder(out)
    loaded = load_model(model)
    with option("'--task'"):
        built = task_for(loaded, task, n, seed)
    scores = run_patch(
        loaded,
        built,
        sites=family,
        positions=positions,
        direction=direction,
        max_batch_tokens=max_batch_tokens,
        max_memory=max_memory,
        out=out / "progress",
        overwrite=overwrite,
        progress=True,
    )
    console.print(f"clean metric {scores.meta['clean_metric']:.3f}, corrupted {scores.meta['corrupt_metric']:.3f}")
    name = f"{family}_{positions}"
    console.print(sweep_table(write_sweep(scores, out, name, f"{loaded.name} {task}: {family} ({direction})")))
    console.print(f"wrote {out}/{name}.safetensors/.json/.png/.csv")


NODE_METHODS = ("atp", "atp*", "relp", "ig")
EDGE_METHODS: dict[str, EdgeMethod] = {"atp": "eap", "eap": "eap", "eap-ig": "eap-ig", "relp": "relp"}


def comparison_table(result: "Comparison", title: str) -> Table:
    table = Table(title=title)
    for col in ("family", *result.table.columns):
        table.add_column(str(col), justify="right")
    for family, row in result.table.iterrows():
        table.add_row(str(family), *[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.tolist()])
    return table


@app.command()
def attribute(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help=f"one of {', '.join(TASKS)}"),
    method: str = typer.Option("atp", help="atp | atp* | relp | ig (nodes) | eap | eap-ig (edges)"),
    sites: str = typer.Option("heads", help="heads | resid | mlp | attn, or any family of pathlens.patch"),
    positions: CliPositions = typer.Option("all", help="all | each"),
    direction: Optional[Direction] = typer.Option(  # noqa: UP045 (typer reads the annotation)
        None, help="noise (default, nodes and edges: what circuits patch) | denoise"
    ),
    edges: bool = typer.Option(False, "--edges", help="score every edge of the model's graph instead of nodes"),
    steps: int = typer.Option(5, min=1, help="integration steps of eap-ig"),
    n: int = typer.Option(8, min=1, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    compare_exact: bool = typer.Option(False, "--compare-exact", help="also run exact patching and compare"),
    out: Path = typer.Option(Path("out/attribute"), help="output folder"),
) -> None:
    """Gradient attribution (AtP, AtP*, RelP; EAP / EAP-IG / RelP edges) with an optional exact comparison."""
    from pathlens.attribution import atp, atp_star, compare, integrated_gradients, relp
    from pathlens.circuits import edge_attribution
    from pathlens.patching import patch as run_patch

    if method not in NODE_METHODS + tuple(EDGE_METHODS):
        raise typer.BadParameter(
            f"unknown method {method!r}; use atp, atp*, relp, ig, eap or eap-ig.", param_hint="'--method'"
        )
    edges = edges or method in ("eap", "eap-ig")
    if edges and method not in EDGE_METHODS:
        raise typer.BadParameter(
            f"{method} is node-level only; for --edges use eap, eap-ig or relp.", param_hint="'--method'"
        )
    family, task = site_group(sites), task_choice(task)
    output_folder(out)
    loaded = load_model(model)
    with option("'--task'"):
        built = task_for(loaded, task, n, seed)
    if edges:
        edge_direction = direction or DEFAULT_DIRECTION
        start = time.perf_counter()
        graph = edge_attribution(loaded, built, method=EDGE_METHODS[method], direction=edge_direction, steps=steps)
        seconds = time.perf_counter() - start
        graph.save(out / "graph")
        write_text(out / "edges.csv", graph.to_frame().to_csv(index=False))
        table = Table(title=f"{loaded.name} {task}: top 15 edges by |score| ({graph.method}, {seconds:.1f} s)")
        for col in ("sender", "receiver", "score"):
            table.add_column(col, justify="right")
        for row in graph.top(15).to_dict("records"):
            table.add_row(row["sender"], row["receiver"], f"{row['score']:+.4f}")
        console.print(table)
        console.print(f"{graph.edges_total} edges; wrote {out}/graph.safetensors/.json and edges.csv")
        if compare_exact:
            exact = run_patch(loaded, built, sites="heads", direction=edge_direction, progress=True)
            node = graph.node_scores()
            names = [f"L{layer}.H{h}" for layer in exact.coords["layer"] for h in exact.coords["head"]]
            summed = exact.with_values(
                torch.tensor([node[x] for x in names]).view(exact.shape) + graph.meta["base_metric"]
            )
            summed.meta["base_metric"] = graph.meta["base_metric"]
            result = compare({"heads": exact}, {"heads": summed}, labels=("exact", graph.method))
            result.plot(out / "compare.png")
            console.print(comparison_table(result, "heads: outgoing edge sums vs exact patching"))
        return
    estimators: dict[str, Callable[..., Scores]] = {
        "atp": atp,
        "atp*": atp_star,
        "relp": relp,
        "ig": integrated_gradients,
    }
    estimator = estimators[method]
    start = time.perf_counter()
    direction = direction or DEFAULT_DIRECTION
    estimate = estimator(loaded, built, sites=family, positions=positions, direction=direction)
    seconds = time.perf_counter() - start
    name = f"{method.replace('*', '_star')}_{family}_{positions}"
    title = f"{loaded.name} {task}: {method} {family} ({seconds:.1f} s)"
    console.print(sweep_table(write_sweep(estimate, out, name, title)))
    if compare_exact:
        start = time.perf_counter()
        exact = run_patch(loaded, built, sites=family, positions=positions, direction=direction, progress=True)
        exact_seconds = time.perf_counter() - start
        result = compare({family: exact}, {family: estimate}, labels=("exact", method))
        result.plot(out / f"{name}_vs_exact.png")
        write_text(out / f"{name}_vs_exact.csv", result.table.to_csv())
        console.print(
            comparison_table(result, f"{method} vs exact patching ({seconds:.1f} s vs {exact_seconds:.1f} s)")
        )
    console.print(f"wrote {out}/{name}.*")


def print_circuit(record: dict[str, Any], out: Path) -> None:
    """Print a circuit study's pathways table and one line of its figures."""
    routes = record["paths"]
    table = Table(title=f"top {len(routes)} pathways (own faithfulness: only that path's edges kept)")
    for col in ("rank", "path", "score", "own F"):
        table.add_column(col, justify="right")
    for r in routes:
        table.add_row(str(r["rank"]), " → ".join(r["nodes"]), f"{r['score']:.3g}", f"{r['faithfulness']:+.3f}")
    console.print(table)
    console.print(
        f"circuit: {record['n_edges']} of {record['edges_total']} edges ({record['fraction']:.1%}), normalized "
        f"faithfulness {record['faithfulness']:.3f} ({record['ablation']} ablation, {record['direction']}, "
        f"{record['metric']}); {record['seconds']:.1f} s; wrote {out}/report.html, summary.json, "
        "circuit.safetensors/.json (pathlens.graph.Graph.load), curve.png, circuit.png"
    )


@app.command()
def circuit(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help=f"one of {', '.join(TASKS)}"),
    method: DiscoveryMethod = typer.Option("eap-ig", help="eap | eap-ig | relp | patching | acdc"),
    top_paths: int = typer.Option(10, min=1, help="how many diverse pathways to list"),
    top_k: Optional[int] = typer.Option(  # noqa: UP045 (typer reads the annotation)
        None, min=1, help="circuit size in edges (default: smallest reaching --target)"
    ),
    target: float = typer.Option(0.8, help="normalized faithfulness the circuit must reach"),
    steps: int = typer.Option(5, min=1, help="integration steps of eap-ig"),
    by: Ranking = typer.Option("auto", help="edge ranking: auto (the better of abs and support) | abs | support"),
    n: int = typer.Option(8, min=1, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    max_memory: Optional[str] = typer.Option(None, help="memory budget, e.g. 2GB (sizes the edge forwards)"),  # noqa: UP045
    out: Path = typer.Option(Path("out/circuit"), help="output folder"),
) -> None:
    """Circuit discovery with faithfulness curve, pathways and an offline HTML report."""
    task = task_choice(task)
    if max_memory is not None:
        with option("'--max-memory'"):
            parse_bytes(max_memory, "--max-memory")
    output_folder(out)
    loaded = load_model(model)
    with option("'--task'"):
        built = task_for(loaded, task, n, seed)
    with console.status(f"discovering the {task} circuit with {method} …"):
        record = circuit_study(loaded, built, task, method, out, top_paths, top_k, target, steps, by, max_memory)
    print_circuit(record, out)


@app.command()
def report(folder: Path = typer.Argument(..., help="a folder results were written to (searched recursively)")) -> None:
    """Write FOLDER/index.html: one page linking every result under FOLDER (sweeps, attribution, circuits,
    reports, figures), each with its summary line."""
    console.print(f"wrote {write_index(folder)}")
