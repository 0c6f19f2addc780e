"""Memory budgets: byte sizes as users write them ("2GB"), and the peak of tensor memory a call allocates.

Engines take `max_memory=` (bytes per device, an int or a string such as "512MB", "2GB", "1.5GiB") and size their
chunks from their own per-token cost (see `patching.budget`); `TensorPeak` measures what a call really
allocates, to check those estimates: it watches every tensor operation (a torch dispatch mode) and adds up the
bytes of the storages created inside the block that are alive at the same time, so its peak is the largest
amount of tensor memory the call held at once, on any device, weights and tensors made before the block not
counted. It sees tensors only (not the allocator's caching or Python objects), exactly what a budget bounds.
"""

from __future__ import annotations

import re
import weakref
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pathlens.errors import PathlensError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object, name: str = "max_memory") -> int:
    """A byte count from an int or a string with a unit ("2GB" = 2·10⁹, "512MiB" = 512·2²⁰); PathlensError naming
    `name` otherwise."""
    if isinstance(value, bool):
        raise PathlensError(f"{name}={value!r} is not a size; pass bytes (an int) or a string such as '2GB'.")
    if isinstance(value, int):
        if value < 1:
            raise PathlensError(f"{name}={value} must be a positive number of bytes.")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
            if size >= 1:
                return size
    raise PathlensError(
        f"{name}={value!r} is not a size; pass bytes (an int) or a string such as '512MB', '2GB' or '1.5GiB'."
    )


def megabytes(size: int) -> float:
    """Bytes as MB (10⁶), rounded to 0.1."""
    return round(size / 1e6, 1)


class TensorPeak(TorchDispatchMode):
    """`with TensorPeak() as peak: ...` then `peak.peak`: the most bytes of tensor storage created inside the
    block and alive at one time (`peak.current`: alive now)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in given or pointer in self._live or storage.nbytes() == 0:
                continue
            self._live[pointer] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, pointer)
        return out

    def _release(self, pointer: int) -> None:
        self.current -= self._live.pop(pointer, 0)

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, trace: TracebackType | None
    ) -> None:
        super().__exit__(kind, err, trace)
