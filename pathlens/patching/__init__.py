"""Activation patching and ablation sweeps (`patch`), planned per site family and run in the causal cone."""

from pathlens.patching.sweep import patch

__all__ = ["patch"]
