"""Steering: change a behaviour by adding vectors to activations while the model generates, and measure it.

- `SteeringVector` (vector.py): (site, vector) pairs, how they apply, where they came from; save/load, arithmetic,
  `with vec.applied(model):`, `.interventions()`.
- `generate` (generate.py): batched, left-padded, key/value-cached generation with steering per row.
- finders (finders.py): `mean_difference` (ActAdd/CAA, `ab_prompts`), `pca_direction` (RepE), `probe_direction`,
  `select_layer`, from contrast data at any site and read position.
- directional ablation (ablation.py): `ablation_interventions` (run time) and `orthogonalized` (a weight copy).
"""

from pathlens.steering.ablation import ablation_interventions, orthogonalized
from pathlens.steering.finders import (
    ab_prompts,
    find,
    layer_sites,
    mean_difference,
    pca_direction,
    probe_direction,
    read_activations,
    select_layer,
)
from pathlens.steering.generate import Generation, generate
from pathlens.steering.vector import SteeringVector

__all__ = [
    "Generation",
    "SteeringVector",
    "ab_prompts",
    "ablation_interventions",
    "find",
    "generate",
    "layer_sites",
    "mean_difference",
    "orthogonalized",
    "pca_direction",
    "probe_direction",
    "read_activations",
    "select_layer",
]
