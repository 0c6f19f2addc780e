"""Tests for `pathlens.results.plots`: the PNG heatmap and bar chart of a `Scores` (drawn through `Scores.plot`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
import torch
from matplotlib.figure import Figure

from pathlens.errors import PathlensError
from pathlens.results import Scores
from tests.helpers import SCORES_2X3, make_scores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- plots ----------------------------------------------------------------------------------------------------


def assert_png_not_blank(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].var()) > 1e-3


def test_plot_2d_heatmap(tmp_path: Path) -> None:
    s = make_scores(
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
    assert make_scores(SCORES_2X3).plot(ax=ax) is fig
    assert make_scores(torch.randn(40, 100), ("layer", "pos")).plot().axes[0].get_xticks().size <= 40


def test_plot_refuses_3d_and_scalars() -> None:
    s = make_scores(torch.zeros(2, 3, 4), ("layer", "head", "pos"))
    with pytest.raises(PathlensError, match=r"\.sel\(pos=0\) or \.sum\('pos'\)"):
        s.plot()
    with pytest.raises(PathlensError, match="one value"):
        s.sum(["layer", "head", "pos"]).plot()
