"""Head detectors: hand-built attention patterns (a perfect previous-token head scores 1, a uniform head its closed
form), the detection patterns against explicit loops, TransformerLens' own scoring function on random patterns,
a naive per-head loop on a model (padding, GQA), a clamped head, and induction-2l's circuit heads ranked first."""

from __future__ import annotations

import itertools

import pytest
import torch

import pathlens
from pathlens.diagnostics import heads
from pathlens.errors import PathlensError
from pathlens.interventions import Intervention, Replace
from tests.helpers import assert_untouched, snapshot, tiny_model, token_batch


def _uniform(n: int) -> torch.Tensor:
    """A uniform causal head: A[i, j] = 1 / (i + 1) for j <= i."""
    return torch.tril(torch.ones(n, n, dtype=torch.float64)) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]


def _perfect_previous(n: int) -> torch.Tensor:
    a = torch.diag_embed(torch.ones(n - 1), offset=-1)
    a[0, 0] = 1.0  # the first token can only attend to itself
    return a


def _score(a: torch.Tensor, d: torch.Tensor, **kw) -> float:
    return float(heads.similarity(a[None, :, None, :], d[None], **kw)[0, 0])


def test_perfect_and_uniform_previous_token_heads() -> None:
    n = 10
    d = heads.previous_token_pattern(torch.zeros(1, n, dtype=torch.long))[0]
    perfect = _perfect_previous(n)
    assert _score(perfect, d, exclude_current_token=True) == pytest.approx(1.0, abs=1e-12)
    assert _score(perfect, d, exclude_bos=True, error_measure="abs") == pytest.approx(1.0, abs=1e-12)
    assert _score(perfect, d) == pytest.approx((n - 1) / n, abs=1e-12)  # row 0 attends to itself, outside D
    assert _score(perfect, d, error_measure="abs") == pytest.approx(1 - round(1 / n, 3), abs=1e-12)
    uniform = _uniform(n)
    harmonic = sum(1.0 / k for k in range(1, n + 1))
    assert _score(uniform, d) == pytest.approx((harmonic - 1.0) / n, abs=1e-12)
    total = 1.0 + sum(2 * i / (i + 1) for i in range(1, n))  # row 0: |1 - 0|; row i: two cells of i / (i + 1)
    assert _score(uniform, d, error_measure="abs") == pytest.approx(1 - round(total / n, 3), abs=1e-12)
    # excluding the current token: row i keeps i cells of 1 / (i + 1), one of them on D
    kept = sum(i / (i + 1) for i in range(1, n))
    assert _score(uniform, d, exclude_current_token=True) == pytest.approx((harmonic - 1.0) / kept, abs=1e-12)


def test_detection_patterns_match_explicit_loops() -> None:
    ids = torch.tensor([[5, 7, 5, 9, 7, 5, 5]])
    n = ids.shape[1]
    dup, ind, prev = (
        f(ids)[0] for f in (heads.duplicate_token_pattern, heads.induction_pattern, heads.previous_token_pattern)
    )
    for i, j in itertools.product(range(n), range(n)):
        assert dup[i, j] == float(j < i and ids[0, i] == ids[0, j])
        assert ind[i, j] == float(1 <= j <= i and ids[0, i] == ids[0, j - 1] and j - 1 < i)
        assert prev[i, j] == float(j == i - 1)


@pytest.mark.parametrize("error_measure", ["mul", "abs"])
def test_similarity_equals_transformer_lens(error_measure: str) -> None:
    """TransformerLens 4.3's own scoring function on random causal patterns and its detection patterns."""
    head_detector = pytest.importorskip("transformer_lens.head_detector")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5, (1, 12), generator=gen)
    logits = torch.randn(12, 12, generator=gen).masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf"))
    a = logits.softmax(-1)
    builders = {
        heads.previous_token_pattern: head_detector.get_previous_token_head_detection_pattern,
        heads.duplicate_token_pattern: head_detector.get_duplicate_token_head_detection_pattern,
        heads.induction_pattern: head_detector.get_induction_head_detection_pattern,
    }
    for ours, theirs in builders.items():
        d_tl = theirs(ids)
        assert torch.equal(ours(ids)[0], d_tl.float())
        for bos, current in itertools.product([False, True], repeat=2):
            expected = head_detector.compute_head_attention_similarity_score(
                a.clone(), d_tl, exclude_bos=bos, exclude_current_token=current, error_measure=error_measure
            )
            got = _score(a, ours(ids)[0], exclude_bos=bos, exclude_current_token=current, error_measure=error_measure)
            assert got == pytest.approx(expected, abs=1e-6)


