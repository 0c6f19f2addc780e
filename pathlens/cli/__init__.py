"""The `pathlens` command line. `app.py` holds the command group and what commands share; every other module
of this package registers its commands on that group and is imported here, so a capability adds its commands
in its own module without touching the others."""

import importlib
import pkgutil

from pathlens.cli.app import app, main

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "app":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["app", "main"]
