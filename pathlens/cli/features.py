"""`pathlens store` (collect activations into a store) and the `pathlens features` group with `snmf`.

`features_app` is the `pathlens features` sub-command group: other feature commands (sae, transcoder) register on
it from their own modules with `@features_app.command("name")`.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from pathlens.cli.app import app, console, load_model, option, output_folder
from pathlens.errors import PathlensError
from pathlens.memory import parse_bytes
from pathlens.patching.executor import EXECUTORS
from pathlens.results.io import write_text
from pathlens.sites import parse_site

features_app = typer.Typer(no_args_is_help=True, help="Feature dictionaries: semi-NMF (snmf), sparse autoencoders.")
app.add_typer(features_app, name="features")

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _site_list(sites: str) -> list[str]:
    names = [s.strip() for s in sites.split(",") if s.strip()]
    if not names:
        raise typer.BadParameter("give at least one site, e.g. L6.mlp_post,L12.resid_post.", param_hint="'--sites'")
    with option("'--sites'"):
        return [str(parse_site(s)) for s in names]


@app.command()
def store(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    sites: str = typer.Option("L6.mlp_post", help="comma list of sites, e.g. L6.mlp_post,L12.resid_post"),
    tokens: str = typer.Option("1M", help="tokens to run through the model: 4096, 250k, 1M"),
    corpus: str = typer.Option(
        "default",
        help="'default' (offline: World English Bible), a .txt/.jsonl file or folder, hf:NAME or hf:NAME/CONFIG",
    ),
    context: int = typer.Option(128, min=2, help="tokens per context window"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="windows per forward (default 8)"),  # noqa: UP045
    max_mb: Optional[int] = typer.Option(  # noqa: UP045
        None, min=1, help="memory budget of the store's buffers, MiB (sets the shard size; default 512)"
    ),
    max_memory: Optional[str] = typer.Option(  # noqa: UP045
        None, help="memory budget per process, e.g. 2GB: sets the batch and shard sizes (instead of the two above)"
    ),
    executor: str = typer.Option("local", help="local | ray (shards computed on Ray workers)"),
    address: Optional[str] = typer.Option(  # noqa: UP045
        None, help="Ray cluster address (ray://head:10001, head:6379, auto); default: start a local cluster"
    ),
    workers: Optional[int] = typer.Option(None, min=1, help="Ray workers (default: one per CPU)"),  # noqa: UP045
    dtype: str = typer.Option("float32", help="float32 | float16 | bfloat16"),
    seed: int = typer.Option(0, help="seed of the document and window order"),
    out: Path = typer.Option(Path("out/store"), help="store folder (a killed run resumes from it)"),
) -> None:
    """Collect activations at SITES over a corpus into a sharded, checksummed, resumable store."""
    from pathlens.features.corpus import corpus as corpus_of
    from pathlens.features.corpus import parse_token_count, windows
    from pathlens.features.store import collect

    names = _site_list(sites)
    with option("'--tokens'"):
        n_tokens = parse_token_count(tokens)
    if dtype not in DTYPE_CHOICES:
        raise typer.BadParameter(
            f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}.", param_hint="'--dtype'"
        )
    if max_memory is not None:
        with option("'--max-memory'"):
            parse_bytes(max_memory, "--max-memory")
            if batch_size is not None or max_mb is not None:
                raise PathlensError("pass --max-memory or --batch-size/--max-mb, not both.")
    if executor not in EXECUTORS:
        raise typer.BadParameter(
            f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}.", param_hint="'--executor'"
        )
    if executor != "ray" and (address is not None or workers is not None):
        raise typer.BadParameter("--address and --workers need --executor ray.", param_hint="'--executor'")
    with option("'--corpus'"):
        source = corpus_of(corpus)
    output_folder(out)
    loaded = load_model(model)
    with console.status(f"tokenizing {source.name} …"):
        wins = windows(source, loaded.tokenizer, context, n_tokens, seed)
    console.print(f"{len(wins)} windows of {wins.context} tokens from {source.name} ({source.licence})")
    start = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task(f"collecting {', '.join(names)}", total=len(wins))

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with ExitStack() as stack:
            runner = None
            if executor == "ray":  # Ray is an optional extra: imported only when asked for
                from pathlens.distributed import RayExecutor

                runner = stack.enter_context(RayExecutor(address=address, workers=workers))
            result = collect(
                loaded, names, wins, out, batch_size=batch_size, max_bytes=None if max_mb is None else max_mb * 2**20,
                max_memory=max_memory, dtype=dtype, executor=runner, progress=advance,
            )  # fmt: skip
    seconds = time.perf_counter() - start
    manifest = result.manifest
    size = sum((out / entry["file"]).stat().st_size for entry in manifest["shards"])
    console.print(
        f"[green]stored[/] {manifest['rows_stored']} rows x {len(names)} sites in {manifest['n_shards']} shards "
        f"({size / 2**20:.1f} MiB, {manifest['dtype']}) at {out} in {seconds:.1f} s"
    )


@features_app.command("snmf")
def snmf_command(
    model: str = typer.Option("smollm2", help="the model the store was collected from"),
    store: Path = typer.Option(..., help="an activation store folder (pathlens store ...)"),
    out: Path = typer.Option(Path("out/snmf"), help="output folder"),
    site: Optional[str] = typer.Option(None, help="the store's site to factorize (default: its only site)"),  # noqa: UP045
    rank: int = typer.Option(50, min=1, help="number of features"),
    sparsity: float = typer.Option(0.01, min=0.0, max=1.0, help="share of each feature's entries kept (WTA)"),
    init: str = typer.Option("random", help="random | svd | knn"),
    iters: int = typer.Option(500, min=1, help="most iterations"),
    patience: int = typer.Option(100, min=1, help="iterations without improvement before stopping"),
    rows: int = typer.Option(20_000, min=1, help="rows (tokens) of the store to factorize"),
    seed: int = typer.Option(0, help="seed of the initialization"),
    contexts: int = typer.Option(8, min=1, help="top-activating contexts kept per feature"),
    show: int = typer.Option(5, min=0, help="features printed"),
) -> None:
    """Semi-NMF of a store's MLP activations: features with their top contexts and promoted tokens."""
    from pathlens.features.snmf import INITS, snmf
    from pathlens.features.store import ActivationStore

    if init not in INITS:
        raise typer.BadParameter(f"unknown init {init!r}; use one of {', '.join(INITS)}.", param_hint="'--init'")
    with option("'--store'"):
        activations = ActivationStore(store)
        if site is not None:
            activations.check(sites=[site])
    output_folder(out)
    loaded = load_model(model)
    with option("'--model'"):
        activations.check(loaded)
    with _progress() as bar:
        task = bar.add_task("semi-NMF", total=iters)
        result = snmf(
            activations, rank, site=site, rows=rows, sparsity=sparsity, init=init, max_iter=iters,
            patience=patience, seed=seed, progress=lambda it, loss: bar.update(task, completed=it + 1),
        )  # fmt: skip
    result.save(out / "snmf")
    with console.status("top contexts and promoted tokens …"):
        features = result.features(loaded, activations, top_contexts=contexts)
    record = {
        "site": result.site,
        "meta": result.meta,
        "features": [
            {
                "index": f.index,
                "contexts": [c.__dict__ for c in f.contexts],
                "promoted": [[token, logit] for token, logit in f.promoted],
            }
            for f in features
        ],
    }
    write_text(out / "features.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    fvu = result.meta["fraction_variance_unexplained"]
    table = Table(title=f"semi-NMF of {result.site}: {rank} features, 1 - FVU = {1 - fvu:.3f}")
    for column in ("feature", "top context", "promoted tokens"):
        table.add_column(column)
    for f in features[:show]:
        context = str(f.contexts[0]) if f.contexts else ""
        table.add_row(str(f.index), Text(context), Text(" ".join(repr(t) for t, _ in f.promoted[:6])))
    console.print(table)
    console.print(f"wrote {out}/snmf.safetensors/.json and features.json")
