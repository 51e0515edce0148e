from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes."""
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype, key
        assert x.shape == y.shape, key
        assert bytes_of(x) == bytes_of(y), key


def bytes_of(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    if t.numel() == 0:
        return b""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8).numpy().tobytes()
