"""The Affine op, Linear-AcT and the TransportSteer result type, on tiny models with a word-level tokenizer.

References: the op against the literal formula (1 − λ)x + λ(ωx + b) inside the strict per-unit range (tol 1e-6,
float32 rounding of the two algebraically equal forms); the fits against a naive Python loop over units of the
sorted least-squares line, the quantile-matched coupling, the Gaussian and mean-shift maps (tol 1e-12, both in
float64); on the model, against fits of activations read one text at a time, unpadded (tol 1e-5: batch against
single rows in float32). Save/load, per-row generation and composition are compared token for token or within 1e-5.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import pathlens
from pathlens import Model
from pathlens.errors import PathlensError
from pathlens.interventions import Affine, Intervention
from pathlens.steering.learned import AffineMap, TransportSteer, linear_act
from pathlens.steering.learned.linear_act import fit_units
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch

WORDS = "the a film book day meal was is good great lovely fine bad awful sad dull very so and it"
POSITIVE = ["the film was good", "a day is great", "the meal was very lovely", "it is so fine", "a book was good"]
NEGATIVE = ["the film was bad", "a day is awful", "the meal was very sad", "it is so dull"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS.split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_with_words(family: str = "llama", seed: int = 0) -> Model:
    model = tiny_model(family, seed=seed, weight_scale=3.0)
    model.tokenizer = word_tokenizer()
    return model


def mean_alone(model: Model, texts: list[str], site: str, interventions: list[Intervention] = ()) -> torch.Tensor:
    """Each text run alone (no padding), its site value averaged over tokens: (N, d)."""
    rows = []
    for text in texts:
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        rows.append(model.run(ids, cache=[site], interventions=list(interventions)).cache[site][0].mean(0))
    return torch.stack(rows)


# ---- the Affine op ------------------------------------------------------------------------------------


def test_affine_op_equals_the_hand_computation() -> None:
    model = tiny_model("llama")
    ids = token_batch()
    site = "L0.mlp_out"
    base = model.run(ids, cache=[site]).cache[site]  # (3, 9, 32)
    gen = torch.Generator().manual_seed(0)
    w, b = torch.rand(32, generator=gen) + 0.5, torch.randn(32, generator=gen)
    flat = base.reshape(-1, 32)
    lo, hi = flat.quantile(0.3, dim=0), flat.quantile(0.8, dim=0)
    lam = 0.7
    op = Affine(w, b, lam, lo, hi)
    out = model.run(ids, cache=[site], interventions=[Intervention(site, op, positions=[1, 2], rows=[0, 2])]).cache
    got = out[site]
    x = base[[0, 2]][:, 1:3]
    inside = (x > lo) & (x < hi)
    expected = torch.where(inside, (1 - lam) * x + lam * (w * x + b), x)
    assert 0 < int(inside.sum()) < inside.numel()  # the range matters in this case
    torch.testing.assert_close(got[[0, 2]][:, 1:3], expected, atol=1e-6, rtol=0)
    assert torch.equal(got[1], base[1]) and torch.equal(got[:, [0, 3, 4]], base[:, [0, 3, 4]])
    no_range = model.run(ids, cache=[site], interventions=[Intervention(site, Affine(w, b, lam))]).cache[site]
    torch.testing.assert_close(no_range, (1 - lam) * base + lam * (w * base + b), atol=1e-6, rtol=0)


def test_affine_laid_out_per_row_and_identity() -> None:
    model = tiny_model("gpt2")
    ids = token_batch()
    site = "L1.resid_pre"
    base = model.run(ids, cache=[site])
    w = torch.stack([torch.full((32,), 2.0), torch.ones(32), torch.full((32,), 0.5)])[:, None]  # (3, 1, 32)
    b = torch.zeros(3, 1, 32)
    got = model.run(ids, cache=[site], interventions=[Intervention(site, Affine(w, b))]).cache[site]
    x = base.cache[site]
    torch.testing.assert_close(got, x * w, atol=1e-6, rtol=0)
    identity = Affine(torch.ones(32), torch.zeros(32), 3.0)
    assert torch.equal(model.run(ids, interventions=[Intervention(site, identity)]).logits, base.logits)


def test_affine_bad_inputs_are_named() -> None:
    model = tiny_model("llama")
    with pytest.raises(PathlensError, match="Affine on L0.mlp_out: its weight has shape \\(5,\\)"):
        model.run(token_batch(), interventions=[Intervention("L0.mlp_out", Affine(torch.ones(5), torch.zeros(5)))])
    with pytest.raises(PathlensError, match="Affine: bias must be a float tensor"):
        Affine(torch.ones(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PathlensError, match="strength is nan"):
        model.run(
            token_batch(), interventions=[Intervention("L0.mlp_out", Affine(torch.ones(32), torch.zeros(32), math.nan))]
        )


# ---- the fits against a naive loop ---------------------------------------------------------------------


def _hand_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    xbar, ybar = sum(xs) / len(xs), sum(ys) / len(ys)
    beta = sum((a - xbar) * (c - ybar) for a, c in zip(xs, ys, strict=True)) / sum((a - xbar) ** 2 for a in xs)
    return beta, ybar - beta * xbar


def _hand_quantiles(values: list[float], n: int) -> list[float]:
    """The sorted values read at levels (i + 1/2)/n by linear interpolation (position level * M - 1/2)."""
    ys, m = sorted(values), len(values)
    out = []
    for i in range(n):
        pos = min(max((i + 0.5) * m / n - 0.5, 0.0), m - 1.0)
        k = math.floor(pos)
        frac = pos - k
        out.append(ys[k] * (1 - frac) + ys[min(k + 1, m - 1)] * frac)
    return out


@pytest.mark.parametrize("n_target", [7, 11, 4])
def test_sorted_least_squares_fit_equals_the_hand_computation(n_target: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
    y = torch.randn(n_target, 3, generator=gen, dtype=torch.float64) * 2 + 1
    weight, bias, fitted = fit_units(x, y, "linear")
    assert bool(fitted.all())
    for j in range(3):
        xs = sorted(x[:, j].tolist())
        ys = sorted(y[:, j].tolist()) if n_target == 7 else _hand_quantiles(y[:, j].tolist(), 7)
        beta, alpha = _hand_line(xs, ys)
        assert abs(float(weight[j]) - beta) < 1e-12 and abs(float(bias[j]) - alpha) < 1e-12


def test_gaussian_and_mean_shift_fits_equal_the_hand_computation() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64) * 3 - 1
    x[:, 1] = 0.25  # a constant unit: left as it is
    gw, gb, fitted = fit_units(x, y, "gaussian")
    mw, mb, _ = fit_units(x, y, "mean")
    col_x, col_y = x[:, 0].tolist(), y[:, 0].tolist()
    mx, my = sum(col_x) / 9, sum(col_y) / 5
    sx = math.sqrt(sum((v - mx) ** 2 for v in col_x) / 9)
    sy = math.sqrt(sum((v - my) ** 2 for v in col_y) / 5)
    assert abs(float(gw[0]) - sy / sx) < 1e-12 and abs(float(gb[0]) - (my - sy / sx * mx)) < 1e-12
    assert float(mw[0]) == 1.0 and abs(float(mb[0]) - (my - mx)) < 1e-12
    assert fitted.tolist() == [True, False]
    assert float(gw[1]) == 1.0 and float(gb[1]) == 0.0 and float(mb[1]) == 0.0


# ---- Linear-AcT on a model ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_linear_act_atonce_and_incr_equal_fits_of_texts_read_alone(family: str) -> None:
    model = tiny_with_words(family)
    sites = ["L1.mlp_out", "L0.mlp_out"]  # fitted in forward order whatever the order given
    atonce = linear_act(model, NEGATIVE, POSITIVE, sites, mode="atonce")
    incr = linear_act(model, NEGATIVE, POSITIVE, sites, mode="incr")
    assert [m.site for m in incr.maps] == ["L0.mlp_out", "L1.mlp_out"]
    tgt = {s: mean_alone(model, POSITIVE, s) for s in ("L0.mlp_out", "L1.mlp_out")}
    src0 = mean_alone(model, NEGATIVE, "L0.mlp_out")
    first = incr.maps[0]
    src1_incr = mean_alone(model, NEGATIVE, "L1.mlp_out", TransportSteer([first]).interventions())
    src1_clean = mean_alone(model, NEGATIVE, "L1.mlp_out")
    cases = [(atonce.maps[0], src0, tgt["L0.mlp_out"]), (first, src0, tgt["L0.mlp_out"])]
    cases += [(atonce.maps[1], src1_clean, tgt["L1.mlp_out"]), (incr.maps[1], src1_incr, tgt["L1.mlp_out"])]
    for fitted_map, src, target in cases:
        for j in range(0, 32, 5):
            xs = sorted(src[:, j].double().tolist())
            beta, alpha = _hand_line(xs, _hand_quantiles(target[:, j].double().tolist(), len(xs)))
            assert abs(float(fitted_map.weight[j]) - beta) < 1e-4 * max(1.0, abs(beta))
            assert abs(float(fitted_map.bias[j]) - alpha) < 1e-4 * max(1.0, abs(alpha))
        torch.testing.assert_close(fitted_map.lo, src.min(0).values, atol=1e-5, rtol=0)
        torch.testing.assert_close(fitted_map.hi, src.max(0).values, atol=1e-5, rtol=0)
    assert not torch.allclose(atonce.maps[1].weight, incr.maps[1].weight, atol=1e-3)  # incr saw the first map
    assert incr.meta["coupling"].startswith("quantile-matched")  # 4 source vs 5 target texts


def test_variants_and_ranges_on_a_model() -> None:
    model = tiny_with_words()
    gauss = linear_act(model, NEGATIVE, POSITIVE, "L1.resid_post", variant="gaussian", mode="atonce")
    assert gauss.maps[0].lo is None and gauss.maps[0].hi is None  # the Gaussian variant maps every value
    shift = linear_act(model, NEGATIVE, POSITIVE, "L1.resid_post", variant="mean", source_range=(10, 90))
    src = mean_alone(model, NEGATIVE, "L1.resid_post")
    assert torch.equal(shift.maps[0].weight, torch.ones(32))
    torch.testing.assert_close(shift.maps[0].lo, torch.quantile(src.double(), 0.1, dim=0).float(), atol=1e-5, rtol=0)
    tgt = mean_alone(model, POSITIVE, "L1.resid_post")
    torch.testing.assert_close(shift.maps[0].bias, tgt.mean(0) - src.mean(0), atol=1e-5, rtol=0)


# ---- the result type: untouched model, save/load, per-row generation, composition ----------------------


def test_model_untouched_after_fit_and_every_apply_even_when_raised() -> None:
    model = tiny_with_words()
    before = snapshot(model)
    steer = linear_act(model, NEGATIVE, POSITIVE, ["L0.mlp_out", "L1.mlp_out"])
    assert_untouched(model, before)
    ids = token_batch()
    with steer.applied(model):
        steered = model.hf(ids).logits
    assert_untouched(model, before)
    assert not torch.equal(steered, model.hf(ids).logits)
    for raised in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(raised), steer.applied(model, strength=0.5):
            model.hf(ids)
            raise raised()
        assert_untouched(model, before)
    pathlens.generate(model, ids, steer, max_new_tokens=3)
    assert_untouched(model, before)


def test_save_load_round_trip_steers_identically(tmp_path: Path) -> None:
    model = tiny_with_words()
    steer = linear_act(model, NEGATIVE, POSITIVE, ["L0.mlp_out", "L1.mlp_out"], data="words").with_strength(0.8)
    steer.save(tmp_path / "steer")
    loaded = TransportSteer.load(tmp_path / "steer.safetensors")
    assert loaded.meta == steer.meta and loaded.strength == 0.8 and loaded.sites == steer.sites
    for a, b in zip(steer.maps, loaded.maps, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and torch.equal(a.lo, b.lo)
    ids = token_batch()
    first = pathlens.generate(model, ids, steer, max_new_tokens=6, logits=True)
    again = pathlens.generate(model, ids, loaded, max_new_tokens=6, logits=True)
    assert torch.equal(first.ids, again.ids) and torch.equal(first.logits, again.logits)
    assert not torch.allclose(first.logits, pathlens.generate(model, ids, max_new_tokens=6, logits=True).logits)
    (tmp_path / "steer.json").write_text((tmp_path / "steer.json").read_text().replace("0.8", "0.9"))
    with pytest.raises(PathlensError, match="steer.json"):
        TransportSteer.load(tmp_path / "steer")


def test_per_row_generation_equals_each_strength_on_the_whole_batch() -> None:
    model = tiny_with_words()
    steer = linear_act(model, NEGATIVE, POSITIVE, ["L0.mlp_out", "L1.mlp_out"], source_range=None)
    ids = token_batch(n=4)
    rows = [(steer, 0.5), None, (steer, 2.0), steer]
    per_row = pathlens.generate(model, ids, rows, max_new_tokens=5, logits=True)
    for r, entry in enumerate(rows):
        strength = entry[1] if isinstance(entry, tuple) else 1.0
        whole = pathlens.generate(
            model, ids, None if entry is None else steer.with_strength(strength), max_new_tokens=5, logits=True
        )
        assert torch.equal(per_row.ids[r], whole.ids[r]) and torch.equal(per_row.logits[r], whole.logits[r]), r
    assert not torch.allclose(per_row.logits[0], per_row.logits[1])


def test_composition_applies_both_steers_in_order() -> None:
    model = tiny_with_words()
    a = linear_act(model, NEGATIVE, POSITIVE, ["L0.mlp_out"], variant="gaussian").with_strength(0.5)
    b = linear_act(model, POSITIVE, NEGATIVE[:3], ["L0.mlp_out", "L1.mlp_out"], source_range=(5, 95))
    both = a.compose(b)
    assert both.strength == 1.0 and [m.site for m in both.maps] == ["L0.mlp_out", "L0.mlp_out", "L1.mlp_out"]
    ids = token_batch()
    sequential = model.run(ids, interventions=a.interventions() + b.interventions()).logits
    torch.testing.assert_close(model.run(ids, interventions=both.interventions()).logits, sequential, atol=1e-5, rtol=0)
    half = model.run(ids, interventions=a.interventions(0.25) + b.interventions(0.5)).logits
    torch.testing.assert_close(model.run(ids, interventions=both.interventions(0.5)).logits, half, atol=1e-5, rtol=1e-5)
    assert both.meta["parts"][0]["method"] == "linear-act"


# ---- bad input ------------------------------------------------------------------------------------------


def test_bad_inputs_name_what_is_wrong() -> None:
    model = tiny_with_words()
    with pytest.raises(PathlensError, match="the source set has 0 text"):
        linear_act(model, [], POSITIVE, "L0.mlp_out")
    with pytest.raises(PathlensError, match="the target set has 1 text"):
        linear_act(model, NEGATIVE, ["the film"], "L0.mlp_out")
    with pytest.raises(PathlensError, match="the target set must be a list of texts"):
        linear_act(model, NEGATIVE, "the film was good", "L0.mlp_out")
    with pytest.raises(PathlensError, match="variant 'cubic'"):
        linear_act(model, NEGATIVE, POSITIVE, "L0.mlp_out", variant="cubic")
    with pytest.raises(PathlensError, match="mode 'sometimes'"):
        linear_act(model, NEGATIVE, POSITIVE, "L0.mlp_out", mode="sometimes")
    with pytest.raises(PathlensError, match="source_range \\(50, 10\\)"):
        linear_act(model, NEGATIVE, POSITIVE, "L0.mlp_out", source_range=(50, 10))
    with pytest.raises(PathlensError, match="sites is empty"):
        linear_act(model, NEGATIVE, POSITIVE, [])
    with pytest.raises(PathlensError, match="pooling 'max'"):
        linear_act(model, NEGATIVE, POSITIVE, "L0.mlp_out", pooling="max")
    steer = linear_act(model, NEGATIVE, POSITIVE, "L0.mlp_out")
    for bad in (math.nan, math.inf, "1"):
        with pytest.raises(PathlensError, match="must be a finite number"):
            steer.with_strength(bad)  # type: ignore[arg-type]
        with pytest.raises(PathlensError, match="must be a finite number"):
            steer.interventions(bad)  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match="must be a finite number"):
        pathlens.generate(model, token_batch(), [(steer, math.inf), None, None], max_new_tokens=2)
    wide = tiny_model("llama")
    wide_map = TransportSteer([AffineMap("L0.mlp_out", torch.ones(16), torch.zeros(16))])
    with pytest.raises(PathlensError, match="the map at L0.mlp_out has 16 units, but tiny-llama's L0.mlp_out is 32"):
        wide_map.check(wide)
    with pytest.raises(PathlensError, match="bias has 3 entries but weight has 4"):
        AffineMap("L0.mlp_out", torch.ones(4), torch.zeros(3))
    with pytest.raises(PathlensError, match="holds NaN"):
        AffineMap("L0.mlp_out", torch.ones(4), torch.tensor([0.0, math.nan, 0.0, 0.0]))
    with pytest.raises(PathlensError, match="maps must be a non-empty list"):
        TransportSteer([])


# ---- the study the CLI runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear-act", "lineas"])
def test_transport_study_writes_the_steer_and_its_sweep(method: str, tmp_path: Path) -> None:
    from pathlens.steering.learned.study_transport import transport_study

    model = tiny_with_words()
    record = transport_study(model, "sentiment", method, tmp_path, None, [0.5, 1.0], n_prompts=2, max_new_tokens=2)
    assert [row["scale"] for row in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["rows"][0]["ppl_increase"] == 0.0 and record["total_units"] == 64
    loaded = TransportSteer.load(tmp_path / "transport")
    assert loaded.meta["method"] == method and loaded.sites == ["L0.mlp_out", "L1.mlp_out"]
    assert record["vector"] == str(tmp_path / "transport.safetensors")
    assert (tmp_path / "steer.json").is_file() and (tmp_path / "dose_response.csv").is_file()
    with pytest.raises(PathlensError, match="unknown transport method 'ot'"):
        transport_study(model, "sentiment", "ot", tmp_path, None, [1.0])


def test_steer_command_dispatches_transport_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import json

    from typer.testing import CliRunner

    from pathlens.cli import app

    monkeypatch.setattr(importlib.import_module("pathlens.cli.steer"), "load_model", lambda name: tiny_with_words())
    args = ["steer", "--method", "linear-act", "--prompts", "2", "--max-new-tokens", "2", "--scales", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "steer.json").read_text())
    assert record["method"] == "linear-act" and [r["scale"] for r in record["rows"]] == [0.0, 1.0]
    assert (tmp_path / "transport.safetensors").is_file() and (tmp_path / "steer.html").is_file()
    bad = CliRunner().invoke(app, ["steer", "--model", "no-such-model", "--method", "ot", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "lineas, linear-act" in " ".join(bad.output.split())
