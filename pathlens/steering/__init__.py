"""Steering: change a behaviour by adding vectors to activations while the model generates, and measure it.

- `SteeringVector` (vector.py): (site, vector) pairs, how they apply, where they came from; save/load, arithmetic,
  `with vec.applied(model):`, `.interventions()`.
- `generate` (generate.py): batched, left-padded, key/value-cached generation with steering per row.
"""

from pathlens.steering.generate import Generation, generate
from pathlens.steering.vector import SteeringVector

__all__ = ["Generation", "SteeringVector", "generate"]
