"""Dictionaries from an activation store to a page: store batches (held-out windows excluded, every training row
once per epoch), top-activating contexts against a hand search, the study's files, and the page's escaping."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pathlens.features.contexts import LatentContext, pick_latents, top_contexts
from pathlens.features.corpus import Windows
from pathlens.features.evaluate import evaluate
from pathlens.features.sae import Dictionary, DictionaryConfig
from pathlens.features.splice import splice
from pathlens.features.store import collect
from pathlens.features.train import Trainer, on_the_fly, store_batches, train
from pathlens.report.dictionary_page import render_dictionary_page
from pathlens.report.dictionary_study import StudySettings, dictionary_study
from tests.helpers import VOCAB, assert_untouched, snapshot, tiny_model

SITES = ["L1.resid_pre", "L0.mlp_in", "L0.mlp_out"]


def _store(tmp_path: Path, n: int = 12, context: int = 10):
    model = tiny_model("llama", weight_scale=3.0)
    ids = torch.randint(3, VOCAB, (n, context), generator=torch.Generator().manual_seed(0))
    store = collect(model, SITES, Windows.of_ids(ids), tmp_path / "store", batch_size=2, max_bytes=30_000)
    return model, store, ids


def test_store_batches_hold_out_windows_and_cover_each_training_row_once(tmp_path: Path) -> None:
    model, store, ids = _store(tmp_path)
    assert store.n_shards > 2
    reference = model.run(ids[:9], cache=["L1.resid_pre"]).cache["L1.resid_pre"][:, 1:].reshape(-1, 32)
    seen = torch.cat([b["L1.resid_pre"] for b in store_batches(store, ["L1.resid_pre"], 7, seed=3, windows=9)])
    assert seen.shape[0] == 81 - 81 % 7  # 9 windows x 9 positions, cut into full batches of 7
    distance = (seen[:, None] - reference[None]).abs().amax(dim=-1)  # (77, 81)
    assert float(distance.min(dim=1).values.max()) < 1e-5  # every row comes from a training window, position > 0
    assert torch.unique(distance.argmin(dim=1)).numel() == seen.shape[0]  # and none comes twice


def test_top_contexts_match_a_hand_search() -> None:
    model = tiny_model("llama", weight_scale=3.0)
    ids = torch.randint(3, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    sae = Dictionary(DictionaryConfig("relu", 32, 16, meta={"site": "L1.resid_pre"}), seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    found = top_contexts(model, sae, ids, [3, 5], top=2, before=3, after=1, chunk=4)
    x = model.run(ids, cache=["L1.resid_pre"]).cache["L1.resid_pre"]
    f = sae.encode(x).detach()[:, 1:]  # (6, 9, 16) position 0 skipped
    for latent in (3, 5):
        best, where = f[..., latent].max(dim=1)
        windows = best.argsort(descending=True)[:2].tolist()
        got = found[latent]
        assert [c.window for c in got] == windows
        for c in got:
            assert c.position == int(where[c.window]) + 1
            assert abs(c.value - float(best[c.window])) < 1e-5
            assert c.tokens[c.peak] == f"t{int(ids[c.window, c.position])}"


def test_study_writes_dictionaries_cards_and_pages(tmp_path: Path) -> None:
    model, store, ids = _store(tmp_path)
    before = snapshot(model)
    settings = StudySettings(expansion=2, k=4, epochs=2, batch=16, heldout=3, latents_shown=4, contexts=2)
    cards = dictionary_study(model, store, "L1.resid_pre", ["topk", "jumprelu"], tmp_path / "out", settings=settings)
    tc = dictionary_study(model, store, "L0.mlp_in", ["topk"], tmp_path / "out", target="L0.mlp_out", settings=settings)
    assert_untouched(model, before)
    assert [c.name for c in cards + tc] == ["L1-sae-topk", "L1-sae-jumprelu", "L0-tc-topk"]
    out = tmp_path / "out"
    for card in cards + tc:
        saved = json.loads((out / f"{card.name}.card.json").read_text())
        assert saved["fve"] == card.fve and saved["width"] == 64
        assert json.loads((out / f"{card.name}.contexts.json").read_text())
        page = (out / card.name / "index.html").read_text()
        assert "Evaluation card" in page and "data:image/png;base64," in page
        assert (out / card.name / "density.png").read_bytes()[:4] == b"\x89PNG"
    again = evaluate(model, Dictionary.load(out / "L0-tc-topk"), ids[-3:], name="L0-tc-topk")
    assert again.fve == tc[0].fve  # the saved transcoder, spliced at the sites in its meta, gives the same card
    with splice(model, Dictionary.load(out / "L1-sae-topk")) as sp:
        assert str(sp.latents) == "L1.sae"


def test_page_escapes_tokens_and_labels() -> None:
    model = tiny_model("llama")
    sae = Dictionary(DictionaryConfig("topk", 32, 8, k=2, meta={"site": "L1.resid_pre"}))
    card = evaluate(model, sae, torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0)))
    hostile = LatentContext(["a", "<script>alert(1)</script>", '"x" & y'], [0.0, 2.0, 1.0], 1, 0, 1)
    page = render_dictionary_page(card, {pick_latents(torch.ones(8), 1)[0]: [hostile]}, title="<b>t</b>")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;x&quot; &amp; y" in page and "&lt;b&gt;t&lt;/b&gt;" in page


def test_on_the_fly_batches_are_the_cached_rows_shuffled() -> None:
    """Two sites from one pass, positions > 0, every row once (the remainder of the last buffer dropped)."""
    model = tiny_model("llama", weight_scale=3.0)
    ids = torch.randint(3, VOCAB, (10, 8), generator=torch.Generator().manual_seed(4))
    cache = model.run(ids, cache=["L0.mlp_in", "L0.mlp_out"]).cache
    batches = list(on_the_fly(model, ids, ["L0.mlp_in", "L0.mlp_out"], 9, seed=1, chunk=3, buffer_windows=4))
    assert len(batches) == 70 // 9
    for site in ("L0.mlp_in", "L0.mlp_out"):
        reference = cache[site][:, 1:].reshape(-1, 32)
        seen = torch.cat([b[site] for b in batches])
        distance = (seen[:, None] - reference[None]).abs().amax(dim=-1)
        assert float(distance.min(dim=1).values.max()) < 1e-5
        assert torch.unique(distance.argmin(dim=1)).numel() == seen.shape[0]
    first = batches[0]
    pair = (first["L0.mlp_in"][:, None] - cache["L0.mlp_in"][:, 1:].reshape(-1, 32)[None]).abs().amax(-1).argmin(1)
    assert torch.allclose(first["L0.mlp_out"], cache["L0.mlp_out"][:, 1:].reshape(-1, 32)[pair], atol=1e-5)


def test_cli_trains_an_sae_and_a_transcoder_from_a_store(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pathlens import load
    from pathlens.cli import app

    tiny_model("llama", weight_scale=3.0).hf.save_pretrained(tmp_path / "m")
    model = load(str(tmp_path / "m"))
    ids = torch.randint(3, VOCAB, (10, 12), generator=torch.Generator().manual_seed(0))
    collect(model, ["L1.resid_pre", "L0.mlp_in", "L0.mlp_out"], Windows.of_ids(ids), tmp_path / "s", batch_size=5)
    runner = CliRunner()
    common = ["--model", str(tmp_path / "m"), "--store", str(tmp_path / "s"), "--expansion", "2", "--k", "4"]
    common += ["--batch", "32", "--heldout", "3"]
    done = runner.invoke(app, ["features", "sae", *common, "--out", str(tmp_path / "o"), "--kind", "topk,relu"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["features", "transcoder", *common, "--out", str(tmp_path / "o"), "--layer", "0"])
    assert done.exit_code == 0, done.output
    cards = json.loads((tmp_path / "o" / "cards.json").read_text())
    assert [c["name"] for c in cards] == ["L0-tc-topk"]
    assert (tmp_path / "o" / "L1-sae-relu" / "index.html").is_file()
    bad = runner.invoke(app, ["features", "sae", *common, "--out", str(tmp_path / "o"), "--kind", "gated"])
    assert bad.exit_code == 2 and "unknown kind" in bad.output
    missing = runner.invoke(
        app, ["features", "sae", *common[:2], "--store", str(tmp_path / "none")], terminal_width=300
    )
    assert missing.exit_code == 2 and "activation store" in " ".join(missing.output.split())


def test_train_reads_the_stores_own_loader(tmp_path: Path) -> None:
    """`train` takes any stream of {site: rows} batches: the activation store's shuffled DataLoader included."""
    _, store, _ = _store(tmp_path)
    trainer = Trainer(Dictionary(DictionaryConfig("topk", 32, 16, k=2)), "L1.resid_pre")
    loader = store.loader(["L1.resid_pre"], batch_size=16, seed=0)
    train([trainer], loader)
    assert trainer.steps == len(loader.dataset) and trainer.tokens == store.n_rows
