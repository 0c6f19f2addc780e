"""Site strings: every site's string form parses back to the same object, the field's short forms parse to the
sites they name, and a string that is not a site gets an error that says so."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pathlens import PathlensError, Site, parse_site
from pathlens.sites import INDEX_LETTER, LAYER_KINDS, Node, parse_node


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


@pytest.mark.parametrize(
    ("name", "node"),
    [
        ("input", Node("input")),
        ("logits", Node("logits")),
        ("L3.H2", Node("head", 3, 2)),
        ("L3.mlp", Node("mlp", 3)),
        ("L4.H1.q", Node("q", 4, 1)),
        ("L4.H1.k", Node("k", 4, 1)),
        ("L4.G0.k", Node("k", 4, 0, grouped=True)),
        ("L4.G2.v", Node("v", 4, 2, grouped=True)),
    ],
)
def test_graph_node_names_parse_and_print_back(name: str, node: Node) -> None:
    assert parse_node(name) == node
    assert str(node) == name


@pytest.mark.parametrize("name", ["a", "L0.s", "L3.foo", "L4.G0.q", "L4.G0", "L3.N5", "L3.H2.z", "resid"])
def test_names_outside_the_node_grammar_parse_to_none(name: str) -> None:
    assert parse_node(name) is None
