"""``map_location`` as torch.load accepts it, plus ``"auto"``, as one function on tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

MapLocation = str | torch.device | Mapping[str, Any] | Callable[..., Any] | None


def auto_device() -> torch.device:
    """The current accelerator if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _device(value: Any) -> torch.device:
    if isinstance(value, str) and value == "auto":
        return auto_device()
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid map_location device {value!r}: {exc}") from exc


def placer(map_location: MapLocation, *, saved_location: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function moving a freshly loaded CPU tensor where ``map_location`` says.

    Mapping and callable forms follow torch.load: a dict remaps location tags (tensors read
    from the safe format are tagged ``"cpu"``); a callable gets ``(storage, location)`` and
    returns a storage or None (keep).
    """
    if map_location is None:
        return lambda t: t
    if isinstance(map_location, (str, torch.device)):
        device = _device(map_location)
        if device.type == "cpu":
            return lambda t: t
        return lambda t: t.to(device)
    if isinstance(map_location, Mapping):
        target = map_location.get(saved_location)
        return placer(target, saved_location=saved_location) if target is not None else (lambda t: t)
    if callable(map_location):
        fn = map_location

        def apply(tensor: torch.Tensor) -> torch.Tensor:
            result = fn(tensor.untyped_storage(), saved_location)
            if result is None:
                return tensor
            if isinstance(result, torch.TypedStorage):
                result = cast(Any, result).untyped()
            if not isinstance(result, torch.UntypedStorage):
                raise TypeError(f"map_location callable returned {type(result).__name__}, not a storage or None")
            out = torch.empty(0, dtype=tensor.dtype, device=result.device)
            return out.set_(result, tensor.storage_offset(), tensor.shape, tensor.stride())

        return apply
    raise TypeError(f"map_location must be a str, torch.device, dict or callable, not {type(map_location).__name__}")
