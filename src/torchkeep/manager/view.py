"""What every manager answers from its view of a run, wherever the run is kept (a folder, a URL).

The view (step -> :class:`CheckpointInfo`) is rebuilt from storage at start-up and by ``refresh()``;
the queries and the retention and save policies work on it alone.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchkeep.distributed.group import Group, no_message
from torchkeep.errors import CheckpointNotFoundError
from torchkeep.manager.policies import (
    Candidate,
    KeepBest,
    KeepEvery,
    KeepLast,
    RetentionPolicy,
    SaveEvery,
    parse_mode,
)


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a manager; ``metrics`` hold plain Python ints and floats."""

    step: int
    path: Path | str  # a folder, or a URL for a run on object storage
    metrics: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    size: int = 0
    is_best: bool = False
    is_latest: bool = False


class RunView:
    """The queries of a manager, on ``self._checkpoints`` (guarded by ``self._mutex``)."""

    _checkpoints: dict[int, CheckpointInfo]
    _mutex: threading.RLock
    directory: Any  # a Path, or a URL

    def _set_policies(
        self,
        keep_last: int | None,
        keep_best: int | None,
        monitor: str | None,
        mode: str,
        keep_every: int | None,
        save_every: int | None,
        policies: Sequence[RetentionPolicy],
        template: str,
    ) -> None:
        self.mode = parse_mode(mode)
        self.monitor = monitor
        if keep_best is not None and monitor is None:
            raise ValueError("keep_best needs monitor=, the metric to rank checkpoints by")
        self.policies: list[RetentionPolicy] = list(policies)
        if keep_last is not None:
            self.policies.append(KeepLast(keep_last))
        if keep_best is not None and monitor is not None:
            self.policies.append(KeepBest(keep_best, monitor, self.mode))
        if keep_every is not None:
            self.policies.append(KeepEvery(keep_every))
        self.save_policy = SaveEvery(save_every) if save_every is not None else None
        self.template = template
        self._name_pattern = template_pattern(template)

    # -- queries -----------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        return [Candidate(i.step, i.metrics) for i in self._checkpoints.values()]

    def _best_step(self) -> int | None:
        if self.monitor is None:
            return None
        return KeepBest(1, self.monitor, self.mode).best(self._candidates())

    def _decorated(self, info: CheckpointInfo, best: int | None, latest: int | None) -> CheckpointInfo:
        return CheckpointInfo(
            step=info.step,
            path=info.path,
            metrics=info.metrics,
            time=info.time,
            size=info.size,
            is_best=info.step == best,
            is_latest=info.step == latest,
        )

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint, oldest first (linear in their number: best and latest are found once)."""
        with self._mutex:
            best, latest = self._best_step(), max(self._checkpoints, default=None)
            return [self._decorated(self._checkpoints[s], best, latest) for s in sorted(self._checkpoints)]

    def latest(self) -> CheckpointInfo | None:
        with self._mutex:
            if not self._checkpoints:
                return None
            latest = max(self._checkpoints)
            return self._decorated(self._checkpoints[latest], self._best_step(), latest)

    def best(self) -> CheckpointInfo | None:
        """The checkpoint with the best ``monitor`` value (ties: the earlier step); NaN is never best."""
        with self._mutex:
            best = self._best_step()
            if best is None:
                return None
            return self._decorated(self._checkpoints[best], best, max(self._checkpoints))

    def should_save(self, step: int) -> bool:
        """True at multiples of ``save_every`` (always, without it), if ``step`` is after the newest saved."""
        with self._mutex:
            if self._checkpoints and step <= max(self._checkpoints):
                return False  # save() would refuse it
            return self.save_policy.should_save(step) if self.save_policy else True

    def _restore_order(self, step: int | str) -> Sequence[int]:
        """The steps ``restore(step)`` tries, in order ("latest" and "best" fall back to the next)."""
        if step == "latest":
            return sorted(self._checkpoints, reverse=True)
        if step == "best":
            if self.monitor is None:
                raise ValueError("restore('best') needs a manager created with monitor=")
            return KeepBest(len(self._checkpoints) or 1, self.monitor, self.mode).ranked(self._candidates())
        if isinstance(step, int) and not isinstance(step, bool):
            if step not in self._checkpoints:
                raise CheckpointNotFoundError(f"{self.directory}/{self.template.format(step=step)}", "no such step")
            return [step]
        raise ValueError(f"step must be 'latest', 'best' or an int, got {step!r}")

    def _register_across_ranks(
        self,
        group: Group,
        step: int,
        where: Path | str,
        plain: dict[str, Any],
        now: float,
        register: Callable[[], CheckpointInfo],
    ) -> CheckpointInfo:
        """Rank 0 runs ``register`` (read back, move latest, retire); the other ranks follow its view."""
        work: Callable[[], CheckpointInfo | None] = register if group.is_coordinator else _nothing
        registered: CheckpointInfo | None = group.step(where, "moving latest and applying retention", work, no_message)[
            0
        ]
        with self._mutex:
            if registered is None:
                self._checkpoints[step] = CheckpointInfo(step=step, path=where, metrics=plain, time=now)
                return self._decorated(self._checkpoints[step], self._best_step(), step)
            return registered

    def _check_step(self, step: int) -> None:
        newest = max(self._checkpoints, default=None)
        if step in self._checkpoints:
            raise ValueError(f"step {step} is already saved at {self._checkpoints[step].path}")
        if newest is not None and step < newest:
            raise ValueError(
                f"step {step} is not after the newest saved step {newest} in {self.directory}; pass a larger "
                f"step, or move the checkpoints after {step} out of the directory and call refresh()"
            )


def _nothing() -> None:
    return None


DEFAULT_TEMPLATE = "step-{step:08d}"  # CheckpointManager's default name for a step's folder


def template_pattern(template: str) -> re.Pattern[str]:
    if template.count("{step") != 1:
        raise ValueError(f"template must contain {{step}} exactly once, got {template!r}")
    prefix, rest = template.split("{step", 1)
    if "}" not in rest:
        raise ValueError(f"template {template!r} has an unclosed {{step")
    suffix = rest.split("}", 1)[1]
    if "{" in prefix + suffix or "/" in template:
        raise ValueError(f"template {template!r}: only {{step}} may be formatted, and no '/'")
    return re.compile("^" + re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
