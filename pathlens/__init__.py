"""pathlens: find, verify and steer the pathways inside neural networks.

The nouns: `Model` (an unmodified model plus its sites), `Site` (a named activation point), `Intervention`
(one way to change a site during a run), `Task` (the behaviour to explain), `Scores` (the one result type).
"""

from pathlens.arch.base import ArchMap
from pathlens.attribution import atp, atp_star, compare, edge_attribution, relp
from pathlens.errors import PathlensError
from pathlens.graph import Graph
from pathlens.interventions import Ablate, Add, Intervention, Project, Replace, Scale
from pathlens.loading import EMBEDDED, load
from pathlens.model import Cache, Model, Run
from pathlens.patching import patch
from pathlens.sites import Site, parse_site

__all__ = [
    "Ablate",
    "Add",
    "ArchMap",
    "Cache",
    "EMBEDDED",
    "Graph",
    "Intervention",
    "Model",
    "PathlensError",
    "Project",
    "Replace",
    "Run",
    "Scale",
    "atp",
    "atp_star",
    "compare",
    "edge_attribution",
    "relp",
    "Site",
    "load",
    "parse_site",
    "patch",
]
