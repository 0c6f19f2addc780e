"""Splitting a model over devices with accelerate: `pathlens.load(..., device_map=..., max_memory=...)`.

A device map names, for module paths of the model, the device each runs on ("cpu", "cuda:1", a GPU index) or
"disk" (weights kept in files of `offload_folder` and loaded for each forward); "auto" lets accelerate fill the
devices in order up to `max_memory` ({"cuda:0": "10GB", "cpu": "30GB"}), never splitting a block. The model
keeps accelerate's hooks, which move each module's inputs to its device; pathlens reads and writes sites through
its own hooks on top of them and moves what it computes to where the reading module lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pathlens.arch.base import get_blocks
from pathlens.arch.generic import arch_for
from pathlens.errors import PathlensError

DeviceMap = str | Mapping[str, Any]


def check_sharding(
    device_map: DeviceMap | None, max_memory: Mapping[Any, Any] | None, offload_folder: Any, device: Any
) -> None:
    """Raise a PathlensError naming the argument when the sharding arguments cannot go together."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise PathlensError("load: max_memory= and offload_folder= split a model over devices; add device_map=.")
        return
    if device is not None:
        raise PathlensError(
            "load: pass device= (the whole model on one device) or device_map= (split over devices), not both."
        )
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise PathlensError(
            f"device_map={device_map!r}: use 'auto' (with max_memory=) or a dict of module path -> device."
        )
    if isinstance(device_map, Mapping) and "disk" in device_map.values() and offload_folder is None:
        raise PathlensError("device_map puts modules on 'disk': pass offload_folder= (where their weights go).")


def dispatch(
    hf_model: nn.Module,
    device_map: DeviceMap,
    max_memory: Mapping[Any, Any] | None = None,
    offload_folder: Any = None,
) -> nn.Module:
    """`hf_model` (loaded whole) split over devices by `device_map` with accelerate's hooks; "auto" (or another
    accelerate strategy name) is inferred under `max_memory`, keeping each block on one device."""
    from accelerate import dispatch_model, infer_auto_device_map  # type: ignore[import-untyped]

    placement: dict[str, Any]
    if isinstance(device_map, str):
        block = type(get_blocks(hf_model, arch_for(hf_model).blocks)[0]).__name__
        placement = infer_auto_device_map(
            hf_model, max_memory=dict(max_memory) if max_memory else None, no_split_module_classes=[block]
        )
        if "disk" in placement.values() and offload_folder is None:
            raise PathlensError(
                f"max_memory={dict(max_memory or {})!r} leaves some blocks for 'disk': pass offload_folder=."
            )
    else:
        placement = dict(device_map)
    return dispatch_model(hf_model, device_map=placement, offload_dir=offload_folder)
