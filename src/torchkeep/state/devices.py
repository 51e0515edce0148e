"""``map_location`` as torch.load accepts it, plus ``"auto"``, as one function on tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch

from torchkeep.errors import InvalidDeviceError

MapLocation = str | torch.device | Mapping[str, Any] | Callable[..., Any] | None


def auto_device() -> torch.device:
    """The current accelerator if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _backend_count(kind: str) -> int | None:
    """How many devices of an accelerator kind this process can use; None for kinds torch cannot count."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = getattr(torch, kind, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        backend = getattr(torch.backends, kind, None)
        is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        return None
    if not is_available():
        return 0
    count = getattr(backend, "device_count", None)
    return int(count()) if callable(count) else 1


def parse_device(value: Any) -> torch.device:
    """A device that exists here, from a str or torch.device (``"auto"``: the accelerator if any).

    Raises:
        InvalidDeviceError: malformed, or not available on this machine; the message says what to pass instead.
    """
    if isinstance(value, str) and value == "auto":
        return auto_device()
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidDeviceError(value, f"not a device ({exc}); pass map_location='cpu', 'cuda:0' or 'auto'") from exc
    if device.type in ("cpu", "meta"):
        return device
    count = _backend_count(device.type)
    if count == 0:
        raise InvalidDeviceError(
            value,
            f"{device.type} is not available on this machine (torch {torch.__version__}); "
            "load with map_location='cpu', or 'auto' for whatever accelerator is present",
        )
    if count is not None and device.index is not None and device.index >= count:
        raise InvalidDeviceError(
            value, f"this machine has {count} {device.type} device(s), numbered from 0; pick one of them or 'auto'"
        )
    if count is None:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise InvalidDeviceError(value, f"cannot place tensors there: {exc}; use map_location='cpu'") from exc
    return device


def placer(map_location: MapLocation, *, saved_location: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function moving a freshly loaded CPU tensor where ``map_location`` says.

    Mapping and callable forms follow torch.load: a dict remaps location tags (tensors read
    from the safe format are tagged ``"cpu"``); a callable gets ``(storage, location)`` and
    returns a storage or None (keep).
    """
    if map_location is None:
        return lambda t: t
    if isinstance(map_location, (str, torch.device)):
        device = parse_device(map_location)
        if device.type == "cpu":
            return lambda t: t
        return lambda t: t.to(device)
    if isinstance(map_location, Mapping):
        for target in map_location.values():  # parsed now, not on the first tensor
            if isinstance(target, (str, torch.device)):
                parse_device(target)
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
