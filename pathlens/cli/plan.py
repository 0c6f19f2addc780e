"""`pathlens plan`: what a run will cost (forwards, backwards, tokens per forward, peak memory, time) before it runs.

The methods are named as the commands that run them: `patch`; `attribute`'s atp, atp*, relp, ig (nodes) and eap,
eap-ig (edges; relp with --edges); `circuit` (discovery, its scoring named by --discovery); `curve` (a faithfulness
curve: edge patching of the top-k circuits of a scored graph, what `circuit` measures per ranking); `store` (with
the store command's --sites, --tokens, --corpus, --context and --batch-size).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Optional

import typer
from rich.table import Table

from pathlens.cli.app import app, console, load_model, option, site_group, task_choice
from pathlens.errors import PathlensError
from pathlens.memory import megabytes, parse_bytes
from pathlens.model import Model
from pathlens.patching.estimate import Estimate
from pathlens.patching.spec import DEFAULT_DIRECTION, Direction
from pathlens.report.studies import task_for
from pathlens.tasks import TASKS
from pathlens.tasks.base import Task

NODE_METHODS = ("atp", "atp*", "relp", "ig")
EDGE_METHODS = ("eap", "eap-ig")
PLANNED_METHODS = ("patch", *NODE_METHODS, *EDGE_METHODS, "curve", "circuit", "store")
DISCOVERY_SCORES = ("eap", "eap-ig", "relp", "patching")


@app.command()
def plan(
    method: str = typer.Option("patch", help=f"one of {', '.join(PLANNED_METHODS)}"),
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help=f"one of {', '.join(TASKS)}"),
    sites: Optional[str] = typer.Option(  # noqa: UP045 (typer reads the annotation)
        None, help="heads (default) | resid | mlp | attn, or any family of pathlens.patch; store: a comma list of sites"
    ),
    positions: str = typer.Option("all", help="all | each"),
    direction: Direction = typer.Option(DEFAULT_DIRECTION, help="noise | denoise"),
    edges: bool = typer.Option(False, "--edges", help="relp: score edges (as `attribute --edges`)"),
    steps: int = typer.Option(5, min=1, help="integration steps (ig, eap-ig, circuit with eap-ig)"),
    discovery: str = typer.Option("eap-ig", help=f"circuit: the scoring, one of {', '.join(DISCOVERY_SCORES)}"),
    sizes: str = typer.Option("20", help="curve: how many log-spaced circuit sizes, or mib"),
    n: int = typer.Option(8, min=1, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed (store: the window order)"),
    max_memory: Optional[str] = typer.Option(None, help="memory budget, e.g. 2GB (sizes the chunks)"),  # noqa: UP045
    max_batch_tokens: Optional[int] = typer.Option(None, min=1, help="most tokens in one forward"),  # noqa: UP045
    tokens: str = typer.Option("1M", help="store: tokens to run through the model"),
    corpus: str = typer.Option("default", help="store: 'default', a .txt/.jsonl file or folder"),
    context: int = typer.Option(128, min=2, help="store: tokens per context window"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="store: windows per forward (default 8)"),  # noqa: UP045
) -> None:
    """Print the forwards, backwards, tokens per forward, estimated peak memory and time of a run, before running
    it; the chunks are sized by the engine's own cost model, so the run makes the forwards printed here."""
    if method not in PLANNED_METHODS:
        raise typer.BadParameter(
            f"unknown method {method!r}; plan estimates {', '.join(PLANNED_METHODS)}.", param_hint="'--method'"
        )
    if edges and method not in ("relp", *EDGE_METHODS):
        raise typer.BadParameter(f"{method} has no --edges form; use relp, eap or eap-ig.", param_hint="'--edges'")
    if positions not in ("all", "each"):
        raise typer.BadParameter("use all or each.", param_hint="'--positions'")
    if discovery not in DISCOVERY_SCORES:
        raise typer.BadParameter(
            f"unknown scoring {discovery!r}; use one of {', '.join(DISCOVERY_SCORES)} (ACDC's forwards depend on each "
            "decision, so it has no plan).",
            param_hint="'--discovery'",
        )
    if max_memory is not None:
        with option("'--max-memory'"):
            parse_bytes(max_memory, "--max-memory")
            if max_batch_tokens is not None:
                raise PathlensError("pass --max-memory or --max-batch-tokens, not both.")
    if method == "store":
        if max_batch_tokens is not None:
            raise typer.BadParameter("the store takes --batch-size (windows).", param_hint="'--max-batch-tokens'")
        found, title = _plan_store(model, sites or "L6.mlp_post", tokens, corpus, context, batch_size, seed, max_memory)
        _print(found, title)
        return
    if batch_size is not None:
        raise typer.BadParameter("--batch-size is the store's; pass --max-batch-tokens.", param_hint="'--batch-size'")
    family, task = site_group(sites or "heads"), task_choice(task)
    count = _curve_sizes(sizes)
    loaded = load_model(model)
    with option("'--task'"):
        built = task_for(loaded, task, n, seed)
    estimator = _estimator(method, edges, family, positions, direction, steps, discovery, count)
    with option("'--max-memory'" if max_memory is not None else "'--method'"):
        found = estimator(loaded, built, max_batch_tokens, max_memory)
    what = family if method in ("patch", *NODE_METHODS) and not edges else "edges"
    _print(found, f"plan: {found.method} {what} of {loaded.name} on {task}, {built.n} prompts")


