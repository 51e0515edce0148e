"""Capturing and restoring every random number generator a training run draws from."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from torchkeep._warn import warn
from torchkeep.errors import CorruptCheckpointError


def capture_rng() -> dict[str, Any]:
    """Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA one."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def check_rng(state: Any, *, source: str = "checkpoint") -> None:
    """Check a saved RNG state on scratch generators, so that restoring it cannot fail halfway.

    Raises:
        CorruptCheckpointError: a generator state that its generator would not take back.
    """
    if not isinstance(state, dict):
        raise CorruptCheckpointError(source, f"RNG state is a {type(state).__name__}, not a dict")
    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.Random().setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            np.random.RandomState().set_state(tuple(state["numpy"]))
        if "torch" in state:
            if not isinstance(state["torch"], torch.Tensor):
                raise TypeError("the torch generator state is not a tensor")
            torch.Generator().set_state(state["torch"].cpu())
        cuda = state.get("cuda") or []
        if not isinstance(cuda, list) or not all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda
        ):
            raise TypeError("the CUDA generator states are not a list of byte tensors")
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
        raise CorruptCheckpointError(source, f"RNG state is malformed: {type(exc).__name__}: {exc}") from exc


def restore_rng(state: dict[str, Any], *, source: str = "checkpoint") -> None:
    """Put back what :func:`capture_rng` took; warn, naming it, for anything that cannot be."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    saved = state.get("cuda") or []
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved and available != len(saved):
        warn(
            f"{source}: saved the RNG state of {len(saved)} CUDA device(s) but {available} are available; "
            f"restored {min(len(saved), available)}, so GPU randomness will not repeat exactly"
        )
    for index in range(min(len(saved), available)):
        torch.cuda.set_rng_state(saved[index].cpu(), index)
