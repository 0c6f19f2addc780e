"""The model is left exactly as it was after every call (also one that raised or was interrupted), the site
parser round-trips, and bad input gets an error that says what was wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pathlens
from pathlens import Intervention, Model, PathlensError, Replace, Scale, Site, parse_site
from pathlens.interventions import Op, Selection
from pathlens.sites import INDEX_LETTER, LAYER_KINDS
from tests.conftest import tiny_model, token_batch


def snapshot(model: Model) -> dict[str, object]:
    return {
        "params": {n: p.detach().clone() for n, p in model.hf.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.hf.named_buffers()},
        "attn": model.hf.config._attn_implementation,
        "training": model.hf.training,
    }


def assert_untouched(model: Model, before: dict[str, object]) -> None:
    for name, module in model.hf.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name}"
        assert not module._backward_hooks, f"backward hook left on {name}"
    params = dict(model.hf.named_parameters())
    for name, value in before["params"].items():  # type: ignore[union-attr]
        assert torch.equal(params[name], value), f"parameter {name} changed"
    buffers = dict(model.hf.named_buffers())
    for name, value in before["buffers"].items():  # type: ignore[union-attr]
        assert torch.equal(buffers[name], value), f"buffer {name} changed"
    assert model.hf.config._attn_implementation == before["attn"]
    assert model.hf.training == before["training"]


class Boom(Op):
    """An op that raises mid-forward (after some hooks already ran)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def apply(self, x: torch.Tensor, full: torch.Tensor, sel: Selection) -> torch.Tensor:
        raise self.exc


ALL_READS = [
    "embed",
    "L0.resid_pre",
    "L0.q",
    "L0.k",
    "L0.pattern",
    "L0.head",
    "L0.z",
    "L1.attn_out",
    "L1.resid_post",
    "logits",
]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_model_untouched_after_a_call_that_raises(family: str, exc: BaseException) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(type(exc)):
        model.run(token_batch(), cache=ALL_READS, interventions=[Intervention("L1.H0", Boom(exc))])
    assert_untouched(model, before)
    attn_write = "L0.pattern" if model.arch.qkv == "interface" else "L0.q"
    with pytest.raises(type(exc)):
        model.run(token_batch(), cache=ALL_READS, interventions=[Intervention(attn_write, Boom(exc))])
    assert_untouched(model, before)


def test_model_untouched_after_successful_calls(family: str) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    run = model.run(token_batch(), cache=ALL_READS, grad=True)
    run.logits[:, -1].sum().backward()
    model.run(token_batch(), interventions=[Intervention("L0.H1", Scale(2.0)), Intervention("L1.q", Scale(0.5))])
    model.hf.zero_grad(set_to_none=True)
    assert_untouched(model, before)


def test_model_untouched_after_bad_input() -> None:
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(PathlensError):
        model.run(
            token_batch(), cache=["L0.q"], interventions=[Intervention("L0.resid_pre", Scale(0.0), positions=[99])]
        )
    assert_untouched(model, before)


# ---- site strings ----------------------------------------------------------------------------------


def site_strategy() -> st.SearchStrategy[Site]:
    layered = st.builds(
        lambda kind, layer, idx: Site(kind, layer, idx if kind in INDEX_LETTER else None),
        st.sampled_from(LAYER_KINDS),
        st.integers(0, 999),
        st.one_of(st.none(), st.integers(0, 99999)),
    )
    paths = st.from_regex(r"[a-z_]{1,8}(\.[a-z0-9_]{1,8}){0,4}", fullmatch=True)
    return st.one_of(
        layered, st.sampled_from([Site("embed"), Site("logits")]), paths.map(lambda p: Site("module", path=p))
    )


@given(site_strategy())
def test_site_string_round_trips(site: Site) -> None:
    assert parse_site(str(site)) == site
    assert str(parse_site(str(site))) == str(site)


@pytest.mark.parametrize(
    "text,kind,layer,index",
    [
        ("L9.H6", "head", 9, 6),
        ("L5.mlp_out", "mlp_out", 5, None),
        ("L3.resid_pre", "resid_pre", 3, None),
        ("L9.H6.z", "head_z", 9, 6),
        ("L9.G1.k", "k", 9, 1),
        ("L2.N17", "mlp_post", 2, 17),
        ("L4.pattern", "attn_pattern", 4, None),
        ("L4.attn_pattern", "attn_pattern", 4, None),
    ],
)
def test_site_strings_parse(text: str, kind: str, layer: int, index: int | None) -> None:
    assert parse_site(text) == Site(kind, layer, index)


@given(st.text(max_size=20))
def test_garbage_site_strings_are_rejected_clearly(text: str) -> None:
    try:
        site = parse_site(text)
    except PathlensError as err:
        assert "site" in str(err)
        return
    assert parse_site(str(site)) == site


def test_key_sites_name_the_group_fix() -> None:
    with pytest.raises(PathlensError, match="key-value group"):
        parse_site("L3.H2.k")


# ---- bad inputs ------------------------------------------------------------------------------------


def test_unknown_model_name() -> None:
    with pytest.raises(PathlensError, match="embedded model"):
        pathlens.load("no-such-model-anywhere")


def test_layer_and_head_out_of_range() -> None:
    model = tiny_model("llama")
    with pytest.raises(PathlensError, match="layer of site L7.resid_pre is 7, out of range.*0..1"):
        model.run(token_batch(), cache=["L7.resid_pre"])
    with pytest.raises(PathlensError, match="head of site L0.H4 is 4.*0..3"):
        model.run(token_batch(), cache=["L0.H4"])
    with pytest.raises(PathlensError, match="key-value group.*0..1"):
        model.run(token_batch(), cache=["L0.G2.k"])


def test_positions_and_rows_out_of_range() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match=r"positions .* \[9\] out of range for size 9"):
        model.run(token_batch(), interventions=[Intervention("L0.H0", Scale(0.0), positions=[9])])
    with pytest.raises(PathlensError, match=r"rows .* \[5\] out of range for size 3"):
        model.run(token_batch(), interventions=[Intervention("L0.H0", Scale(0.0), rows=[5])])


def test_source_shape_mismatch_is_explained() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match="batch axis has size 2"):
        model.run(token_batch(), interventions=[Intervention("L0.resid_pre", Replace(torch.zeros(2, 9, 32)))])


def test_empty_batch() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(PathlensError, match="empty batch"):
        model.run(torch.zeros((0, 5), dtype=torch.long))


def test_sites_missing_from_an_architecture() -> None:
    with pytest.raises(PathlensError, match="no resid_mid"):
        tiny_model("neox_parallel").run(token_batch(), cache=["L0.resid_mid"])
    with pytest.raises(PathlensError, match="has no MLP"):
        tiny_model("attn_only").run(token_batch(), cache=["L0.mlp_out"])
    with pytest.raises(PathlensError, match="read but not written"):
        tiny_model("gpt_neo").run(token_batch(), interventions=[Intervention("L0.pattern", Scale(1.0))])


def test_unknown_module_path() -> None:
    with pytest.raises(PathlensError, match="does not exist"):
        tiny_model("gpt2").run(token_batch(), cache=["module:transformer.h.9"])


def test_unknown_architecture_explains_how_to_pass_a_map() -> None:
    class NotATransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

    with pytest.raises(PathlensError, match="ArchMap"):
        Model(NotATransformer())