def _naive(model, rows: list[torch.Tensor], builder, **kw) -> torch.Tensor:
    """Each prompt alone, each head in a loop, TransformerLens' formula written out."""
    out = torch.zeros(model.n_layers, model.n_heads)
    for ids in rows:
        cache = model.run(ids[None], cache=[f"L{layer}.pattern" for layer in range(model.n_layers)]).cache
        d = builder(ids[None])[0].double()
        for layer, head in itertools.product(range(model.n_layers), range(model.n_heads)):
            a = cache[f"L{layer}.pattern"][0, :, head].double().clone()  # (q, k)
            if kw.get("error_measure", "mul") == "mul":
                if kw.get("exclude_bos"):
                    a[:, 0] = 0
                if kw.get("exclude_current_token"):
                    a.fill_diagonal_(0)
                score = float((a * d).sum() / a.sum())
            else:
                diff = (a - d).abs()
                if kw.get("exclude_bos"):
                    diff[:, 0] = 0
                if kw.get("exclude_current_token"):
                    diff.fill_diagonal_(0)
                score = 1 - round(float(diff.mean() * len(diff)), 3)
            out[layer, head] += score / len(rows)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_detectors_equal_a_naive_loop_with_padding(family: str) -> None:
    model = tiny_model(family, weight_scale=3.0)  # llama: 4 query heads sharing 2 key-value groups
    full = torch.tensor([[3, 5, 7, 3, 5, 7, 9, 3], [4, 4, 8, 9, 4, 8, 2, 2], [6, 1, 6, 1, 6, 1, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 8, [1] * 6 + [0] * 2])
    rows = [full[0], full[1], full[2, :6]]
    before = snapshot(model)
    for detector, builder in (
        (heads.previous_token, heads.previous_token_pattern),
        (heads.duplicate_token, heads.duplicate_token_pattern),
        (heads.induction, heads.induction_pattern),
    ):
        for kw in ({}, {"exclude_bos": True, "exclude_current_token": True}, {"error_measure": "abs"}):
            scores = detector(model, full, attention_mask=mask, **kw)
            assert scores.dims == ("layer", "head") and scores.shape == (model.n_layers, model.n_heads)
            torch.testing.assert_close(scores.values, _naive(model, rows, builder, **kw), atol=1e-5, rtol=0)
    assert_untouched(model, before)


def test_a_clamped_perfect_previous_token_head_scores_one() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=2, p=9)
    clamp = Intervention("L1.H2.pattern", Replace(_perfect_previous(9)[None]))
    scores = heads.previous_token(model, ids, interventions=[clamp], exclude_current_token=True)
    assert float(scores.values[1, 2]) == pytest.approx(1.0, abs=1e-6)
    assert float(scores.values.flatten().sort().values[-2]) < 0.9


def test_prefix_matching_on_a_clamped_head_and_repeated_tokens() -> None:
    model = tiny_model("llama")
    ids = heads.repeated_tokens(model, n=3, length=6, seed=1)
    assert ids.shape == (3, 13) and torch.equal(ids[:, 1:7], ids[:, 7:]) and bool((ids[:, 0] == 0).all())
    n, t = 13, 6
    perfect = torch.zeros(n, n)
    for q in range(n):
        perfect[q, q - (t - 1) if q >= 1 + t else q] = 1.0
    clamp = Intervention("L0.H1.pattern", Replace(perfect[None]))
    scores = heads.prefix_matching(model, ids, interventions=[clamp])
    assert float(scores.values[0, 1]) == pytest.approx(1.0)


def test_prefix_matching_is_the_mean_attention_at_the_offset() -> None:
    model = tiny_model("llama", weight_scale=3.0)
    ids = heads.repeated_tokens(model, n=2, length=5, seed=3)
    scores = heads.prefix_matching(model, ids)
    cache = model.run(ids, cache=["L0.pattern", "L1.pattern"]).cache
    for layer, head in itertools.product(range(2), range(4)):
        cells = [float(cache[f"L{layer}.pattern"][b, q, head, q - 4]) for b in range(2) for q in range(6, 11)]
        assert float(scores.values[layer, head]) == pytest.approx(sum(cells) / len(cells), abs=1e-6)


def test_induction_2l_ranks_its_circuit_heads_first() -> None:
    model = pathlens.load("induction-2l")
    ids = heads.repeated_tokens(model, n=8, length=20)
    assert heads.previous_token(model, ids).top(1, by="value")[["layer", "head"]].values.tolist() == [[0, 1]]
    assert heads.induction(model, ids).top(1, by="value")[["layer", "head"]].values.tolist() == [[1, 0]]
    assert heads.prefix_matching(model).top(1, by="value")[["layer", "head"]].values.tolist() == [[1, 0]]


def test_bad_inputs_are_named() -> None:
    model = tiny_model("llama")
    ids = token_batch(n=2, p=5)
    with pytest.raises(PathlensError, match="lower-triangular"):
        heads.pattern_score(model, ids, torch.ones(5, 5))
    with pytest.raises(PathlensError, match="pattern has shape"):
        heads.pattern_score(model, ids, torch.eye(4))
    with pytest.raises(PathlensError, match="error_measure"):
        heads.previous_token(model, ids, error_measure="sq")  # type: ignore[arg-type]
    with pytest.raises(PathlensError, match="not repeated"):
        heads.prefix_matching(model, token_batch(n=2, p=9))


def test_cli_heads_writes_scores_png_and_table(tmp_path) -> None:
    from typer.testing import CliRunner

    from pathlens.cli import app
    from pathlens.results import Scores

    result = CliRunner().invoke(
        app,
        ["heads", "--model", "induction-2l", "--n", "4", "--length", "10", "--out", str(tmp_path)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    assert "L1.H0" in result.output and "prefix_matching" in result.output
    for name in ("previous_token", "duplicate_token", "induction", "prefix_matching"):
        assert Scores.load(tmp_path / name).dims == ("layer", "head")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "heads_top.csv").read_text().startswith("layer,head,value,detector")
    bad = CliRunner().invoke(app, ["heads", "--error-measure", "sq", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown measure" in bad.output
