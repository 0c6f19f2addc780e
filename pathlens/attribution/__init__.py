"""Gradient attribution: estimates of patching effects from forwards and backwards, in patching's Scores layout."""

from pathlens.attribution.atp import atp
from pathlens.attribution.relp import relp

__all__ = ["atp", "relp"]
