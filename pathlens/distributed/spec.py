"""`ModelSpec`: how a worker process builds its own copy of a model, so weights never travel between processes.

A spec is either `pathlens.load`'s arguments (an embedded name, a local folder or a hub name, with dtype, device
and the transformers loading arguments: what `pathlens.load` records in `Model.source`), or a builder function
with its keyword arguments (a tiny or random-weight model; pickled by reference when its module is importable on
the workers). Either way the spec is a few names and numbers: each worker loads or builds the weights itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from pathlens.errors import PathlensError
from pathlens.loading import load
from pathlens.model import Model

Builder = Callable[..., "Model | nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """`source`: a name or folder for `pathlens.load`, or a builder function returning a `Model` or an `nn.Module`;
    `kwargs`: the keyword arguments of that call."""

    source: str | Builder
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Model) -> ModelSpec:
        """The spec of a model `pathlens.load` returned (from `model.source`)."""
        if model.source is None:
            raise PathlensError(
                f"model {model.name!r} was wrapped from an in-memory module, so workers cannot load it again; pass "
                "RayExecutor(model=...) with the name or folder it came from (model.hf.save_pretrained(folder) "
                "writes one) or a builder function, e.g. RayExecutor(model=ModelSpec(build_fn, {'seed': 0}))."
            )
        kwargs = dict(model.source)
        return cls(kwargs.pop("name_or_path"), kwargs)

    @classmethod
    def coerce(cls, spec: "ModelSpec | str | Builder") -> ModelSpec:
        """A spec from a spec, a load name / folder, or a builder function."""
        if isinstance(spec, ModelSpec):
            return spec
        if isinstance(spec, str) or callable(spec):
            return cls(spec)
        raise PathlensError(
            f"model={spec!r}: pass a ModelSpec, a model name or folder for pathlens.load, or a builder function."
        )

    def build(self) -> Model:
        """Load or build the model (in the worker)."""
        if isinstance(self.source, str):
            return load(self.source, **dict(self.kwargs))
        built = self.source(**dict(self.kwargs))
        if isinstance(built, Model):
            return built
        if isinstance(built, nn.Module):
            return Model(built)
        raise PathlensError(f"the model builder {self.describe()} returned {type(built).__name__}, not a model.")

    def describe(self) -> str:
        """The spec as a short text for messages."""
        name = self.source if isinstance(self.source, str) else getattr(self.source, "__qualname__", repr(self.source))
        shown = {k: v for k, v in self.kwargs.items() if v is not None}
        return f"{name}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"
