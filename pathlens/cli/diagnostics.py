"""`pathlens lens`, `pathlens heads`, `pathlens massive`, `pathlens lib`: the diagnostics every session starts with.
Each writes its results (safetensors + JSON), a CSV table and a PNG into `--out`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, cast

import torch
import typer
from rich.table import Table

from pathlens.cli.app import app, console, load_model, option, output_folder, task_choice
from pathlens.results.io import write_text


@app.command()
def lens(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    prompt: Optional[list[str]] = typer.Option(None, help="a prompt (repeat for several); default: the task's"),  # noqa: UP045
    task: str = typer.Option("ioi", help="task whose clean prompts are read, with its answer as the target"),
    n: int = typer.Option(8, min=1, help="prompts of the task"),
    seed: int = typer.Option(0, help="task seed"),
    k: int = typer.Option(5, min=1, help="top tokens per cell"),
    out: Path = typer.Option(Path("out/lens"), help="output folder"),
) -> None:
    """Logit lens at every layer and position (top-k tokens, the target's rank and probability); with a task, also
    the commitment layer of every prompt (lens and patching) and its summary."""
    from pathlens.diagnostics.commitment import commitment
    from pathlens.diagnostics.lens import logit_lens
    from pathlens.tasks import build_task

    task_choice(task)
    output_folder(out)
    loaded = load_model(model)
    with option("'--prompt' or '--task'"):
        if prompt:
            result = logit_lens(loaded, list(prompt), k=k)
            built = None
        else:
            built = build_task(task, loaded.tokenizer, n=n, seed=seed)
            targets = torch.full_like(built.clean_ids, -1)  # the next token, and the answer at the answer position
            targets[:, :-1] = built.clean_ids[:, 1:]
            targets[torch.arange(built.n), built.answer_pos] = built.answer_ids
            result = logit_lens(loaded, built.clean_ids, targets=targets, k=k, attention_mask=built.attention_mask)
    result.save(out / "lens")
    result.plot(out / "lens.png", prompt=0)
    last = result.table(prompt=0, pos=-1)
    last.to_csv(out / "lens_last_position.csv", index=False)
    table = Table(title=f"logit lens of prompt 0 at its last position ({loaded.name})")
    for column in ("layer", "top1", "p1", "top2", "top3", "target_rank", "target_prob"):
        table.add_column(column, justify="right")
    for row in last.to_dict("records"):
        table.add_row(
            str(row["layer"]),
            repr(row["top1"]),
            f"{row['p1']:.3f}",
            repr(row["top2"]),
            repr(row["top3"]),
            f"{row['target_rank']:g}",
            f"{row['target_prob']:.3g}",
        )
    console.print(table)
    if built is not None:
        with console.status(f"commitment layers of {built.n} prompts (one patching sweep per prompt) …"):
            found = commitment(loaded, built)
        found.save(out / "commitment")
        found.plot(out / "commitment.png")
        summary = found.summary()
        summary.to_csv(out / "commitment_summary.csv", index=False)
        found.per_prompt.to_frame().to_csv(out / "commitment_per_prompt.csv", index=False)
        write_text(out / "commitment_summary.json", summary.to_json(orient="records", indent=2))
        ctable = Table(title=f"commitment layers over {built.n} {task} prompts")
        for column in summary.columns:
            ctable.add_column(str(column), justify="right")
        for row in summary.to_dict("records"):
            ctable.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(ctable)
    console.print(
        f"wrote {out}/: lens/ (safetensors + JSON), lens.png, lens_last_position.csv"
        + (", commitment/, commitment.png, commitment_*.csv/json" if built is not None else "")
    )


@app.command()
def heads(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    prompt: Optional[list[str]] = typer.Option(None, help="a prompt (repeat); default: repeated random tokens"),  # noqa: UP045
    n: int = typer.Option(8, min=1, help="repeated random-token sequences (without --prompt)"),
    length: Optional[int] = typer.Option(None, min=2, help="length of each repeated half (default 25 or the context)"),  # noqa: UP045
    seed: int = typer.Option(0, help="seed of the random tokens"),
    error_measure: str = typer.Option("mul", help="mul | abs (TransformerLens' measures)"),
    exclude_bos: bool = typer.Option(False, help="ignore attention to position 0"),
    exclude_current_token: bool = typer.Option(False, help="ignore attention to the query's own position"),
    top: int = typer.Option(5, min=1, help="heads listed per detector"),
    out: Path = typer.Option(Path("out/heads"), help="output folder"),
) -> None:
    """Previous-token, duplicate-token, induction and prefix-matching scores of every head: Scores (layer, head)
    as safetensors + JSON, a heatmap PNG each, and the top heads of each detector (heads_top.csv)."""
    import pandas as pd

    from pathlens.diagnostics import heads as detectors
    from pathlens.diagnostics.heads import ErrorMeasure

    if error_measure not in ("mul", "abs"):
        raise typer.BadParameter(f"unknown measure {error_measure!r}; use mul or abs.", param_hint="'--error-measure'")
    measure = cast(ErrorMeasure, error_measure)
    output_folder(out)
    loaded = load_model(model)
    with option("'--prompt' or '--length'"):
        ids = list(prompt) if prompt else detectors.repeated_tokens(loaded, n=n, length=length, seed=seed)
        flags = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token}
        results = {
            "previous_token": detectors.previous_token(loaded, ids, error_measure=measure, **flags),
            "duplicate_token": detectors.duplicate_token(loaded, ids, error_measure=measure, **flags),
            "induction": detectors.induction(loaded, ids, error_measure=measure, **flags),
        }
        if not prompt:
            results["prefix_matching"] = detectors.prefix_matching(loaded, ids)  # type: ignore[arg-type]  # ids are tokens here
    frames = []
    table = Table(title=f"top {top} heads per detector ({loaded.name}, {error_measure})")
    table.add_column("detector")
    table.add_column("heads (score)")
    for name, scores in results.items():
        scores.save(out / name)
        scores.plot(out / f"{name}.png", title=f"{name} score ({loaded.name})")
        best = scores.top(top, by="value")
        frames.append(best.assign(detector=name))
        table.add_row(
            name, ", ".join(f"L{r['layer']}.H{r['head']} ({r['value']:.3f})" for r in best.to_dict("records"))
        )
    pd.concat(frames).to_csv(out / "heads_top.csv", index=False)
    console.print(table)
    console.print(f"wrote {out}/: {', '.join(results)} (.safetensors/.json/.png), heads_top.csv")


@app.command()
def massive(
    model: str = typer.Option("smollm2", help="embedded name, local folder or hub name"),
    corpus: str = typer.Option(
        "default", help="'default' (offline World English Bible), a folder/file of text, hf:NAME"
    ),
    tokens: int = typer.Option(10_000, min=2, help="tokens to scan"),
    context: int = typer.Option(128, min=2, help="tokens per window"),
    seed: int = typer.Option(0, help="window sampling seed"),
    threshold: float = typer.Option(100.0, help="|h| must exceed this"),
    ratio: float = typer.Option(1000.0, help="... and this many times the layer's median |h|"),
    batch_size: int = typer.Option(8, min=1, help="windows per forward"),
    out: Path = typer.Option(Path("out/massive"), help="output folder"),
) -> None:
    """Massive-activation scan over a corpus (layer, dim, token, position, value of every hit; top-3 and median per
    layer) and the intervention test (set them to zero or to their mean at the first layer: perplexity)."""
    from pathlens.diagnostics.massive import intervention_test, scan
    from pathlens.features.corpus import windows

    output_folder(out)
    loaded = load_model(model)
    with option("'--corpus'"):
        wins = windows(corpus, loaded.tokenizer, context=context, n_tokens=tokens, seed=seed)
    found = scan(loaded, wins, threshold=threshold, ratio=ratio, batch_size=batch_size, progress=True)
    found.save(out / "scan")
    found.plot(out / "massive.png")
    found.table().to_csv(out / "hits.csv", index=False)
    summary = found.summary()
    summary.to_csv(out / "summary.csv", index=False)
    table = Table(title=f"massive activations in {loaded.name} over {wins.n_tokens} tokens ({len(found.table())} hits)")
    for column in ("layer", "dim", "hits", "positions", "tokens", "mean"):
        table.add_column(column, justify="right")
    for row in summary.to_dict("records"):
        table.add_row(
            *(
                f"{row[c]:.1f}" if c == "mean" else str(row[c])
                for c in ("layer", "dim", "hits", "positions", "tokens", "mean")
            )
        )
    console.print(table)
    if found.first_layer() is not None:
        with console.status("intervention test: perplexity with the massive activations set to zero / their mean …"):
            test = intervention_test(loaded, found, wins, batch_size=batch_size)
        test.to_csv(out / "intervention.csv", index=False)
        write_text(out / "intervention.json", test.to_json(orient="records", indent=2))
        console.print(test.to_string(index=False))
    console.print(f"wrote {out}/: scan/ (safetensors + JSON), massive.png, hits.csv, summary.csv, intervention.csv")


@app.command(name="lib")
def lib_command(
    model: str = typer.Option(
        "induction-2l", help="embedded name, local folder or hub name (small models: LIB is costly)"
    ),
    prompt: Optional[list[str]] = typer.Option(None, help="a prompt (repeat); default: repeated random tokens"),  # noqa: UP045
    n: int = typer.Option(16, min=1, help="repeated random-token sequences (without --prompt)"),
    length: Optional[int] = typer.Option(None, min=2, help="length of each repeated half"),  # noqa: UP045
    seed: int = typer.Option(0, help="seed of the random tokens"),
    tolerance: float = typer.Option(0.05, min=0.0, help="loss increase (nats) that still counts as 'little'"),
    out: Path = typer.Option(Path("out/lib"), help="output folder"),
) -> None:
    """Local Interaction Basis and PCA of every residual-stream layer: bases (safetensors + JSON), the loss increase
    per number of directions ablated (lib_ablation.csv, lib.png) and how many each basis can ablate (lib_table.csv).
    Without --prompt the loss is the second copy's cross-entropy on repeated random tokens."""
    from pathlens.diagnostics import heads as detectors
    from pathlens.diagnostics.lib import lib as local_interaction_basis
    from pathlens.diagnostics.lib import next_token_loss, second_copy_loss

    output_folder(out)
    loaded = load_model(model)
    with option("'--prompt' or '--length'"):
        ids = list(prompt) if prompt else detectors.repeated_tokens(loaded, n=n, length=length, seed=seed)
        result = local_interaction_basis(
            loaded, ids, loss=next_token_loss if prompt else second_copy_loss, tolerance=tolerance, progress=True
        )
    result.save(out / "lib")
    result.plot(out / "lib.png")
    table = result.table()
    table.to_csv(out / "lib_table.csv", index=False)
    result.ablation.to_frame().to_csv(out / "lib_ablation.csv", index=False)
    rich_table = Table(title=f"directions ablatable with a loss increase <= {tolerance} ({loaded.name})")
    for column in table.columns:
        rich_table.add_column(str(column), justify="right")
    for row in table.to_dict("records"):
        rich_table.add_row(*(f"{v:g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(rich_table)
    console.print(f"wrote {out}/: lib/ (bases and Scores), lib.png, lib_table.csv, lib_ablation.csv")
