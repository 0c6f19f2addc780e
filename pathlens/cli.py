"""The `pathlens` command line: list models, print a model's sites, run the demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pandas as pd
import torch
import typer
from rich.console import Console
from rich.table import Table

from pathlens.errors import PathlensError
from pathlens.loading import EMBEDDED, load
from pathlens.model import Model
from pathlens.patching.sweep import DEFAULT_MAX_BATCH_TOKENS
from pathlens.results import Scores
from pathlens.tasks import TASKS, build_task
from pathlens.tasks.base import Task

if TYPE_CHECKING:
    from pathlens.attribution.compare import Comparison

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Find, verify and steer pathways in neural networks."
)
console = Console()


def _load(name: str) -> Model:
    with console.status(f"loading {name} …"):
        start = time.perf_counter()
        model = load(name)
    console.print(f"[green]loaded[/] {model!r} in {time.perf_counter() - start:.1f} s")
    return model


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
    loaded = _load(model)
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
    n: int = typer.Option(8, help="number of IOI prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    out: Path = typer.Option(Path("out/demo"), help="folder for the table, PNG and scores"),
) -> None:
    """IOI on an embedded model: clean vs corrupted logit difference, top heads by direct logit attribution,
    activation patching of every head and of the residual stream per (layer, position), and an EAP-IG circuit
    with its faithfulness curve, pathways and HTML report."""
    from pathlens.diagnostics.dla import head_logit_attribution
    from pathlens.tasks import ioi

    loaded = _load(model)
    task = ioi(loaded.tokenizer, n=n, seed=seed)
    console.print(
        f"IOI task: {task.n} prompt pairs, e.g. [italic]{task.prompts[0]!r}[/] → "
        f"{loaded.to_str_tokens(task.answer_ids[:1])[0]!r}"
    )
    with console.status("running clean and corrupted prompts …"):
        clean = loaded.run(task.clean_ids, attention_mask=task.attention_mask)
        corrupt = loaded.run(task.corrupt_ids, attention_mask=task.attention_mask)
        clean_ld, corrupt_ld = task.score(clean.logits), task.score(corrupt.logits)
        rows = torch.arange(task.n)
        top1 = clean.logits[rows, task.answer_pos].argmax(-1) == task.answer_ids
        dla = head_logit_attribution(loaded, task)
    summary = {
        "model": loaded.name,
        "task": "ioi",
        "n_prompts": task.n,
        "seed": seed,
        "clean_logit_diff": float(clean_ld.mean()),
        "corrupt_logit_diff": float(corrupt_ld.mean()),
        "accuracy_answer_over_wrong": float((clean_ld > 0).float().mean()),
        "top1_accuracy": float(top1.float().mean()),
    }
    table = Table(title="IOI: metric")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in ("clean_logit_diff", "corrupt_logit_diff", "accuracy_answer_over_wrong", "top1_accuracy"):
        table.add_row(key, f"{summary[key]:.3f}")
    console.print(table)
    top = dla.top(10)
    heads = Table(title="top 10 heads by direct logit attribution (logit diff, mean over prompts)")
    for col in ("head", "DLA"):
        heads.add_column(col, justify="right")
    for row in top.to_dict("records"):
        heads.add_row(f"L{row['layer']}.H{row['head']}", f"{row['value']:+.3f}")
    console.print(heads)
    out.mkdir(parents=True, exist_ok=True)
    dla.plot(out / "dla_heads.png", title=f"{loaded.name}: IOI direct logit attribution per head")
    dla.save(out / "dla_heads")
    top.to_csv(out / "top_heads.csv", index=False)
    from pathlens.patching import patch as run_patch

    heads = run_patch(loaded, task, sites="heads", positions="all", progress=True)
    console.print(write_sweep(heads, out, "patch_heads", f"{loaded.name} IOI: heads patched clean→corrupt"))
    from pathlens.tasks.ioi import BABA_TEMPLATES

    one_template = ioi(loaded.tokenizer, n=min(n, DEMO_RESID_PROMPTS), seed=seed, templates=[BABA_TEMPLATES[0]])
    resid = run_patch(loaded, one_template, sites="resid_pre", positions="each", progress=True)
    console.print(write_sweep(resid, out, "patch_resid", f"{loaded.name} IOI: resid_pre per position"))
    summary["patch_heads_top"] = [
        {"layer": int(r.layer), "head": int(r.head), "effect": float(r.value - heads.meta["corrupt_metric"])}
        for r in heads.top(5, by="value").itertuples()
    ]
    record = run_circuit(loaded, task, "ioi", "eap-ig", out / "circuit", top_paths=5)
    summary["circuit"] = {k: record[k] for k in ("faithfulness", "n_edges", "edges_total", "curve_area", "seconds")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"wrote {out}/: dla_heads, patch_heads, patch_resid (.png/.safetensors/.json/.csv), circuit/ (report.html), "
        "summary.json"
    )


DEMO_RESID_PROMPTS = 4  # the per-(layer, position) sweep is the demo's longest step; 4 prompts keep it short
CLI_SITES = {"heads": "heads", "resid": "resid_pre", "mlp": "mlp_out", "attn": "attn_out"}


def task_for(model: Model, name: str, n: int, seed: int) -> Task:
    """Build task `name` for `model` (token-only models get induction over their vocabulary)."""
    if name not in TASKS:
        raise PathlensError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    if model.tokenizer is None:
        if name != "induction":
            raise PathlensError(f"{model.name} has no tokenizer, so only the token-level 'induction' task applies.")
        cfg = model.hf.config
        return build_task(
            name, None, vocab_size=cfg.vocab_size, bos_id=getattr(cfg, "bos_token_id", None), n=n, seed=seed
        )
    return build_task(name, model.tokenizer, n=n, seed=seed)


def plottable(scores: Scores) -> Scores:
    """A 2-D view for plotting: (layer, head, pos) becomes (head, pos) with heads labelled L{l}.H{h}."""
    if scores.values.ndim != 3:
        return scores
    first, second, last = scores.dims
    labels = [
        f"L{a}.{'H' if second == 'head' else 'G'}{b}" for a in scores.coords[first] for b in scores.coords[second]
    ]
    return Scores(
        values=scores.values.reshape(len(labels), -1),
        dims=("component", last),
        coords={"component": labels, last: scores.coords[last]},
        metric=scores.metric,
        method=scores.method,
        meta=scores.meta,
        pos_labels=scores.pos_labels,
    )


def write_sweep(scores: Scores, out: Path, name: str, title: str) -> Table:
    """Save scores (safetensors + JSON), a heatmap PNG and a CSV table; return the top-10 table for printing."""
    out.mkdir(parents=True, exist_ok=True)
    scores.save(out / name)
    plottable(scores).plot(out / f"{name}.png", title=title)
    ranked = scores.with_values(scores.values - scores.meta["base_metric"])
    top = ranked.top(10)
    ranked.to_frame().to_csv(out / f"{name}.csv", index=False)
    table = Table(title=f"{title}: top 10 by |effect| (patched − base run)")
    for col in [*scores.dims, "effect"]:
        table.add_column(col, justify="right")
    for row in top.to_dict("records"):
        table.add_row(*[str(row[d]) for d in scores.dims], f"{row['value']:+.3f}")
    return table


@app.command()
def patch(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help=f"one of {', '.join(TASKS)}"),
    sites: str = typer.Option("heads", help="heads | resid | mlp | attn, or any family of pathlens.patch"),
    positions: str = typer.Option("all", help="all | each"),
    direction: str = typer.Option("denoise", help="denoise | noise"),
    n: int = typer.Option(8, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    max_batch_tokens: int = typer.Option(DEFAULT_MAX_BATCH_TOKENS, help="most tokens in one patched forward"),
    out: Path = typer.Option(Path("out/patch"), help="output folder (a killed sweep resumes from it)"),
) -> None:
    """Activation patching sweep: scores (safetensors + JSON), heatmap PNG and a table."""
    from pathlens.patching import patch as run_patch

    loaded = _load(model)
    built = task_for(loaded, task, n, seed)
    family = CLI_SITES.get(sites, sites)
    scores = run_patch(
        loaded,
        built,
        sites=family,
        positions=positions,
        direction=direction,
        max_batch_tokens=max_batch_tokens,
        out=out / "progress",
        progress=True,
    )
    console.print(f"clean metric {scores.meta['clean_metric']:.3f}, corrupted {scores.meta['corrupt_metric']:.3f}")
    name = f"{family}_{positions}"
    console.print(write_sweep(scores, out, name, f"{loaded.name} {task}: {family} ({direction})"))
    console.print(f"wrote {out}/{name}.safetensors/.json/.png/.csv")


NODE_METHODS = ("atp", "atp*", "relp", "ig")
EDGE_METHODS = {"atp": "eap", "eap": "eap", "eap-ig": "eap-ig", "relp": "relp"}


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
    positions: str = typer.Option("all", help="all | each"),
    direction: Optional[str] = typer.Option(  # noqa: UP045 (typer reads the annotation)
        None, help="denoise | noise (default: denoise for nodes, noise for edges)"
    ),
    edges: bool = typer.Option(False, "--edges", help="score every edge of the model's graph instead of nodes"),
    steps: int = typer.Option(5, help="integration steps of eap-ig"),
    n: int = typer.Option(8, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    compare_exact: bool = typer.Option(False, "--compare-exact", help="also run exact patching and compare"),
    out: Path = typer.Option(Path("out/attribute"), help="output folder"),
) -> None:
    """Gradient attribution (AtP, AtP*, RelP; EAP / EAP-IG / RelP edges) with an optional exact comparison."""
    from pathlens.attribution import atp, atp_star, compare, edge_attribution, integrated_gradients, relp
    from pathlens.patching import patch as run_patch

    if method not in NODE_METHODS + tuple(EDGE_METHODS):
        raise PathlensError(f"unknown method {method!r}; use atp, atp*, relp, ig, eap or eap-ig.")
    edges = edges or method in ("eap", "eap-ig")
    loaded = _load(model)
    built = task_for(loaded, task, n, seed)
    out.mkdir(parents=True, exist_ok=True)
    if edges:
        if method not in EDGE_METHODS:
            raise PathlensError(f"{method} is node-level only; for edges use eap, eap-ig or relp.")
        edge_direction = direction or "noise"
        start = time.perf_counter()
        graph = edge_attribution(loaded, built, method=EDGE_METHODS[method], direction=edge_direction, steps=steps)
        seconds = time.perf_counter() - start
        graph.save(out / "graph")
        graph.to_frame().to_csv(out / "edges.csv", index=False)
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
    family = CLI_SITES.get(sites, sites)
    estimator = {"atp": atp, "atp*": atp_star, "relp": relp, "ig": integrated_gradients}[method]
    start = time.perf_counter()
    direction = direction or "denoise"
    estimate = estimator(loaded, built, sites=family, positions=positions, direction=direction)
    seconds = time.perf_counter() - start
    name = f"{method.replace('*', '_star')}_{family}_{positions}"
    console.print(write_sweep(estimate, out, name, f"{loaded.name} {task}: {method} {family} ({seconds:.1f} s)"))
    if compare_exact:
        start = time.perf_counter()
        exact = run_patch(loaded, built, sites=family, positions=positions, direction=direction, progress=True)
        exact_seconds = time.perf_counter() - start
        result = compare({family: exact}, {family: estimate}, labels=("exact", method))
        result.plot(out / f"{name}_vs_exact.png")
        result.table.to_csv(out / f"{name}_vs_exact.csv")
        console.print(
            comparison_table(result, f"{method} vs exact patching ({seconds:.1f} s vs {exact_seconds:.1f} s)")
        )
    console.print(f"wrote {out}/{name}.*")


def run_circuit(
    loaded: Model,
    built: Task,
    task_name: str,
    method: str,
    out: Path,
    top_paths: int = 10,
    top_k: int | None = None,
    target: float = 0.8,
    steps: int = 5,
    by: str = "auto",
) -> dict[str, Any]:
    """Discover a circuit, measure it, and write circuit files, PNGs, pathways, circuit.json and report.html."""
    from pathlens.circuits.discover import discover, pathways
    from pathlens.circuits.edge_patching import EdgePatcher
    from pathlens.circuits.faithfulness import Curve
    from pathlens.report.html import write_report

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with console.status(f"discovering the {task_name} circuit with {method} …"):
        circuit = discover(loaded, built, method=method, top_k=top_k, target=target, steps=steps, by=by)
        routes = pathways(EdgePatcher(loaded, built), circuit, k=top_paths)
    seconds = time.perf_counter() - start
    circuit.save(out / "circuit")
    circuit.to_frame().to_csv(out / "edges.csv", index=False)
    circuit.plot(out / "circuit.png", title=f"{loaded.name} {task_name}: {method} circuit")
    curve_dict = circuit.meta.get("curve")
    if curve_dict:
        keys = ("sizes", "faithfulness", "metric", "full", "empty", "edges_total")
        Curve(**{k: curve_dict[k] for k in keys}).plot(out / "curve.png", title=f"{method}: faithfulness curve")
    pd.DataFrame(
        [{**r, "nodes": " → ".join(r["nodes"])} for r in routes],
        columns=["rank", "nodes", "score", "estimate", "metric", "faithfulness"],
    ).to_csv(out / "pathways.csv", index=False)
    record = {
        "model": loaded.name,
        "task": task_name,
        "method": method,
        "faithfulness": circuit.meta["faithfulness"],
        "n_edges": circuit.n_edges,
        "edges_total": circuit.edges_total,
        "fraction": circuit.n_edges / circuit.edges_total,
        "ranked_by": circuit.meta["ranked_by"],
        "ablation": circuit.meta["ablation"],
        "direction": circuit.meta["direction"],
        "metric": circuit.meta["metric"],
        "curve": None
        if not curve_dict
        else {str(s): f for s, f in zip(curve_dict["sizes"], curve_dict["faithfulness"], strict=True)},
        "curve_area": None if not curve_dict else curve_dict["area"],
        "paths": routes,
        "seconds": seconds,
    }
    (out / "circuit.json").write_text(json.dumps(record, indent=1))
    write_report(
        out / "report.html",
        title=f"{loaded.name} · {task_name} · {method} circuit",
        circuit=circuit,
        curve=curve_dict,
        pathways=routes,
        prompts=list(built.prompts or [])[:8],
        summary={k: v for k, v in record.items() if k not in ("paths", "curve")},
    )
    table = Table(title=f"top {len(routes)} pathways (own faithfulness: only that path's edges kept)")
    for col in ("rank", "path", "score", "own F"):
        table.add_column(col, justify="right")
    for r in routes:
        table.add_row(str(r["rank"]), " → ".join(r["nodes"]), f"{r['score']:.3g}", f"{r['faithfulness']:+.3f}")
    console.print(table)
    console.print(
        f"circuit: {circuit.n_edges} of {circuit.edges_total} edges ({record['fraction']:.1%}), normalized "
        f"faithfulness {record['faithfulness']:.3f} ({record['ablation']} ablation, {record['direction']}, "
        f"{record['metric']}); {seconds:.1f} s; wrote {out}/report.html, circuit.json, curve.png, circuit.png"
    )
    return record


@app.command()
def circuit(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    task: str = typer.Option("ioi", help=f"one of {', '.join(TASKS)}"),
    method: str = typer.Option("eap-ig", help="eap | eap-ig | relp | patching | acdc"),
    top_paths: int = typer.Option(10, help="how many diverse pathways to list"),
    top_k: Optional[int] = typer.Option(None, help="circuit size in edges (default: smallest reaching --target)"),  # noqa: UP045
    target: float = typer.Option(0.8, help="normalized faithfulness the circuit must reach"),
    steps: int = typer.Option(5, help="integration steps of eap-ig"),
    by: str = typer.Option("auto", help="edge ranking: auto (the better of abs and support) | abs | support"),
    n: int = typer.Option(8, help="number of prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    out: Path = typer.Option(Path("out/circuit"), help="output folder"),
) -> None:
    """Circuit discovery with faithfulness curve, pathways and an offline HTML report."""
    loaded = _load(model)
    run_circuit(loaded, task_for(loaded, task, n, seed), task, method, out, top_paths, top_k, target, steps, by)


def main() -> None:
    try:
        app()
    except PathlensError as err:
        console.print(f"[red]error:[/] {err}")
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
