"""Model outputs as named flat tensors, compared between eager mode and an exported artifact."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def flatten(value: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Tensors of a (nested) output in the order exporters flatten it, named by their path.

    A lone tensor is ``output``, tuple items ``output_0``..., dict items by key (``a.b`` when nested).
    """
    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if isinstance(value, Mapping):
        pairs = [(f"{prefix}.{key}" if prefix else str(key), item) for key, item in value.items()]
    elif isinstance(value, (tuple, list)):
        pairs = [(f"{prefix}.{i}" if prefix else f"output_{i}", item) for i, item in enumerate(value)]
    elif value is None:
        return []
    else:
        raise TypeError(f"output {prefix or 'output'} is a {type(value).__name__}: exported outputs are tensors")
    return [flat for name, item in pairs for flat in flatten(item, name)]


def default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing an exported output of ``dtype`` with eager mode."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 1e-2
    return 1e-4, 1e-5


@dataclass(frozen=True)
class OutputCheck:
    """One output on one set of inputs: the largest absolute error, and that error relative to the output's scale."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |exported - eager| / max |eager|
    rtol: float
    atol: float
    ok: bool


@dataclass(frozen=True)
class Check:
    """All outputs for one set of inputs (the examples, or fresh random ones at another batch size)."""

    inputs: str
    outputs: tuple[OutputCheck, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


def compare(
    label: str,
    eager: list[tuple[str, torch.Tensor]],
    exported: list[torch.Tensor],
    rtol: float | None,
    atol: float | None,
) -> Check:
    """Compare flat outputs position by position (an artifact may rename them but keeps their order)."""
    if len(eager) != len(exported):
        raise ValueError(f"the artifact returned {len(exported)} outputs, eager mode {len(eager)}")
    checks = []
    for (name, want), got in zip(eager, exported, strict=True):
        got = got.to(want.device)
        default_rtol, default_atol = default_tolerance(want.dtype)
        r = default_rtol if rtol is None else rtol
        a = default_atol if atol is None else atol
        if tuple(got.shape) != tuple(want.shape):
            checks.append(OutputCheck(name, tuple(want.shape), float("inf"), float("inf"), r, a, False))
            continue
        if want.dtype.is_floating_point or want.dtype.is_complex:
            w, g = want.detach().to(torch.float64), got.detach().to(torch.float64)
            diff = (g - w).abs()
            max_abs = float(diff.max()) if diff.numel() else 0.0
            scale = float(w.abs().max()) if w.numel() else 0.0
            max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
            same_nan = torch.equal(w.isnan(), g.isnan())
            within = bool((diff <= a + r * w.abs()).logical_or(w.isnan() & g.isnan()).all())
            checks.append(OutputCheck(name, tuple(want.shape), max_abs, max_rel, r, a, same_nan and within))
        else:
            equal = torch.equal(got.to(want.dtype), want)
            err = 0.0 if equal else float((got.to(torch.float64) - want.to(torch.float64)).abs().max())
            checks.append(OutputCheck(name, tuple(want.shape), err, 0.0 if equal else float("inf"), 0.0, 0.0, equal))
    return Check(label, tuple(checks))
