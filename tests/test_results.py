"""Tests for `pathlens.results.Scores`: validation, tables, selection, reduction, correlation and stacking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pathlens.errors import PathlensError
from pathlens.results import Scores
from tests.helpers import SCORES_2X3, make_scores

# --- validation -----------------------------------------------------------------------------------------------


def test_valid_construction_normalizes_inputs() -> None:
    values = torch.ones(2, 3, requires_grad=True) * 2
    s = Scores(
        values=values,
        dims=["layer", "site"],
        coords={"site": ("a", "b", "c"), "layer": np.arange(2)},
        metric="m",
        method="atp",
        meta={"shape": (1, 2), "clean": torch.tensor(1.5), "n": np.int64(4)},
    )
    assert s.dims == ("layer", "site")
    assert list(s.coords) == ["layer", "site"]
    assert s.coords["layer"] == [0, 1] and all(type(x) is int for x in s.coords["layer"])
    assert not s.values.requires_grad
    assert s.meta == {"shape": [1, 2], "clean": 1.5, "n": 4}
    assert s.shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dims": ("layer", "layer")}, "unique"),
        ({"dims": "layer"}, "tuple of names"),
        ({"dims": ("layer",)}, "2 axes"),
        ({"dims": ("layer", "value")}, "reserved"),
        ({"coords": {"layer": [0, 1]}}, "missing ['head']"),
        ({"coords": {"layer": [0, 1], "head": [0, 1, 2], "pos": [0]}}, "unexpected ['pos']"),
        ({"coords": {"layer": [0, 1], "head": [0, 1]}}, "coords['head'] has 2 labels"),
        ({"coords": {"layer": [0, 0], "head": [0, 1, 2]}}, "repeated labels [0]"),
        ({"coords": {"layer": [0, "a"], "head": [0, 1, 2]}}, "mixes ints and strings"),
        ({"coords": {"layer": [0.0, 1.0], "head": [0, 1, 2]}}, "must be an int or a string"),
        ({"values": torch.zeros(2, 3, dtype=torch.long)}, "float tensor"),
        ({"values": np.zeros((2, 3))}, "torch.Tensor"),
        ({"metric": ""}, "metric"),
        ({"meta": {"x": object()}}, "meta['x']"),
        ({"meta": {1: "a"}}, "key 1"),
        ({"pos_labels": ["a", "b", "c"]}, "no 'pos' dim"),
    ],
)
def test_validation_errors(kwargs: dict, message: str) -> None:
    base = {
        "values": torch.zeros(2, 3),
        "dims": ("layer", "head"),
        "coords": {"layer": [0, 1], "head": [0, 1, 2]},
        "metric": "logit_diff",
        "method": "atp",
        "meta": {},
    }
    with pytest.raises(PathlensError) as info:
        Scores(**{**base, **kwargs})
    assert message in str(info.value)


def test_pos_labels_length_checked() -> None:
    with pytest.raises(PathlensError, match="one token string per position"):
        make_scores(torch.zeros(2, 3), ("layer", "pos"), pos_labels=["a", "b"])


# --- tables ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("abs", [-3.0, -2.5, 2.0, 1.0]),
        ("value", [2.0, 1.0, 0.5, -0.1]),
        ("neg", [-3.0, -2.5, -0.1, 0.5]),
    ],
)
def test_top_orders_by_each_key(by: str, expected: list[float]) -> None:
    top = make_scores(SCORES_2X3).top(4, by=by)
    assert list(top.columns) == ["layer", "head", "value"]
    assert top["value"].tolist() == pytest.approx(expected)
    assert list(top.index) == [0, 1, 2, 3]


def test_top_labels_and_limits() -> None:
    s = make_scores(SCORES_2X3)
    first = s.top(1).iloc[0]
    assert (first["layer"], first["head"]) == (0, 1)
    assert len(s.top(100)) == 6
    with pytest.raises(PathlensError, match="'abs', 'value' or 'neg'"):
        s.top(by="largest")
    with pytest.raises(PathlensError, match="positive int"):
        s.top(0)


def test_top_puts_nan_last_and_keeps_ties_in_row_major_order() -> None:
    s = make_scores([[float("nan"), 1.0], [-1.0, 1.0]])
    assert s.top(4)["value"].tolist()[:3] == [1.0, -1.0, 1.0]
    assert np.isnan(s.top(4)["value"].iloc[3])
    assert s.top(4, by="value")[["layer", "head"]].values.tolist()[:2] == [[0, 1], [1, 1]]


def test_to_frame_has_one_row_per_cell_in_row_major_order() -> None:
    s = make_scores(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), pos_labels=["a", "b", "c", "d"])
    frame = s.to_frame()
    assert len(frame) == 24
    assert list(frame.columns) == ["layer", "head", "pos", "pos_label", "value"]
    assert frame["value"].tolist() == list(range(24))
    assert frame.iloc[5][["layer", "head", "pos", "pos_label"]].tolist() == [0, 1, 1, "b"]
    assert frame["layer"].dtype == np.int64


def test_to_frame_string_coords() -> None:
    s = Scores(torch.tensor([1.0, 2.0]), ("site",), {"site": ["embed", "mlp0"]}, "m", "ablate:zero", {})
    frame = s.to_frame()
    assert frame["site"].tolist() == ["embed", "mlp0"]
    assert isinstance(frame, pd.DataFrame)


def test_repr_is_short_and_shows_top_cells() -> None:
    text = repr(make_scores(torch.arange(100.0).reshape(10, 10)))
    assert "layer=10 x head=10" in text and "patch:denoise" in text and "logit_diff" in text
    assert len(text.splitlines()) == 7
    assert "layer=9 head=9: +99" in text


# --- selection and reduction ----------------------------------------------------------------------------------


def test_sel_drops_a_dim_for_a_label_and_keeps_it_for_a_list() -> None:
    s = make_scores(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), pos_labels=list("abcd"))
    one = s.sel(head=1)
    assert one.dims == ("layer", "pos") and one.shape == (2, 4)
    assert torch.equal(one.values, s.values[:, 1, :])
    assert one.pos_labels == list("abcd")
    some = s.sel(pos=[3, 1])
    assert some.dims == s.dims and some.shape == (2, 3, 2)
    assert some.coords["pos"] == [3, 1] and some.pos_labels == ["d", "b"]
    assert torch.equal(some.values, s.values[:, :, [3, 1]])
    both = s.sel(layer=1, pos=np.int64(2))
    assert both.dims == ("head",) and both.values.tolist() == [14.0, 18.0, 22.0]
    assert both.pos_labels is None
    assert s.sel(layer=range(2)).shape == (2, 3, 4)


def test_sel_errors_name_the_dim_and_labels() -> None:
    s = make_scores(SCORES_2X3)
    with pytest.raises(PathlensError, match="no dim 'pos'"):
        s.sel(pos=0)
    with pytest.raises(PathlensError, match="head=7 is not a label"):
        s.sel(head=7)
    with pytest.raises(PathlensError, match="not a label"):
        s.sel(head="0")


def test_sel_result_does_not_share_memory() -> None:
    s = make_scores(SCORES_2X3)
    picked = s.sel(layer=0)
    picked.values[0] = 100.0
    assert s.values[0, 0] == 0.5


def test_sum_and_mean_shapes_and_values() -> None:
    s = make_scores(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), pos_labels=list("abcd"))
    assert s.sum("head").dims == ("layer", "pos")
    assert s.sum("head").shape == (2, 4)
    assert torch.equal(s.sum("head").values, s.values.sum(1))
    assert s.sum("head").pos_labels == list("abcd")
    assert s.mean("pos").shape == (2, 3) and s.mean("pos").pos_labels is None
    assert torch.allclose(s.mean("pos").values, s.values.mean(2))
    total = s.sum(["layer", "head", "pos"])
    assert total.dims == () and total.values.item() == 276.0
    with pytest.raises(PathlensError, match="no dim 'neuron'"):
        s.sum("neuron")


# --- correlation ----------------------------------------------------------------------------------------------


def test_corr_perfectly_correlated_is_one() -> None:
    a = make_scores(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
    b = make_scores(a.values * 3 + 1, method="atp")
    assert a.corr(b) == pytest.approx(1.0)
    assert a.corr(b, method="spearman") == pytest.approx(1.0)
    assert a.corr(make_scores(-a.values)) == pytest.approx(-1.0)


def test_spearman_with_ties_matches_hand_computation() -> None:
    # x ranks: 10 -> 1, 20/20 -> 2.5 each, 30 -> 4;  y ranks: 1 -> 1, 3 -> 3, 2 -> 2, 4 -> 4.
    # centered: rx = [-1.5, 0, 0, 1.5], ry = [-1.5, 0.5, -0.5, 1.5]; sum(rx*ry) = 4.5,
    # |rx|^2 = 4.5, |ry|^2 = 5  ->  rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    x = make_scores([10.0, 20.0, 20.0, 30.0], ("site",))
    y = make_scores([1.0, 3.0, 2.0, 4.0], ("site",))
    assert x.corr(y, method="spearman") == pytest.approx(3 / np.sqrt(10), abs=1e-12)


def test_pearson_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = make_scores(torch.randn(6, 7, generator=gen)), make_scores(torch.randn(6, 7, generator=gen))
    expected = np.corrcoef(a.values.flatten().double().numpy(), b.values.flatten().double().numpy())[0, 1]
    assert a.corr(b) == pytest.approx(expected, abs=1e-12)


def test_corr_refuses_mismatched_coords_and_dims() -> None:
    a = make_scores(torch.randn(2, 3))
    b = Scores(torch.randn(2, 3), ("layer", "head"), {"layer": [0, 1], "head": [0, 1, 5]}, "m", "atp", {})
    with pytest.raises(PathlensError, match="'head' differs at index 2: 2 vs 5"):
        a.corr(b)
    with pytest.raises(PathlensError, match="different dims"):
        a.corr(make_scores(torch.randn(2, 3), ("layer", "pos")))
    with pytest.raises(PathlensError, match="'layer' has 2 vs 3 labels"):
        a.corr(make_scores(torch.randn(3, 3)))


def test_corr_refuses_undefined_cases() -> None:
    a = make_scores(torch.randn(2, 3))
    with pytest.raises(PathlensError, match="constant"):
        a.corr(make_scores(torch.zeros(2, 3)))
    with pytest.raises(PathlensError, match="NaN"):
        a.corr(make_scores(torch.tensor([[1.0, float("nan"), 0.0], [1.0, 2.0, 3.0]])))
    with pytest.raises(PathlensError, match="'pearson' or 'spearman'"):
        a.corr(a, method="kendall")


# --- stack ----------------------------------------------------------------------------------------------------


def test_stack_adds_a_leading_dim() -> None:
    a = make_scores(SCORES_2X3, meta={"model": "gpt2", "seed": 0})
    b = make_scores(torch.tensor(SCORES_2X3) * 2, meta={"model": "gpt2", "seed": 1})
    stacked = Scores.stack([a, b], "seed", [0, 1])
    assert stacked.dims == ("seed", "layer", "head") and stacked.shape == (2, 2, 3)
    assert torch.equal(stacked.sel(seed=1).values, b.values)
    assert stacked.meta == {"model": "gpt2", "stacked_meta": [{"seed": 0}, {"seed": 1}]}
    with pytest.raises(PathlensError, match="already exists"):
        Scores.stack([a, b], "layer", [0, 1])
    with pytest.raises(PathlensError, match="differ in method"):
        Scores.stack([a, make_scores(SCORES_2X3, method="atp")], "seed", [0, 1])
    with pytest.raises(PathlensError, match="coords\\['seed'\\] has 1 labels"):
        Scores.stack([a, b], "seed", [0])
