"""Features as sites: a trained dictionary spliced into a model, so every method works on its latents.

    with splice(model, sae):                      # the site it was trained on is in its meta
        pathlens.patch(model, task, sites=["L3.sae.F12", "L3.sae.err", "L2.H1"])
        pathlens.atp(model, task, sites=latent_sites(model, "L3.sae"))

While spliced, the site's value is rebuilt as decode(latents) + error, the error kept as its own site
(`L{l}.{name}.err`), so outputs are unchanged (bit for bit while nothing writes a latent or the error; within
float rounding, ≤ 1e-5, when a write puts the same values back). The core holds the mechanism
(`Model.splice`, `pathlens.hooks.Splice`); this module names the sites a dictionary trained by
`pathlens.features` was trained on, and gives its latents' steering directions.

Attribution sums as the math says: with a decoder that is linear (every dictionary here), AtP of the spliced
site equals AtP summed over the latents plus AtP of the error term — both are g·Δx with Δx split as
W_decᵀΔf + Δerror (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor

from pathlens.errors import PathlensError
from pathlens.features.sae import Dictionary
from pathlens.hooks import Splice
from pathlens.model import Model
from pathlens.sites import Site, parse_site


@contextmanager
def splice(
    model: Model,
    dictionary: Dictionary,
    site: "Site | str | None" = None,
    target: "Site | str | None" = None,
    name: str | None = None,
) -> Iterator[Splice]:
    """`model.splice(dictionary, site, target=..., name=...)` with `site` / `target` defaulting to the sites the
    dictionary was trained on (its config's meta "site" / "target")."""
    meta = dictionary.config.meta
    site = site if site is not None else meta.get("site")
    if site is None:
        raise PathlensError("splice: this dictionary does not record its site; pass site='L6.resid_post' (e.g.).")
    if target is None and dictionary.config.transcoder:
        target = meta.get("target")
        if target is None:
            raise PathlensError("splice: a transcoder needs the site it rebuilds; pass target='L6.mlp_out' (e.g.).")
    with model.splice(dictionary, site, target=target, name=name) as spliced:
        yield spliced


def latent_sites(model: Model, family: "Site | str", indices: Sequence[int] | None = None) -> list[str]:
    """The sites of latents `indices` (default: all) of a spliced family ("L3.sae" → ["L3.sae.F0", ...])."""
    fam = model.resolve(family)
    chosen = next((sp for sp in model.splices if sp.latents == fam.family), None)
    if chosen is None or fam.kind != "latent":
        raise PathlensError(f"latent_sites: {family!r} is not a spliced dictionary's latents (e.g. 'L3.sae').")
    picked = range(chosen.width) if indices is None else indices
    return [str(model.resolve(Site("latent", fam.layer, int(i), fam.path))) for i in picked]


def feature_direction(dictionary: Dictionary, index: int) -> Tensor:
    """Latent `index`'s decoder row in the model's units (d_out,): what one unit of the latent adds to the site;
    steer with `Add(direction, α)` at the site, or `Add(α)` on the latent itself while spliced."""
    if not 0 <= index < dictionary.width:
        raise PathlensError(f"latent {index} is out of range: the dictionary has {dictionary.width} latents.")
    return (dictionary.W_dec[index] / dictionary.s_out).detach()


def family_of(site: "Site | str") -> Site:
    """The latent family of a latent site ("L3.sae.F2" → L3.sae)."""
    return parse_site(site).family
