"""`dictionary_study`: train sparse dictionaries on an activation store, evaluate them and write their pages —
what `pathlens features sae|transcoder` runs.

The store's last `heldout` windows are held out: training reads the rows of the others (`store_batches`, each
window's first position left out), the evaluation card and the top-activating contexts run the model on the
held-out windows. Several dictionaries (one per kind in `kinds`) train from the same batches — one read of the
store for all of them. Written to `out/`, per dictionary `<name>`: `<name>.safetensors` + `<name>.json` (the
dictionary), `<name>.card.json` (its evaluation card), `<name>.contexts.json` (the shown latents' top contexts as
text, the peak token in [[ ]]) and `<name>/index.html` + `density.png` (its page); and
`cards.json`, every card together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathlens.errors import PathlensError
from pathlens.features.contexts import pick_latents, top_contexts
from pathlens.features.evaluate import EvaluationCard, evaluate
from pathlens.features.sae import KINDS, Dictionary, DictionaryConfig
from pathlens.features.store import ActivationStore
from pathlens.features.train import TrainConfig, Trainer, store_batches, train
from pathlens.model import Model
from pathlens.report.dictionary_page import write_dictionary_page
from pathlens.results.io import write_text


@dataclass(frozen=True)
class StudySettings:
    """How the dictionaries are trained: latents per input dim (`expansion`) or an explicit `width`, k, ReLU's L1
    and JumpReLU's L0 coefficients, Adam's lr, batch size, epochs over the store, seed, held-out windows, latents
    shown on each page and contexts per latent."""

    expansion: int = 8
    width: int | None = None
    k: int = 32
    l1: float = 1.0
    l0: float = 1.0
    lr: float = 1e-3
    batch: int = 1024
    epochs: int = 1
    seed: int = 0
    heldout: int = 32
    dead_steps: int = 200
    latents_shown: int = 24
    contexts: int = 5


def dictionary_study(
    model: Model,
    store: ActivationStore,
    source: str,
    kinds: Sequence[str],
    out: str | os.PathLike[str],
    target: str | None = None,
    settings: StudySettings = StudySettings(),
    progress: Callable[[str], None] | None = None,
) -> list[EvaluationCard]:
    """Train one dictionary per kind of `kinds` on `source` (→ `target` for transcoders) from `store`, evaluate
    each on the held-out windows and write everything to `out` (see module docstring); returns the cards."""
    say = progress or (lambda _: None)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise PathlensError(f"kinds {list(kinds)!r}: give one or more of {', '.join(KINDS)}.")
    sites = [str(model.resolve(source))] + ([str(model.resolve(target))] if target else [])
    store.check(model=model, sites=sites)
    n_windows = int(store.manifest["n_windows"])
    if not 0 < settings.heldout < n_windows:
        raise PathlensError(
            f"heldout={settings.heldout}: hold out between 1 and {n_windows - 1} of the store's windows."
        )
    if not store.complete:
        raise PathlensError(f"store {store.path} is incomplete; finish it with collect (it resumes) first.")
    folder = Path(os.fspath(out)).expanduser()
    widths = store.widths
    d_in, d_out = widths[sites[0]], widths[sites[-1]]
    width = settings.width or settings.expansion * d_in
    what = "tc" if target else "sae"
    trainers = []
    for kind in kinds:
        meta = {"model": model.name, "site": sites[0], "store": str(store.path), "seed": settings.seed, "kind": kind}
        if target:
            meta["target"] = sites[1]
        config = DictionaryConfig(
            kind,  # type: ignore[arg-type]
            d_in,
            width,
            d_out=d_out if target else None,
            k=settings.k,
            l1=settings.l1,
            l0=settings.l0,
            meta=meta,
        )
        train_config = TrainConfig(lr=settings.lr, dead_steps=settings.dead_steps, resample_every=settings.dead_steps)
        trainers.append(Trainer(Dictionary(config, seed=settings.seed), sites[0], target and sites[1], train_config))
    train_windows = n_windows - settings.heldout
    say(f"training {', '.join(kinds)} ({width} latents) on {sites} over {train_windows} windows")
    batches = store_batches(store, sites, settings.batch, settings.seed, settings.epochs, windows=train_windows)
    logs = train(trainers, batches, log_every=50)
    heldout = store.window_ids()[train_windows:]
    cards = []
    for kind, trainer, log in zip(kinds, trainers, logs, strict=True):
        name = f"L{model.resolve(source).layer}-{what}-{kind}"
        trainer.dictionary.config.meta.update({"tokens_trained": trainer.tokens, "steps": trainer.steps})
        trainer.dictionary.save(folder / name)
        say(f"evaluating {name}")
        card = evaluate(model, trainer.dictionary, heldout, name=name)
        contexts = top_contexts(
            model,
            trainer.dictionary,
            heldout,
            pick_latents(card.frequencies, settings.latents_shown),
            top=settings.contexts,
        )
        write_text(folder / f"{name}.card.json", json.dumps(card.as_dict(), indent=2) + "\n")
        shown_contexts = {str(i): [{"text": str(c), "value": c.value} for c in cs] for i, cs in contexts.items()}
        write_text(folder / f"{name}.contexts.json", json.dumps(shown_contexts, indent=2, ensure_ascii=False) + "\n")
        shown: dict[str, Any] = {**trainer.dictionary.config.meta, "last_log": log[-1] if log else {}}
        write_dictionary_page(folder / name, card, contexts, title=f"{name} on {model.name}", meta=shown)
        cards.append(card)
    write_text(folder / "cards.json", json.dumps([c.as_dict() for c in cards], indent=2) + "\n")
    return cards