def _print(found: Estimate, title: str) -> None:
    console.print(estimate_table(found, title))
    for note in found.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


Estimator = Callable[[Model, Task, Optional[int], Optional[str]], Estimate]  # noqa: UP045


def _estimator(
    method: str,
    edges: bool,
    family: str,
    positions: str,
    direction: str,
    steps: int,
    discovery: str,
    sizes: int | Literal["mib"],
) -> Estimator:
    """The estimate function of `method` with its options bound: (model, task, max_batch_tokens, max_memory)."""
    from pathlens.attribution.estimate import estimate_first_order, estimate_ig
    from pathlens.circuits.estimate import estimate_curve, estimate_discover, estimate_edge_attribution
    from pathlens.patching.estimate import estimate_patch

    if method == "patch":
        return lambda m, t, tokens, memory: estimate_patch(
            m, t, family, positions, direction, None, None, tokens, memory
        )
    if method in ("atp", "atp*", "relp") and not edges:
        return lambda m, t, tokens, memory: estimate_first_order(
            m, t, method, family, positions, direction, None, tokens, memory
        )
    if method == "ig":
        return lambda m, t, tokens, memory: estimate_ig(m, t, family, positions, direction, None, steps, tokens, memory)
    if method in ("relp", *EDGE_METHODS):
        return lambda m, t, tokens, memory: estimate_edge_attribution(
            m, t, method, direction, steps, max_batch_tokens=tokens, max_memory=memory
        )
    if method == "curve":
        return lambda m, t, tokens, memory: estimate_curve(m, t, sizes, direction, tokens, memory)
    return lambda m, t, tokens, memory: estimate_discover(m, t, discovery, direction, steps, tokens, memory)


def _curve_sizes(sizes: str) -> int | Literal["mib"]:
    """The --sizes value: a count of log-spaced circuit sizes, or "mib" (MIB's edge fractions)."""
    if sizes == "mib":
        return "mib"
    if not sizes.isdigit() or int(sizes) < 2:
        raise typer.BadParameter(f"{sizes!r}: give a count of at least 2, or mib.", param_hint="'--sizes'")
    return int(sizes)


def _plan_store(
    model: str,
    sites: str,
    tokens: str,
    corpus: str,
    context: int,
    batch_size: int | None,
    seed: int,
    max_memory: str | None,
) -> tuple[Estimate, str]:
    """The store's estimate for the `pathlens store` options, after cutting the corpus into its windows."""
    from pathlens.features.corpus import corpus as corpus_of
    from pathlens.features.corpus import parse_token_count, windows
    from pathlens.features.estimate import estimate_store

    names = [s.strip() for s in sites.split(",") if s.strip()]
    with option("'--tokens'"):
        n_tokens = parse_token_count(tokens)
    with option("'--corpus'"):
        source = corpus_of(corpus)
    loaded = load_model(model)
    with console.status(f"tokenizing {source.name} …"), option("'--corpus'"):
        wins = windows(source, loaded.tokenizer, context, n_tokens, seed)
    with option("'--sites'" if max_memory is None else "'--max-memory'"):
        found = estimate_store(loaded, names, wins, batch_size=batch_size, max_memory=max_memory)
    return found, f"plan: store {', '.join(names)} of {loaded.name}, {len(wins)} windows of {wins.context} tokens"


def estimate_table(found: Estimate, title: str) -> Table:
    """The estimate as a two-column table."""
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("estimate", justify="right")
    forwards = str(found.forwards) if found.forwards_max is None else f"{found.forwards} to {found.forwards_max}"
    rows = [(f"{name}", str(count)) for name, count in found.units.items()]
    rows += [
        ("forwards", forwards),
        ("backwards", str(found.backwards)),
        ("tokens per forward (at most)", str(found.max_batch_tokens)),
        ("peak memory (MB, besides weights)", f"{megabytes(found.peak_bytes)}"),
        ("least budget that runs it (MB)", f"{megabytes(found.least_bytes)}"),
        ("time (s, from a timed probe forward)", f"{found.seconds:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
