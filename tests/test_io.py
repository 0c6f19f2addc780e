"""Tests for `pathlens.results.io`: Scores save/load round trips, the files on disk, and the atomic writer
(a failed write leaves the old file and no temporary file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.results import FORMAT_VERSION, Scores
from pathlens.results.io import write_bytes, write_safetensors, write_text
from tests.helpers import SCORES_2X3, make_scores


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
    s = make_scores(SCORES_2X3, meta={"task": "ioi"}, pos_labels=None)
    s.save(tmp_path / "sub" / "res")
    header = json.loads((tmp_path / "sub" / "res.json").read_text())
    assert header["format_version"] == FORMAT_VERSION
    assert header["dims"] == ["layer", "head"] and header["meta"] == {"task": "ioi"}
    with safe_open(tmp_path / "sub" / "res.safetensors", framework="pt") as f:
        assert list(f.keys()) == ["values"]
        assert f.metadata() is None


def test_save_overwrites_and_detects_mismatched_pair(tmp_path: Path) -> None:
    make_scores(SCORES_2X3).save(tmp_path / "a")
    make_scores(torch.tensor(SCORES_2X3) + 1).save(tmp_path / "a")
    assert Scores.load(tmp_path / "a").values[0, 0] == 1.5
    make_scores(SCORES_2X3).save(tmp_path / "b")
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(PathlensError, match="different"):
        Scores.load(tmp_path / "a")
    with pytest.raises(PathlensError, match="does not exist"):
        Scores.load(tmp_path / "missing")


# --- the atomic writer ----------------------------------------------------------------------------------------


def saved_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (temporary ones included) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_graph(meta: dict) -> Graph:
    scores = torch.tensor([[0.5, float("nan")], [2.0, -1.0]])
    return Graph(["input", "L0.H0"], ["L0.H0.q", "logits"], scores, "logit_diff", "eap", meta)


def test_write_replaces_the_file_with_umask_permissions_and_no_temp_left(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    write_bytes(target, b"old")
    assert write_text(target, "new ü") == target
    assert saved_files(tmp_path) == {str(Path("deep") / "file.bin"): "new ü".encode()}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    write_safetensors(tmp_path / "t.safetensors", {"x": torch.arange(3.0)})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["x"], torch.arange(3.0))


def test_a_save_that_cannot_serialize_leaves_the_old_pair(tmp_path: Path) -> None:
    tiny_graph({"heads_per_group": 1}).save(tmp_path / "g")
    before = saved_files(tmp_path)
    with pytest.raises(TypeError, match="not JSON serializable"):
        tiny_graph({"heads_per_group": 1, "bad": object()}).save(tmp_path / "g")
    assert saved_files(tmp_path) == before
    assert Graph.load(tmp_path / "g").meta == {"heads_per_group": 1}


def test_a_write_failing_midway_leaves_old_files_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_scores(SCORES_2X3).save(tmp_path / "s")
    before = saved_files(tmp_path)
    real_fsync = os.fsync
    calls: list[int] = []

    def fsync_failing_on_the_second_file(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        make_scores(torch.tensor(SCORES_2X3) + 1).save(tmp_path / "s")
    assert len(calls) == 2  # the tensor file's temporary copy was written and synced before the JSON one failed
    assert saved_files(tmp_path) == before
