"""The `pathlens` command line: list models, print a model's sites, run the demo."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from pathlens.errors import PathlensError
from pathlens.loading import EMBEDDED, load
from pathlens.model import Model

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find, verify and steer pathways in neural networks.")
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
    n: int = typer.Option(16, help="number of IOI prompt pairs"),
    seed: int = typer.Option(0, help="task seed"),
    out: Path = typer.Option(Path("out/demo"), help="folder for the table, PNG and scores"),
) -> None:
    """IOI on an embedded model: clean vs corrupted logit difference and the top heads by direct logit attribution."""
    from pathlens.diagnostics.lens import head_logit_attribution
    from pathlens.tasks import ioi

    loaded = _load(model)
    task = ioi(loaded.tokenizer, n=n, seed=seed)
    console.print(f"IOI task: {task.n} prompt pairs, e.g. [italic]{task.prompts[0]!r}[/] → {loaded.to_str_tokens(task.answer_ids[:1])[0]!r}")
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
    for _, row in top.iterrows():
        heads.add_row(f"L{int(row['layer'])}.H{int(row['head'])}", f"{row['value']:+.3f}")
    console.print(heads)
    out.mkdir(parents=True, exist_ok=True)
    dla.plot(out / "dla_heads.png", title=f"{loaded.name}: IOI direct logit attribution per head")
    dla.save(out / "dla_heads")
    top.to_csv(out / "top_heads.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {out}/dla_heads.png, dla_heads.safetensors/.json, top_heads.csv, summary.json")


def main() -> None:
    try:
        app()
    except PathlensError as err:
        console.print(f"[red]error:[/] {err}")
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
