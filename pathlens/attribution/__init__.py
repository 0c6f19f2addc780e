"""Gradient attribution: estimates of patching effects from forwards and backwards, in patching's Scores layout
(AtP, AtP*, RelP, integrated gradients). Edge scores over the model's graph (EAP, EAP-IG, RelP) build on these
and live with the circuits they serve (`pathlens.circuits.edge_attribution`)."""

from pathlens.attribution.atp import atp
from pathlens.attribution.atp_star import atp_star
from pathlens.attribution.compare import Comparison, compare
from pathlens.attribution.ig import integrated_gradients
from pathlens.attribution.relp import relp

__all__ = ["Comparison", "atp", "atp_star", "compare", "integrated_gradients", "relp"]
