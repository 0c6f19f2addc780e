"""Circuits: graph algorithms over scored edges between model components (heads, neurons, sites)."""

from pathlens.circuits.paths import Path, top_paths

__all__ = ["Path", "top_paths"]
