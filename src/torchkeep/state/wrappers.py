"""Tensor subclasses that wrap plain tensors (torchao's quantized weights): saved as their inner tensors.

``0.weight`` held as a torchao ``Int8Tensor`` is stored as ``0.weight.qdata``, ``0.weight.scale`` and
``0.weight.zero_point``; loading into a model that holds the same kind of tensor copies each inner
tensor in place. What the subclass is and how to rebuild it is the model manifest's business.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torchkeep.errors import UnsupportedTensorError


def is_wrapper(tensor: torch.Tensor) -> bool:
    return is_traceable_wrapper_subclass(tensor)


def inner_tensors(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``key.<inner name>`` -> the wrapper's own inner tensor (the same object, so writes reach it)."""
    names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        inner = getattr(tensor, name)
        if not isinstance(inner, torch.Tensor) or is_wrapper(inner):
            raise UnsupportedTensorError(
                key, f"is a {type(tensor).__name__} whose part {name!r} is not a plain tensor; it cannot be stored"
            )
        out[f"{key}.{name}"] = inner
    return out


def flatten_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with every wrapper tensor replaced by its inner tensors, in order."""
    if not any(is_wrapper(t) for t in state.values()):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if is_wrapper(tensor):
            out.update(inner_tensors(key, tensor))
        else:
            out[key] = tensor
    return out


def wrapper_classes(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``key`` -> the wrapper's class name, for every wrapper tensor in ``state``."""
    return {key: type(t).__name__ for key, t in state.items() if is_wrapper(t)}
