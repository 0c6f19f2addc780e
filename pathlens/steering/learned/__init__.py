"""Learned steering: maps and controllers fitted to data, on the steering engine (`pathlens.steering`).

- `TransportSteer` / `AffineMap` (transport.py): per-unit affine maps on sites, applied in order with a strength λ
  that interpolates from the identity; `applied`, `interventions`, `compose`, `active_units`, save/load. Anything
  with `interventions(scale, positions, rows)` and `check(model)` steers `pathlens.generate` per row.
- `linear_act` (linear_act.py): Linear-AcT, closed-form per-unit transport maps (sorted least squares, Gaussian or
  mean-shift), "incr" or "atonce".
- `lineas` (lineas.py): LinEAS, per-site diagonal affine maps trained jointly with a 1-D Wasserstein loss and a
  sparse-group-lasso that selects sites and units.
- `train_controller` / `WeightedSteering` (controller.py): the Guiding Giants controller, per-prompt, per-step gains
  on a direction at every layer; `eigenshift` / `components` / `EigenShift` (eigenshift.py): shrink the unembedding's
  concept-specific singular components. Both are `Steerer`s: pass them as `steer=` to `pathlens.generate`.
"""

from pathlens.steering.learned.controller import WeightedSteering, train_controller
from pathlens.steering.learned.eigenshift import EigenShift, components, eigenshift
from pathlens.steering.learned.linear_act import linear_act
from pathlens.steering.learned.lineas import lineas
from pathlens.steering.learned.transport import AffineMap, TransportSteer

__all__ = ["AffineMap", "TransportSteer", "linear_act", "lineas"]
__all__ += ["EigenShift", "WeightedSteering", "components", "eigenshift", "train_controller"]
