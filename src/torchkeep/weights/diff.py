"""torchkeep.diff: what changed between two sets of weights, tensor by tensor and module by module.

Safetensors on both sides are mapped (verified, never copied whole) and compared one tensor pair at a
time, so memory beyond the page cache stays at about one pair (in float64) on multi-GB files. Any
format ``torchkeep.load`` reads works on either side; ``module.`` / ``_orig_mod.`` prefixes are ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.state.keys import drop_compile_segments
from torchkeep.weights.load import load

WRAPPER_PREFIX = "module."
TOP_LEVEL = "(top level)"  # the module of a tensor whose name has no module part, e.g. a bare "weight"


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last part."""
    return name.rpartition(".")[0] or TOP_LEVEL


@dataclass(frozen=True)
class TensorDiff:
    """One tensor present on both sides with the same shape and dtype."""

    name: str
    relative: float  # ||a - b|| / ||a|| (inf when a is zero and b is not)
    max_abs: float

    @property
    def identical(self) -> bool:
        return self.max_abs == 0.0


@dataclass(frozen=True)
class DiffReport:
    """Returned by :func:`torchkeep.diff`; ``str(report)`` is a table, ``changed(threshold)`` filters."""

    a: str
    b: str
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, str]] = field(default_factory=list)  # name, a's dtype[shape], b's
    tensors: list[TensorDiff] = field(default_factory=list)

    def changed(self, threshold: float = 0.0) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.identical and t.relative > threshold]

    def same(self, threshold: float = 0.0) -> bool:
        """No key or shape differences, and no tensor whose relative change exceeds ``threshold``."""
        return not (self.only_in_a or self.only_in_b or self.mismatched or self.changed(threshold))

    @property
    def identical(self) -> bool:
        return self.same(0.0) and all(t.identical for t in self.tensors)

    def grouped(self) -> dict[str, list[TensorDiff]]:
        """The compared tensors by module (:func:`module_of`), in the model's order."""
        out: dict[str, list[TensorDiff]] = {}
        for t in self.tensors:
            out.setdefault(module_of(t.name), []).append(t)
        return out

    def by_module(self) -> dict[str, tuple[int, int, float]]:
        """module -> (tensors, changed tensors, largest relative change)."""
        out: dict[str, tuple[int, int, float]] = {}
        for module, tensors in self.grouped().items():
            worst = 0.0
            for t in tensors:
                worst = max(worst, t.relative)
            out[module] = (len(tensors), sum(not t.identical for t in tensors), worst)
        return out

    def to_dict(self, threshold: float = 0.0) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "same_within_threshold": self.same(threshold),
            "threshold": threshold,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "mismatched": [{"name": n, "a": x, "b": y} for n, x, y in self.mismatched],
            "tensors": [{"name": t.name, "relative": t.relative, "max_abs": t.max_abs} for t in self.tensors],
            "modules": {
                m: {"tensors": c, "changed": ch, "max_relative": w} for m, (c, ch, w) in self.by_module().items()
            },
        }

    def render(self, threshold: float = 0.0) -> str:
        lines = [f"{self.a} -> {self.b}: " + ("identical" if self.identical else "different")]
        if self.only_in_a:
            lines.append(f"only in A ({len(self.only_in_a)}): {', '.join(self.only_in_a[:10])}")
        if self.only_in_b:
            lines.append(f"only in B ({len(self.only_in_b)}): {', '.join(self.only_in_b[:10])}")
        for name, x, y in self.mismatched[:20]:
            lines.append(f"shape/dtype  {name}: {x} -> {y}")
        changed = self.changed(threshold)
        lines.append(f"{len(self.tensors)} tensors compared, {len(changed)} changed (relative change > {threshold:g})")
        lines.append(f"{'module':<40} {'tensors':>7} {'changed':>7} {'max ||a-b||/||a||':>18}")
        for module, (count, n_changed, worst) in sorted(self.by_module().items()):
            lines.append(f"{module:<40} {count:>7} {n_changed:>7} {worst:>18.3g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _clean(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = [drop_compile_segments(k) for k in state]
    if keys and all(k.startswith(WRAPPER_PREFIX) for k in keys):
        keys = [k[len(WRAPPER_PREFIX) :] for k in keys]
    return dict(zip(keys, state.values(), strict=True))


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _compare(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    if torch.equal(a, b):
        return TensorDiff(name, 0.0, 0.0)
    x, y = a.detach().to(torch.float64), b.detach().to(torch.float64)
    delta = y - x
    max_abs = float(delta.abs().max()) if delta.numel() else 0.0
    norm = float(torch.linalg.vector_norm(x))
    change = float(torch.linalg.vector_norm(delta))
    relative = change / norm if norm else (0.0 if change == 0 else math.inf)
    return TensorDiff(name, relative, max_abs if not math.isnan(max_abs) else math.inf)


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DiffReport:
    """Compare the weights at ``a`` and ``b`` (any formats torchkeep reads), tensor by tensor.

    ``progress(bytes compared, total bytes)`` is called after each pair of tensors.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: as :func:`torchkeep.load`.
    """

    def read(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
        # safetensors are mapped (verified, not copied): pages are read as each pair is compared
        return load(path, trusted=trusted, storage_options=storage_options)

    return compare_states(read(a), read(b), a=os.fspath(a), b=os.fspath(b), progress=progress)


def compare_states(
    left: Mapping[str, torch.Tensor],
    right: Mapping[str, torch.Tensor],
    *,
    a: str,
    b: str,
    progress: Callable[[int, int], None] | None = None,
) -> DiffReport:
    """Compare two state dicts already in hand (``a`` and ``b`` name them in the report), as :func:`diff` does."""
    left, right = _clean(left), _clean(right)
    report = DiffReport(a, b)
    report.only_in_a.extend(sorted(set(left) - set(right)))
    report.only_in_b.extend(sorted(set(right) - set(left)))
    common = [k for k in left if k in right]
    total = sum(left[k].numel() * left[k].element_size() for k in common)
    done = 0
    for name in common:
        x, y = left[name], right[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            report.mismatched.append((name, _describe(x), _describe(y)))
        else:
            report.tensors.append(_compare(name, x, y))
        done += x.numel() * x.element_size()
        if progress is not None:
            progress(done, total)
    return report
