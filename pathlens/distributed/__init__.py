"""Spreading an engine's independent chunks over a Ray cluster, with results bit-identical to a local run.

    from pathlens.distributed import RayExecutor
    scores = pathlens.patch(model, task, sites="heads", executor=RayExecutor(address="ray://head:10001"))

`RayExecutor` (ray_executor.py) schedules the chunks an engine plans on Ray actors; `ChunkWorker` (worker.py) is
the actor, which builds the model once from a `ModelSpec` (spec.py); `connect.py` imports Ray (an optional extra:
`pip install 'pathlens[ray]'`) and checks a cluster address before connecting.
"""

from pathlens.distributed.ray_executor import RayExecutor
from pathlens.distributed.spec import ModelSpec

__all__ = ["ModelSpec", "RayExecutor"]
