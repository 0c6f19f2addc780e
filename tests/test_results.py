"""Tests for `pathlens.results.Scores`: validation, tables, selection, correlation, persistence and plots."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from safetensors import safe_open

from pathlens.errors import PathlensError
from pathlens.results import FORMAT_VERSION, Scores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make(values: list | torch.Tensor, dims: tuple[str, ...] = ("layer", "head"), **kwargs) -> Scores:
    """A Scores over `values` with integer coords 0..n-1 on every dim."""
    values = torch.as_tensor(values, dtype=torch.float32)
    coords = {d: list(range(n)) for d, n in zip(dims, values.shape, strict=True)}
    kwargs.setdefault("metric", "logit_diff")
    kwargs.setdefault("method", "patch:denoise")
    kwargs.setdefault("meta", {})
    return Scores(values=values, dims=dims, coords=coords, **kwargs)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, so NaN payloads and -0.0 compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_identical(a: Scores, b: Scores) -> None:
    assert a.values.dtype == b.values.dtype
    assert a.values.shape == b.values.shape
    assert torch.equal(bits(a.values), bits(b.values))
    assert (a.dims, a.coords, a.metric, a.method, a.meta, a.pos_labels) == (
        b.dims,
        b.coords,
        b.metric,
        b.method,
        b.meta,
        b.pos_labels,
    )


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
        make(torch.zeros(2, 3), ("layer", "pos"), pos_labels=["a", "b"])


# --- tables ---------------------------------------------------------------------------------------------------


VALUES = [[0.5, -3.0, 1.0], [2.0, -0.1, -2.5]]


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("abs", [-3.0, -2.5, 2.0, 1.0]),
        ("value", [2.0, 1.0, 0.5, -0.1]),
        ("neg", [-3.0, -2.5, -0.1, 0.5]),
    ],
)
def test_top_orders_by_each_key(by: str, expected: list[float]) -> None:
    top = make(VALUES).top(4, by=by)
    assert list(top.columns) == ["layer", "head", "value"]
    assert top["value"].tolist() == pytest.approx(expected)
    assert list(top.index) == [0, 1, 2, 3]


def test_top_labels_and_limits() -> None:
    s = make(VALUES)
    first = s.top(1).iloc[0]
    assert (first["layer"], first["head"]) == (0, 1)
    assert len(s.top(100)) == 6
    with pytest.raises(PathlensError, match="'abs', 'value' or 'neg'"):
        s.top(by="largest")
    with pytest.raises(PathlensError, match="positive int"):
        s.top(0)


def test_top_puts_nan_last_and_keeps_ties_in_row_major_order() -> None:
    s = make([[float("nan"), 1.0], [-1.0, 1.0]])
    assert s.top(4)["value"].tolist()[:3] == [1.0, -1.0, 1.0]
    assert np.isnan(s.top(4)["value"].iloc[3])
    assert s.top(4, by="value")[["layer", "head"]].values.tolist()[:2] == [[0, 1], [1, 1]]


def test_to_frame_has_one_row_per_cell_in_row_major_order() -> None:
    s = make(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), pos_labels=["a", "b", "c", "d"])
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
    text = repr(make(torch.arange(100.0).reshape(10, 10)))
    assert "layer=10 x head=10" in text and "patch:denoise" in text and "logit_diff" in text
    assert len(text.splitlines()) == 7
    assert "layer=9 head=9: +99" in text


# --- selection and reduction ----------------------------------------------------------------------------------


def test_sel_drops_a_dim_for_a_label_and_keeps_it_for_a_list() -> None:
    s = make(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), pos_labels=list("abcd"))
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
    s = make(VALUES)
    with pytest.raises(PathlensError, match="no dim 'pos'"):
        s.sel(pos=0)
    with pytest.raises(PathlensError, match="head=7 is not a label"):
        s.sel(head=7)
    with pytest.raises(PathlensError, match="not a label"):
        s.sel(head="0")


def test_sel_result_does_not_share_memory() -> None:
    s = make(VALUES)
    picked = s.sel(layer=0)
    picked.values[0] = 100.0
    assert s.values[0, 0] == 0.5


def test_sum_and_mean_shapes_and_values() -> None:
    s = make(torch.arange(24.0).reshape(2, 3, 4), ("layer", "head", "pos"), pos_labels=list("abcd"))
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
    a = make(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
    b = make(a.values * 3 + 1, method="atp")
    assert a.corr(b) == pytest.approx(1.0)
    assert a.corr(b, method="spearman") == pytest.approx(1.0)
    assert a.corr(make(-a.values)) == pytest.approx(-1.0)


def test_spearman_with_ties_matches_hand_computation() -> None:
    # x ranks: 10 -> 1, 20/20 -> 2.5 each, 30 -> 4;  y ranks: 1 -> 1, 3 -> 3, 2 -> 2, 4 -> 4.
    # centered: rx = [-1.5, 0, 0, 1.5], ry = [-1.5, 0.5, -0.5, 1.5]; sum(rx*ry) = 4.5,
    # |rx|^2 = 4.5, |ry|^2 = 5  ->  rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    x = make([10.0, 20.0, 20.0, 30.0], ("site",))
    y = make([1.0, 3.0, 2.0, 4.0], ("site",))
    assert x.corr(y, method="spearman") == pytest.approx(3 / np.sqrt(10), abs=1e-12)


def test_pearson_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = make(torch.randn(6, 7, generator=gen)), make(torch.randn(6, 7, generator=gen))
    expected = np.corrcoef(a.values.flatten().double().numpy(), b.values.flatten().double().numpy())[0, 1]
    assert a.corr(b) == pytest.approx(expected, abs=1e-12)


def test_corr_refuses_mismatched_coords_and_dims() -> None:
    a = make(torch.randn(2, 3))
    b = Scores(torch.randn(2, 3), ("layer", "head"), {"layer": [0, 1], "head": [0, 1, 5]}, "m", "atp", {})
    with pytest.raises(PathlensError, match="'head' differs at index 2: 2 vs 5"):
        a.corr(b)
    with pytest.raises(PathlensError, match="different dims"):
        a.corr(make(torch.randn(2, 3), ("layer", "pos")))
    with pytest.raises(PathlensError, match="'layer' has 2 vs 3 labels"):
        a.corr(make(torch.randn(3, 3)))


def test_corr_refuses_undefined_cases() -> None:
    a = make(torch.randn(2, 3))
    with pytest.raises(PathlensError, match="constant"):
        a.corr(make(torch.zeros(2, 3)))
    with pytest.raises(PathlensError, match="NaN"):
        a.corr(make(torch.tensor([[1.0, float("nan"), 0.0], [1.0, 2.0, 3.0]])))
    with pytest.raises(PathlensError, match="'pearson' or 'spearman'"):
        a.corr(a, method="kendall")


# --- stack ----------------------------------------------------------------------------------------------------


def test_stack_adds_a_leading_dim() -> None:
    a = make(VALUES, meta={"model": "gpt2", "seed": 0})
    b = make(torch.tensor(VALUES) * 2, meta={"model": "gpt2", "seed": 1})
    stacked = Scores.stack([a, b], "seed", [0, 1])
    assert stacked.dims == ("seed", "layer", "head") and stacked.shape == (2, 2, 3)
    assert torch.equal(stacked.sel(seed=1).values, b.values)
    assert stacked.meta == {"model": "gpt2", "stacked_meta": [{"seed": 0}, {"seed": 1}]}
    with pytest.raises(PathlensError, match="already exists"):
        Scores.stack([a, b], "layer", [0, 1])
    with pytest.raises(PathlensError, match="differ in method"):
        Scores.stack([a, make(VALUES, method="atp")], "seed", [0, 1])
    with pytest.raises(PathlensError, match="coords\\['seed'\\] has 1 labels"):
        Scores.stack([a, b], "seed", [0])


# --- save / load ----------------------------------------------------------------------------------------------


@st.composite
def scores_strategy(draw: st.DrawFn) -> Scores:
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    width = {torch.float16: 16, torch.bfloat16: 32, torch.float32: 32, torch.float64: 64}[dtype]
    special = st.sampled_from([-0.0, 0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -1.7e308, 5e-324])
    elements = st.one_of(st.floats(width=width), special)
    flat = draw(st.lists(elements, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    values = torch.tensor(flat, dtype=torch.float64).to(dtype).reshape(shape)
    dims = ("layer", "head", "pos")[: len(shape)]
    coords: dict[str, list] = {d: list(range(n)) for d, n in zip(dims, shape, strict=True)}
    if dims and draw(st.booleans()):
        coords[dims[0]] = [f"site ü {i}" for i in range(shape[0])]
    pos_labels = None
    if "pos" in dims and draw(st.booleans()):
        pos_labels = draw(st.lists(st.text(max_size=4), min_size=shape[2], max_size=shape[2]))
    meta = draw(
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
            max_size=3,
        )
    )
    return Scores(values, dims, coords, "logit_diff", "patch:denoise", meta, pos_labels)


@settings(max_examples=60, deadline=None)
@given(scores=scores_strategy(), suffix=st.sampled_from(["", ".safetensors", ".json"]))
def test_save_load_round_trip_is_bit_identical(scores: Scores, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scores.save(Path(tmp) / f"result{suffix}")
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["result.json", "result.safetensors"]
        loaded = Scores.load(Path(tmp) / "result")
        assert_identical(scores, loaded)
        assert_identical(scores, Scores.load(str(Path(tmp) / "result.json")))


def test_saved_files_are_plain(tmp_path: Path) -> None:
    s = make(VALUES, meta={"task": "ioi"}, pos_labels=None)
    s.save(tmp_path / "sub" / "res")
    header = json.loads((tmp_path / "sub" / "res.json").read_text())
    assert header["format_version"] == FORMAT_VERSION
    assert header["dims"] == ["layer", "head"] and header["meta"] == {"task": "ioi"}
    with safe_open(tmp_path / "sub" / "res.safetensors", framework="pt") as f:
        assert list(f.keys()) == ["values"]
        assert f.metadata() is None


def test_save_overwrites_and_detects_mismatched_pair(tmp_path: Path) -> None:
    make(VALUES).save(tmp_path / "a")
    make(torch.tensor(VALUES) + 1).save(tmp_path / "a")
    assert Scores.load(tmp_path / "a").values[0, 0] == 1.5
    make(VALUES).save(tmp_path / "b")
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(PathlensError, match="different"):
        Scores.load(tmp_path / "a")
    with pytest.raises(PathlensError, match="does not exist"):
        Scores.load(tmp_path / "missing")


# --- plots ----------------------------------------------------------------------------------------------------


def assert_png_not_blank(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].var()) > 1e-3


def test_plot_2d_heatmap(tmp_path: Path) -> None:
    s = make(
        torch.randn(4, 6, generator=torch.Generator().manual_seed(0)),
        ("layer", "pos"),
        pos_labels=["<bos>", " When", " $x$", "\n", " Mary", " John"],
        meta={"task": "ioi"},
    )
    fig = s.plot(tmp_path / "heat.png", title="IOI")
    assert isinstance(fig, Figure)
    assert_png_not_blank(tmp_path / "heat.png")
    heat_ax, bar_ax = fig.axes
    assert heat_ax.get_title() == "IOI"
    assert (heat_ax.get_xlabel(), heat_ax.get_ylabel()) == ("pos", "layer")
    assert [t.get_text() for t in heat_ax.get_xticklabels()][:2] == ["<bos>", " When"]
    assert bar_ax.get_ylabel() == "logit_diff"
    low, high = heat_ax.images[0].get_clim()
    assert low == -high and high == pytest.approx(float(s.values.abs().max()))


def test_plot_1d_bar_chart(tmp_path: Path) -> None:
    s = Scores(torch.tensor([0.5, -1.0, 2.0]), ("site",), {"site": ["embed", "attn0", "mlp0"]}, "ld", "atp", {})
    fig = s.plot(tmp_path / "bars.png")
    assert_png_not_blank(tmp_path / "bars.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["embed", "attn0", "mlp0"]
    assert len(fig.axes[0].patches) == 3


def test_plot_into_given_axes_and_without_path() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    assert make(VALUES).plot(ax=ax) is fig
    assert make(torch.randn(40, 100), ("layer", "pos")).plot().axes[0].get_xticks().size <= 40


def test_plot_refuses_3d_and_scalars() -> None:
    s = make(torch.zeros(2, 3, 4), ("layer", "head", "pos"))
    with pytest.raises(PathlensError, match=r"\.sel\(pos=0\) or \.sum\('pos'\)"):
        s.plot()
    with pytest.raises(PathlensError, match="one value"):
        s.sum(["layer", "head", "pos"]).plot()
