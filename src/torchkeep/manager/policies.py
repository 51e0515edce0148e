"""Retention and save-decision policies: pure functions of what exists, testable without disk.

Metrics are converted once, when saved, to Python ints and floats (:func:`plain_metrics`).
"Should I save now" (:class:`SaveEvery`) is kept apart from "what do I keep" (:class:`KeepLast`,
:class:`KeepBest`, :class:`KeepEvery`); a manager keeps the union of what its policies keep,
plus the latest and the best checkpoints, always.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = ("min", "max")


@dataclass(frozen=True)
class Candidate:
    """What retention sees of a checkpoint: its step and metrics."""

    step: int
    metrics: Mapping[str, object]


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        """The steps this policy wants kept."""
        ...


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class KeepLast:
    """The ``n`` most recent steps."""

    n: int

    def __post_init__(self) -> None:
        _check_positive("keep_last", self.n)

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        return set(sorted(c.step for c in checkpoints)[-self.n :])


def metric_value(candidate: Candidate, monitor: str) -> float | None:
    """The metric as a float to rank by; None (not ranked) when absent, NaN, a bool or not a real number."""
    value = candidate.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)  # NumPy scalars are numbers.Real too
    return None if math.isnan(number) else number


def plain_metrics(metrics: Mapping[Any, Any]) -> dict[str, int | float]:
    """Metrics as Python ints and floats, converted once (a tensor is copied from its device here)."""
    plain: dict[str, int | float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metric names must be str, got {name!r} ({type(name).__name__})")
        plain[name] = plain_metric(name, value)
    return plain


def plain_metric(name: str, value: Any) -> int | float:
    where = f"metric {name!r}"
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{where}: a tensor of shape {tuple(value.shape)}; pass one number (a 0-dim tensor)")
        if value.device.type == "meta":
            raise ValueError(f"{where}: a tensor on the meta device holds no value")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{where}: a {value.dtype} tensor; metrics are real numbers")
        number = value.detach().item()
        return int(number) if isinstance(number, int) else float(number)
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise ValueError(f"{where}: an array of shape {value.shape}; pass one number (a 0-d array)")
        if value.dtype.kind not in "iuf":
            raise TypeError(f"{where}: an array of dtype {value.dtype.str}; metrics are real numbers")
        value = value[()]
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: a bool cannot be ranked; pass int(value), or keep it in the state")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"{where}: {type(value).__name__} is not a real number; pass a Python number, a 0-dim tensor or a NumPy scalar"
    )


def parse_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return "min" if mode == "min" else "max"


@dataclass(frozen=True)
class KeepBest:
    """The ``n`` best steps by ``monitor``; ties go to the earlier step. Steps without the metric are not ranked."""

    n: int
    monitor: str
    mode: Mode = "min"

    def __post_init__(self) -> None:
        _check_positive("keep_best", self.n)
        parse_mode(self.mode)

    def _scored(self, checkpoints: Sequence[Candidate]) -> list[tuple[float, int]]:
        sign = 1.0 if self.mode == "min" else -1.0
        return [(sign * v, c.step) for c in checkpoints if (v := metric_value(c, self.monitor)) is not None]

    def ranked(self, checkpoints: Sequence[Candidate]) -> list[int]:
        """Steps with the metric, best first."""
        return [step for _, step in sorted(self._scored(checkpoints))]

    def best(self, checkpoints: Sequence[Candidate]) -> int | None:
        """The best step, in one linear pass (None when no step has the metric)."""
        scored = self._scored(checkpoints)
        return min(scored)[1] if scored else None

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        return set(self.ranked(checkpoints)[: self.n])


@dataclass(frozen=True)
class KeepEvery:
    """Every step that is a multiple of ``n``, forever."""

    n: int

    def __post_init__(self) -> None:
        _check_positive("keep_every", self.n)

    def keep(self, checkpoints: Sequence[Candidate]) -> set[int]:
        return {c.step for c in checkpoints if c.step % self.n == 0}


@dataclass(frozen=True)
class SaveEvery:
    """Save at every step that is a multiple of ``n``."""

    n: int

    def __post_init__(self) -> None:
        _check_positive("save_every", self.n)

    def should_save(self, step: int) -> bool:
        return step % self.n == 0


def to_delete(
    checkpoints: Sequence[Candidate], policies: Sequence[RetentionPolicy], *, protected: set[int]
) -> set[int]:
    """Steps no policy keeps and that are not protected (the latest, the best). No policy: keep all."""
    if not policies:
        return set()
    kept = set(protected)
    for policy in policies:
        kept |= policy.keep(checkpoints)
    return {c.step for c in checkpoints} - kept
