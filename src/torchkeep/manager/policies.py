"""Retention and save-decision policies: pure functions of what exists, testable without disk.

"Should I save now" (:class:`SaveEvery`) is kept apart from "what do I keep" (:class:`KeepLast`,
:class:`KeepBest`, :class:`KeepEvery`); a manager keeps the union of what its policies keep,
plus the latest and the best checkpoints, always.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = ("min", "max")


@dataclass(frozen=True)
class Candidate:
    """What retention sees of a checkpoint: its step and metrics."""

    step: int
    metrics: Mapping[str, float]


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
    value = candidate.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


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

    def ranked(self, checkpoints: Sequence[Candidate]) -> list[int]:
        scored = [(v, c.step) for c in checkpoints if (v := metric_value(c, self.monitor)) is not None]
        sign = 1.0 if self.mode == "min" else -1.0
        return [step for _, step in sorted(scored, key=lambda vs: (sign * vs[0], vs[1]))]

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
