"""Learned steering: maps and controllers fitted to data, on the steering engine (`pathlens.steering`).

- `TransportSteer` / `AffineMap` (transport.py): per-unit affine maps on sites, applied in order with a strength λ
  that interpolates from the identity; `applied`, `interventions`, `compose`, `active_units`, save/load. Anything
  with `interventions(scale, positions, rows)` and `check(model)` steers `pathlens.generate` per row.
- `linear_act` (linear_act.py): Linear-AcT, closed-form per-unit transport maps (sorted least squares, Gaussian or
  mean-shift), "incr" or "atonce".
- `lineas` (lineas.py): LinEAS, per-site diagonal affine maps trained jointly with a 1-D Wasserstein loss and a
  sparse-group-lasso that selects sites and units.
"""

from pathlens.steering.learned.linear_act import linear_act
from pathlens.steering.learned.lineas import lineas
from pathlens.steering.learned.transport import AffineMap, TransportSteer

__all__ = ["AffineMap", "TransportSteer", "linear_act", "lineas"]
