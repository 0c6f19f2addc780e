"""Massive activations: a planted activation is found where it was planted (and a large but not massive one is
not), the scan equals a naive per-cell loop, the layer statistics equal hand top-3 / medians, and the intervention
test's perplexities equal hand-made runs with the massive cell set to zero or to its mean."""

from __future__ import annotations

import math

import pytest
import torch

from pathlens.diagnostics.massive import HIT_FIELDS, MassiveScan, SetMassive, intervention_test, perplexity, scan
from pathlens.errors import PathlensError
from pathlens.interventions import Add, Intervention, Replace, Selection
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch


def _planted(value: float, dim: int = 3, pos: int = 0, base: float = 0.0) -> Intervention:
    """Add `value` to one cell of L0.resid_post (and `base` to every cell): it rides the residual stream into every
    later layer."""
    vector = torch.full((1, 9, 32), base)
    vector[0, pos, dim] = value
    return Intervention("L0.resid_post", Add(vector))


def _naive(model, ids, planted, threshold=100.0, ratio=1000.0):
    cache = model.run(ids, cache=["L0.resid_post", "L1.resid_post"], interventions=[planted]).cache
    hits, stats = [], torch.zeros(2, 4, dtype=torch.float64)
    for layer in range(2):
        h = cache[f"L{layer}.resid_post"]
        for w in range(ids.shape[0]):
            flat = sorted((abs(float(v)) for v in h[w].flatten()), reverse=True)
            median = float(h[w].abs().flatten().median())
            stats[layer] += torch.tensor([flat[0], flat[1], flat[2], median], dtype=torch.float64) / ids.shape[0]
            for p in range(h.shape[1]):
                for d in range(h.shape[2]):
                    v = float(h[w, p, d])
                    if abs(v) > threshold and abs(v) > ratio * median:
                        hits.append((w, p, layer, d, int(ids[w, p])))
    return hits, stats


def test_a_planted_massive_activation_is_found_and_nothing_else() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=3, p=9)
    planted = _planted(5000.0, dim=3, pos=2)
    before = snapshot(model)
    found = scan(model, ids, interventions=[planted], batch_size=2)
    assert_untouched(model, before)
    hits, stats = _naive(model, ids, planted)
    got = [tuple(int(v) for v in row[:5]) for row in found.hits.values.tolist()]
    assert sorted(got) == sorted(hits)
    assert {(w, p, d) for w, p, _, d, _ in got} == {(w, 2, 3) for w in range(3)}  # every window, where planted
    torch.testing.assert_close(found.layer_stats.values, stats, atol=1e-4, rtol=1e-5)
    assert found.first_layer() == 0 and list(found.dims(0)) == [3]
    table = found.table()
    assert list(table.columns) == [*HIT_FIELDS[:5], "token", *HIT_FIELDS[5:]]
    assert (table["value"] > 4000).all() and (table["ratio"] > 1000).all()


def test_large_but_not_massive_is_no_hit_and_thresholds_apply() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=2, p=9)
    planted = _planted(150.0, base=1.0)  # above 100 but far less than 1000x a median of order 1
    assert scan(model, ids, interventions=[planted]).hits.values.shape == (0, len(HIT_FIELDS))
    loose = scan(model, ids, interventions=[planted], ratio=50.0)
    assert {(int(r[1]), int(r[3])) for r in loose.hits.values.tolist()} == {(0, 3)}
    hits, _ = _naive(model, ids, planted, ratio=50.0)
    assert len(hits) == loose.hits.values.shape[0]


def test_padding_is_left_out() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=2, p=9)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    planted = _planted(5000.0, pos=7)  # only row 0 holds position 7 as a real token
    found = scan(model, ids, attention_mask=mask, interventions=[planted])
    assert {int(r[0]) for r in found.hits.values.tolist()} == {0}


def test_set_massive_changes_only_massive_cells_of_its_dims() -> None:
    x = torch.randn(2, 5, 8)
    x[0, 1, 2] = 3000.0
    x[1, 0, 6] = -4000.0
    x[1, 3, 5] = 5000.0  # massive, but not in the listed dims
    op = SetMassive(torch.tensor([2, 6]), torch.tensor([7.0, -9.0]))
    out = op.apply(x.clone(), x, Selection(torch.arange(2), torch.arange(5)[None], 2, 5))
    expected = x.clone()
    expected[0, 1, 2] = 7.0
    expected[1, 0, 6] = -9.0
    assert torch.equal(out, expected)


def test_intervention_test_equals_hand_runs() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=3, p=9)
    planted = _planted(5000.0, dim=3, pos=0)
    found = scan(model, ids, interventions=[planted])
    result = intervention_test(model, found, ids, interventions=[planted])
    cache = model.run(ids, cache="L0.resid_post", interventions=[planted]).cache["L0.resid_post"]
    mean = float(cache[:, 0, 3].mean())

    def hand_ppl(value: float | None) -> float:
        patched = cache.clone()
        if value is not None:
            patched[:, 0, 3] = value
        logits = model.run(ids, interventions=[planted, Intervention("L0.resid_post", Replace(patched))]).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1)
        )
        return math.exp(float(nll))

    rows = result.set_index("intervention")
    assert rows.loc["none", "perplexity"] == pytest.approx(hand_ppl(None), rel=1e-5)
    assert rows.loc["zero", "perplexity"] == pytest.approx(hand_ppl(0.0), rel=1e-5)
    assert rows.loc["mean", "perplexity"] == pytest.approx(hand_ppl(mean), rel=1e-5)
    assert rows.loc["none", "perplexity"] == pytest.approx(perplexity(model, ids, torch.ones_like(ids), [planted]))


def test_save_load_plot_and_bad_inputs(tmp_path) -> None:
    model = tiny_model("gpt2")
    ids = token_batch(n=2, p=9)
    found = scan(model, ids, interventions=[_planted(5000.0)])
    found.save(tmp_path / "m")
    again = MassiveScan.load(tmp_path / "m")
    assert torch.equal(again.hits.values, found.hits.values) and again.summary().equals(found.summary())
    found.plot(tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000
    with pytest.raises(PathlensError, match="layers: 5"):
        scan(model, ids, layers=[5])
    with pytest.raises(PathlensError, match="no massive activations"):
        intervention_test(model, scan(model, ids), ids)


def test_cli_massive_on_a_small_corpus(tmp_path) -> None:
    from typer.testing import CliRunner

    from pathlens.cli import app

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The town sits on the bank of a wide river. " * 40)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["massive", "--corpus", str(corpus), "--tokens", "128", "--context", "64", "--out", str(out)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    found = MassiveScan.load(out / "scan")
    assert found.hits.values.shape[0] > 0  # SmolLM2's massive activation (dim 507 at the first token)
    assert 507 in set(found.table()["dim"])
    assert (out / "intervention.csv").read_text().startswith("intervention,layer,dims,perplexity,ratio")
