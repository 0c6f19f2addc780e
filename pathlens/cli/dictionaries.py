"""`pathlens features sae` and `pathlens features transcoder`: train sparse dictionaries on an activation store,
evaluate them on its held-out windows and write one page per dictionary (`pathlens.report.dictionary_study`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pathlens.cli.app import console, load_model, option, output_folder
from pathlens.cli.features import features_app
from pathlens.errors import PathlensError
from pathlens.report.dictionary_study import StudySettings

# The training options both commands take (defaults in each signature).
Kinds = Annotated[str, typer.Option(help="comma list of relu, topk, batchtopk, jumprelu (trained together)")]
Expansion = Annotated[int, typer.Option(min=1, help="latents per input dimension")]
ActiveLatents = Annotated[int, typer.Option(min=1, help="active latents per token (topk, batchtopk)")]
L1 = Annotated[float, typer.Option(min=0.0, help="L1 coefficient (relu)")]
L0 = Annotated[float, typer.Option(min=0.0, help="L0 coefficient (jumprelu)")]
LearningRate = Annotated[float, typer.Option(min=0.0, help="Adam learning rate")]
Batch = Annotated[int, typer.Option(min=1, help="tokens per step")]
Epochs = Annotated[int, typer.Option(min=1, help="passes over the store")]
Heldout = Annotated[int, typer.Option(min=1, help="store windows held out for the evaluation card and contexts")]
Seed = Annotated[int, typer.Option(help="seed of initialisation and shuffling")]


def _kinds(kinds: str) -> list[str]:
    from pathlens.features.sae import KINDS

    names = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = [k for k in names if k not in KINDS]
    if bad or not names:
        raise typer.BadParameter(
            f"unknown kind {bad or kinds!r}; use a comma list of {', '.join(KINDS)}.", param_hint="'--kind'"
        )
    return names


def _run(
    model: str,
    store: Path,
    out: Path,
    source: str,
    target: str | None,
    kinds: list[str],
    settings: StudySettings,
) -> None:
    from pathlens.features.store import ActivationStore
    from pathlens.report.dictionary_study import dictionary_study

    with option("'--store'"):
        activations = ActivationStore(store)
        activations.check(sites=[source] + ([target] if target else []))
    output_folder(out)
    loaded = load_model(model)
    with option("'--model'"):
        activations.check(loaded)
    cards = dictionary_study(
        loaded, activations, source, kinds, out, target=target, settings=settings, progress=console.print
    )
    table = Table(title=f"dictionaries of {source}" + (f" -> {target}" if target else ""))
    for column in ("name", "L0", "FVE", "CE recovered", "KL", "dead", "dense"):
        table.add_column(column)
    for c in cards:
        table.add_row(
            c.name, f"{c.l0:.1f}", f"{c.fve:.3f}", f"{c.ce_recovered:.3f}", f"{c.kl:.4f}",
            f"{c.dead_fraction:.3f}", f"{c.dense_fraction:.3f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {out}/<name>.safetensors/.json, <name>.card.json, <name>/index.html and cards.json")


@features_app.command("sae")
def sae_command(
    model: str = typer.Option("smollm2", help="the model the store was collected from"),
    store: Path = typer.Option(..., help="an activation store folder (pathlens store ...)"),
    out: Path = typer.Option(Path("out/sae"), help="output folder"),
    site: Optional[str] = typer.Option(None, help="the store's site to encode (default: its first)"),  # noqa: UP045
    kind: Kinds = "topk",
    expansion: Expansion = 8,
    k: ActiveLatents = 32,
    l1: L1 = 1.0,
    l0: L0 = 1.0,
    lr: LearningRate = 1e-3,
    batch: Batch = 1024,
    epochs: Epochs = 1,
    heldout: Heldout = 32,
    seed: Seed = 0,
) -> None:
    """Train sparse autoencoders on a store's site; write each with its evaluation card and page."""
    kinds = _kinds(kind)
    source = site or _first_site(store)
    settings = StudySettings(
        expansion=expansion, k=k, l1=l1, l0=l0, lr=lr, batch=batch, epochs=epochs, heldout=heldout, seed=seed
    )
    _run(model, store, out, source, None, kinds, settings)


@features_app.command("transcoder")
def transcoder_command(
    model: str = typer.Option("smollm2", help="the model the store was collected from"),
    store: Path = typer.Option(..., help="an activation store folder holding L{layer}.mlp_in and L{layer}.mlp_out"),
    out: Path = typer.Option(Path("out/transcoder"), help="output folder"),
    layer: int = typer.Option(..., min=0, help="the layer whose MLP the transcoder replaces"),
    kind: Kinds = "topk",
    expansion: Expansion = 8,
    k: ActiveLatents = 32,
    l1: L1 = 1.0,
    l0: L0 = 1.0,
    lr: LearningRate = 1e-3,
    batch: Batch = 1024,
    epochs: Epochs = 1,
    heldout: Heldout = 32,
    seed: Seed = 0,
) -> None:
    """Train transcoders from a layer's MLP input to its MLP output; write each with its card and page."""
    kinds = _kinds(kind)
    settings = StudySettings(
        expansion=expansion, k=k, l1=l1, l0=l0, lr=lr, batch=batch, epochs=epochs, heldout=heldout, seed=seed
    )
    _run(model, store, out, f"L{layer}.mlp_in", f"L{layer}.mlp_out", kinds, settings)


def _first_site(store: Path) -> str:
    from pathlens.features.store import ActivationStore

    with option("'--store'"):
        sites = ActivationStore(store).sites
    if not sites:
        raise PathlensError(f"store {store} holds no site.")
    return sites[0]
