"""Ray as an optional dependency: importing it with an install hint, and connecting to a cluster with a clear error
when its address cannot be reached (checked with one TCP connection first, so a wrong address fails in seconds
instead of after Ray's own retries)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from pathlens.errors import PathlensError

INSTALL_HINT = "pip install 'pathlens[ray]'"
CONNECT_TIMEOUT = 5.0
"""Seconds a cluster address gets to accept a TCP connection before it counts as unreachable."""
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""Settings of a local cluster this process starts: its workers run at the driver's priority (Ray's default nice
15 lets every other process on the machine, Ray's own daemons included, run before them, so a sweep spread over
them loses time a local run does not); `init={"_system_config": {...}}` overrides it. A cluster started with
`ray start` keeps its own setting (`RAY_worker_niceness=0 ray start ...` to match)."""


def import_ray() -> ModuleType:
    """The `ray` module, or a PathlensError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise PathlensError(
            f"the Ray executor needs Ray, an optional extra of pathlens: {INSTALL_HINT} (or pip install ray)."
        ) from err
    return ray


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address ("ray://host:port", "host:port"); None for "auto"/"local"."""
    bare = address.removeprefix("ray://")
    if bare in ("auto", "local"):
        return None
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise PathlensError(
            f"address={address!r} is not a Ray cluster address; use 'ray://<head>:10001' (Ray client), "
            "'<head>:6379' (on a cluster node), 'auto', or None to start a local cluster."
        )
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Raise a PathlensError naming `address` unless it accepts a TCP connection within `timeout` seconds."""
    target = host_and_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as err:
        raise PathlensError(
            f"cannot reach the Ray cluster at address={address!r} ({err}). Check that the head node runs "
            "(`ray start --head`) and that its port is open from here, or pass address=None to start a local "
            "cluster on this machine."
        ) from err


def connect(address: str | None, init: Mapping[str, Any], timeout: float = CONNECT_TIMEOUT) -> bool:
    """Connect this process to Ray; returns whether this call started the connection (and so should end it).

    An address is checked to be reachable first. An existing connection (`ray.init(...)` called before) is then
    used as it is; otherwise `address=None` starts a local cluster on this machine (`LOCAL_SYSTEM_CONFIG`)."""
    ray = import_ray()
    if address is not None:
        check_reachable(address, timeout)
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False, **init}
    if address is None:
        options.setdefault("include_dashboard", False)
        options["_system_config"] = {**LOCAL_SYSTEM_CONFIG, **options.get("_system_config", {})}
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        where = "a local Ray cluster" if address is None else f"the Ray cluster at address={address!r}"
        raise PathlensError(f"could not connect to {where}: {err}") from err
    return True
