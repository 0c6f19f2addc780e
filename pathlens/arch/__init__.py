"""What a model is made of: `ArchMap` (where a family keeps blocks, attention, MLP and norms; module paths only),
the known families (`FAMILIES`, by `config.model_type`), and `arch_for` / `infer_arch`, which find a model's map
by family or by module structure."""

from pathlens.arch.base import ArchMap
from pathlens.arch.families import FAMILIES
from pathlens.arch.generic import arch_for, infer_arch

__all__ = ["FAMILIES", "ArchMap", "arch_for", "infer_arch"]
