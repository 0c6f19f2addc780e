"""Subspace patching, distributed alignment search and the interpretability-illusion check (METHODS §2).

`Subspace` (basis, site, positions, provenance; safetensors + JSON) is what every finder returns: `das`
(trained), `mean_difference`, `probe_direction`, `gradient_direction`, `random_direction` (placebo) and
`Subspace.from_direction` (user-given). `illusion_check(model, subspace, task)` decomposes a direction against the
downstream weights that read its site and patches each part (Makelov, Lange, Nanda, arXiv 2311.17030).
"""

from pathlens.subspace.basis import Subspace
from pathlens.subspace.das import das
from pathlens.subspace.finders import gradient_direction, mean_difference, probe_direction, random_direction
from pathlens.subspace.illusion import IllusionReport, Thresholds, decompose, downstream_readers, illusion_check

__all__ = [
    "IllusionReport",
    "Subspace",
    "Thresholds",
    "das",
    "decompose",
    "downstream_readers",
    "gradient_direction",
    "illusion_check",
    "mean_difference",
    "probe_direction",
    "random_direction",
]
