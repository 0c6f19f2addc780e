"""Sites: named activation points of a model, written the way the field reads them.

A `Site` is a value object (kind, layer, index, path). Every site has a string form that parses back to the
same object:

    embed, logits                       token embedding output; unembedding output
    L3.resid_pre  L3.resid_mid  L3.resid_post   residual stream before the block / after attention / after it
    L3.attn_out   L3.mlp_out                      what attention / the MLP adds to the residual stream
    L3.attn_in                                    attention input (after its norm: what q/k/v are projected from)
    L3.mlp_in     L3.mlp_post  L3.N123            MLP input (after its norm); neuron activations; one neuron
    L9.head       L9.H6                           every head's write into the residual stream; one head's
    L9.z          L9.H6.z                         head outputs before the output projection (z)
    L9.q L9.H6.q  L9.k L9.G1.k  L9.v L9.G1.v       queries per query head; keys/values per key-value group
    L9.pattern    L9.H6.pattern                   attention probabilities
    module:transformer.h.3.mlp                    the output of any nn.Module, by its path
    L6.sae        L6.sae.F123   L6.sae.err        a spliced dictionary's latents (named when spliced, here
                                                  "sae"; `Model.splice`); one latent; its reconstruction error

Keys and values are indexed by key-value group `G` (grouped-query attention shares them between query heads);
`Model.kv_group(h)` maps query head h to its group. Shapes (batch b, positions p) are listed by `Model.sites`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pathlens.errors import PathlensError

LAYER_KINDS = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "attn_in",
    "mlp_in",
    "mlp_post",
    "mlp_out",
    "head",
    "head_z",
    "q",
    "k",
    "v",
    "attn_pattern",
)
GLOBAL_KINDS = ("embed", "logits")
#: kinds that exist only while a dictionary is spliced into the model (`Model.splice`); `path` holds its name.
SPLICE_KINDS = ("latent", "latent_err")
KINDS = GLOBAL_KINDS + LAYER_KINDS + ("module",) + SPLICE_KINDS

#: kinds whose `index` selects a query head, a key-value group, or a neuron, and the letter that marks it.
INDEX_LETTER = {
    "head": "H",
    "head_z": "H",
    "q": "H",
    "attn_pattern": "H",
    "k": "G",
    "v": "G",
    "mlp_post": "N",
    "latent": "F",
}
#: the suffix printed after "L{layer}." (or after "L{layer}.H{h}.") for each kind.
SUFFIX = {"head_z": "z", "attn_pattern": "pattern"}
_SUFFIX_TO_KIND = {
    **{k: k for k in LAYER_KINDS},
    "z": "head_z",
    "pattern": "attn_pattern",
    "heads": "head",
}

_LAYER_RE = re.compile(r"^L(\d+)\.(.+)$")
_INDEXED_RE = re.compile(r"^([HGN])(\d+)(?:\.([a-z_]+))?$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLICE_RE = re.compile(r"^([a-z][a-z0-9_]*)(?:\.(?:F(\d+)|(err)))?$")
#: words a spliced dictionary cannot be named: site suffixes and the edge graph's component names.
RESERVED_NAMES = frozenset(_SUFFIX_TO_KIND) | {"mlp", "attn", "resid", "input", "logits", "embed", "module"}


@dataclass(frozen=True, order=True)
class Site:
    """One activation point. `layer` is set for per-layer kinds; `index` selects a head, group, neuron or latent;
    `path` is a module site's module path, or the name a latent site's dictionary was spliced under."""

    kind: str
    layer: int | None = None
    index: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PathlensError(f"unknown site kind {self.kind!r}; valid kinds: {', '.join(KINDS)}.")
        if self.kind == "module":
            if not self.path or self.layer is not None or self.index is not None:
                raise PathlensError("a module site needs only a module path, e.g. module('transformer.h.3.mlp').")
            return
        if self.kind in SPLICE_KINDS:
            if not self.path or not _NAME_RE.match(self.path) or self.path in RESERVED_NAMES:
                raise PathlensError(
                    f"a latent site needs the name its dictionary was spliced under (lowercase letters, digits, _; "
                    f"not a site kind), e.g. 'L6.sae.F12'; got name {self.path!r}."
                )
        elif self.path is not None:
            raise PathlensError(f"only module sites take a path, not {self.kind!r}.")
        if self.kind in GLOBAL_KINDS:
            if self.layer is not None or self.index is not None:
                raise PathlensError(f"site {self.kind!r} has no layer or index.")
            return
        if self.layer is None or self.layer < 0:
            raise PathlensError(f"site kind {self.kind!r} needs a layer >= 0, e.g. 'L3.{_suffix(self.kind)}'.")
        if self.index is not None and (self.kind not in INDEX_LETTER or self.index < 0):
            raise PathlensError(
                f"site kind {self.kind!r} takes no index >= 0 here; indexed kinds: {', '.join(INDEX_LETTER)}."
            )

    def __str__(self) -> str:
        if self.kind == "module":
            return f"module:{self.path}"
        if self.kind in GLOBAL_KINDS:
            return self.kind
        if self.kind == "latent_err":
            return f"L{self.layer}.{self.path}.err"
        if self.kind == "latent":
            return f"L{self.layer}.{self.path}" + ("" if self.index is None else f".F{self.index}")
        if self.index is None:
            return f"L{self.layer}.{_suffix(self.kind)}"
        prefix = f"L{self.layer}.{INDEX_LETTER[self.kind]}{self.index}"
        if self.kind in ("head", "mlp_post"):
            return prefix
        return f"{prefix}.{_suffix(self.kind)}"

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    @property
    def family(self) -> "Site":
        """The same site without its index: e.g. L9.H6 -> L9.head (the tensor the index selects from)."""
        return Site(self.kind, self.layer, None, self.path)


def _suffix(kind: str) -> str:
    return SUFFIX.get(kind, kind)


def parse_site(text: "str | Site") -> Site:
    """Parse a site string ("L9.H6", "L5.mlp_out", "module:a.b") into a Site; Sites pass through unchanged."""
    if isinstance(text, Site):
        return text
    if not isinstance(text, str):
        raise PathlensError(f"a site is a Site or a string like 'L9.H6', got {type(text).__name__}.")
    s = text.strip()
    if s.startswith("module:"):
        return Site("module", path=s[len("module:") :])
    if s in GLOBAL_KINDS:
        return Site(s)
    m = _LAYER_RE.match(s)
    if not m:
        raise PathlensError(_garbage(text))
    layer, rest = int(m.group(1)), m.group(2)
    if rest in _SUFFIX_TO_KIND:
        return Site(_SUFFIX_TO_KIND[rest], layer)
    im = _INDEXED_RE.match(rest)
    if not im:
        sm = _SPLICE_RE.match(rest)
        if not sm or sm.group(1) in RESERVED_NAMES:
            raise PathlensError(_garbage(text))
        name, latent, err = sm.group(1), sm.group(2), sm.group(3)
        if err:
            return Site("latent_err", layer, path=name)
        return Site("latent", layer, None if latent is None else int(latent), path=name)
    letter, index, suffix = im.group(1), int(im.group(2)), im.group(3)
    if suffix is None:
        kind = {"H": "head", "N": "mlp_post"}.get(letter)
        if kind is None:
            raise PathlensError(f"site {text!r}: a key-value group needs .k or .v, e.g. 'L{layer}.G{index}.k'.")
        return Site(kind, layer, index)
    kind = _SUFFIX_TO_KIND.get(suffix)
    if kind is None or INDEX_LETTER.get(kind) != letter:
        if kind in ("k", "v") and letter == "H":
            raise PathlensError(
                f"site {text!r}: keys and values are indexed by key-value group — write "
                f"'L{layer}.G{{g}}.{kind}' with g = model.kv_group({index})."
            )
        raise PathlensError(_garbage(text))
    return Site(kind, layer, index)


def _garbage(text: object) -> str:
    return (
        f"cannot parse site {text!r}. Write e.g. 'embed', 'logits', 'L3.resid_pre', 'L5.mlp_out', 'L9.H6', "
        "'L9.H6.z', 'L9.H6.q', 'L9.G0.k', 'L9.H6.pattern', 'L5.N123', 'module:transformer.h.3.mlp' or, with a "
        "dictionary spliced as 'sae', 'L6.sae' / 'L6.sae.F12' / 'L6.sae.err'."
    )


#: kinds of the components of a model's edge graph (`pathlens.graph.Graph`), named by `parse_node`.
NODE_KINDS = ("input", "head", "mlp", "q", "k", "v", "logits")


@dataclass(frozen=True)
class Node:
    """A component of the model's edge graph, by the name `pathlens.graph.Graph` gives it:

        input  logits         the residual stream entering layer 0; the final residual stream
        L3.H2                 head 2 of layer 3 (a sender: its write into the residual stream)
        L3.mlp                layer 3's MLP (a sender: its output; a receiver: its input)
        L4.H1.q               the query input of head 1 of layer 4
        L4.G0.k  L4.G0.v      the key / value input of key-value group 0 (L4.H1.k when each head has its own)

    `index` is the head, or the key-value group when `grouped`.
    """

    kind: str
    layer: int | None = None
    index: int | None = None
    grouped: bool = False

    def __str__(self) -> str:
        if self.kind in ("input", "logits"):
            return self.kind
        if self.kind == "mlp":
            return f"L{self.layer}.mlp"
        head = f"L{self.layer}.{'G' if self.grouped else 'H'}{self.index}"
        return head if self.kind == "head" else f"{head}.{self.kind}"


def parse_node(name: str) -> Node | None:
    """The `Node` an edge-graph component name denotes, read with the site grammar's layer and index forms; None
    for a name outside that grammar (a Graph built by hand may name its components freely)."""
    if name in ("input", "logits"):
        return Node(name)
    m = _LAYER_RE.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if rest == "mlp":
        return Node("mlp", layer)
    im = _INDEXED_RE.match(rest)
    if not im:
        return None
    letter, index, suffix = im.group(1), int(im.group(2)), im.group(3)
    if letter == "H" and suffix in (None, "q", "k", "v"):
        return Node(suffix or "head", layer, index)
    if letter == "G" and suffix in ("k", "v"):
        return Node(suffix, layer, index, grouped=True)
    return None
