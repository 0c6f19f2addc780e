"""How a module call carries its hidden states, for hooks that read or replace them.

Hugging Face modules return either a tensor or a tuple/list whose first element is the hidden states, and
take their hidden-states input either positionally or as `hidden_states=`. Every hook in pathlens reads and
writes through these four functions, so that one convention is handled in one place.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def first_output(output: Any) -> Tensor:
    """The hidden states of a module's output: the output itself, or its first element if a tuple/list."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_first_output(output: Any, new: Tensor) -> Any:
    """`output` with its hidden states replaced by `new` (same container type)."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


def hidden_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The hidden-states input of a module call (a pre-hook's args, kwargs): positional or `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A pre-hook's (args, kwargs) with the hidden-states input replaced by `new`."""
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}
