"""Gradient attribution: estimates of patching effects from forwards and backwards, in patching's Scores layout
(AtP, AtP*, RelP), and edge scores over the model's graph (EAP, EAP-IG, RelP) as a `Graph`."""

from pathlens.attribution.atp import atp
from pathlens.attribution.atp_star import atp_star
from pathlens.attribution.compare import Comparison, compare
from pathlens.attribution.edges import edge_attribution
from pathlens.attribution.ig import integrated_gradients
from pathlens.attribution.relp import relp

__all__ = ["Comparison", "atp", "atp_star", "compare", "edge_attribution", "integrated_gradients", "relp"]
