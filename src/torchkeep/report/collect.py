"""What a run report shows, gathered from a CheckpointManager directory as plain data (no HTML here)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import torch

from torchkeep.errors import CheckpointNotFoundError
from torchkeep.format.dtypes import dtype_name
from torchkeep.manager.manager import CheckpointInfo, CheckpointManager
from torchkeep.manager.policies import Candidate, KeepBest, KeepEvery, KeepLast, RetentionPolicy
from torchkeep.weights.diff import DiffReport, compare_states, module_of
from torchkeep.weights.load import load


@dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint, with the reasons it is kept (empty when the policies are unknown)."""

    step: int
    time: float
    size: int
    metrics: dict[str, int | float]
    is_latest: bool
    is_best: bool
    kept_by: tuple[str, ...]


@dataclass(frozen=True)
class ModuleSize:
    """The tensors of one module (the tensor name without its last part)."""

    module: str
    tensors: int
    params: int
    nbytes: int


@dataclass(frozen=True)
class DtypeShare:
    dtype: str
    tensors: int
    params: int
    nbytes: int


@dataclass(frozen=True)
class Weights:
    """The model weights of one checkpoint, by module and by dtype; ``missing`` says why there are none."""

    step: int
    modules: list[ModuleSize] = field(default_factory=list)
    dtypes: list[DtypeShare] = field(default_factory=list)
    missing: str | None = None


@dataclass(frozen=True)
class RunSummary:
    """Everything the page shows. ``policies`` is empty when none were given (a run does not record them)."""

    run_dir: str
    rows: list[CheckpointRow]
    policies: list[str]
    monitor: str | None
    mode: str
    damaged: dict[str, str]
    metric_names: list[str]
    weights: Weights
    diff: DiffReport | None
    diff_steps: tuple[int, int] | None
    no_diff: str | None  # why there is no diff section


def describe_policy(policy: RetentionPolicy) -> str:
    """A policy as the CheckpointManager argument that makes it."""
    if isinstance(policy, KeepLast):
        return f"keep_last={policy.n}"
    if isinstance(policy, KeepBest):
        return f"keep_best={policy.n} ({policy.monitor}, {policy.mode})"
    if isinstance(policy, KeepEvery):
        return f"keep_every={policy.n}"
    return repr(policy)


def kept_by(infos: Sequence[CheckpointInfo], policies: Sequence[RetentionPolicy]) -> list[tuple[str, ...]]:
    """For each checkpoint, what keeps it now: each policy that keeps its step, and latest/best, which a manager
    always keeps (the same union ``policies.to_delete`` takes). Empty tuples without policies: unknown."""
    if not policies:
        return [() for _ in infos]
    candidates = [Candidate(i.step, i.metrics) for i in infos]
    keeps = [(describe_policy(p), p.keep(candidates)) for p in policies]
    reasons = []
    for info in infos:
        why = [name for name, steps in keeps if info.step in steps]
        if info.is_latest:
            why.append("latest (always kept)")
        if info.is_best:
            why.append("best (always kept)")
        reasons.append(tuple(why))
    return reasons


def weights_summary(step: int, tensors: dict[str, torch.Tensor]) -> Weights:
    """Sizes by module and by dtype; a tensor shared under several names counts once."""
    modules: dict[str, list[int]] = {}
    dtypes: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        numel, nbytes = tensor.numel(), tensor.numel() * tensor.element_size()
        for table, key in ((modules, module_of(name)), (dtypes, dtype_name(tensor.dtype))):
            totals = table.setdefault(key, [0, 0, 0])
            totals[0] += 1
            totals[1] += numel
            totals[2] += nbytes
    return Weights(
        step=step,
        modules=[ModuleSize(m, *totals) for m, totals in modules.items()],
        dtypes=sorted((DtypeShare(d, *totals) for d, totals in dtypes.items()), key=lambda d: (-d.nbytes, d.dtype)),
    )


def _model_weights(info: CheckpointInfo) -> dict[str, torch.Tensor] | str:
    """The checkpoint's model state dict, or why it has none (a save without model=)."""
    try:
        return load(info.path)
    except CheckpointNotFoundError as exc:
        return exc.problem


def is_finite_number(value: object) -> TypeGuard[int | float]:
    """What a chart can plot: an int or a float that is not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric_metrics(rows: Sequence[CheckpointRow]) -> list[str]:
    """Metric names with at least one finite value, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        for name, value in row.metrics.items():
            if is_finite_number(value):
                names.setdefault(name)
    return list(names)


def collect(manager: CheckpointManager, template: str = "step-{step:08d}") -> RunSummary:
    """Everything the page needs from a run, through a read-only manager (no lock taken, nothing cleaned)
    made with the run's retention options."""
    run_dir = manager.directory
    infos = manager.list()
    if not infos:
        example = template.format(step=100)
        raise CheckpointNotFoundError(
            Path(run_dir),
            f"no checkpoints here: a CheckpointManager run holds folders like {example}/ with a manifest.json"
            + (f" (damaged: {', '.join(sorted(manager.damaged))})" if manager.damaged else ""),
        )
    rows = [
        CheckpointRow(i.step, i.time, i.size, dict(i.metrics), i.is_latest, i.is_best, why)
        for i, why in zip(infos, kept_by(infos, manager.policies), strict=True)
    ]
    latest = infos[-1]
    loaded = _model_weights(latest)
    weights = Weights(latest.step, missing=loaded) if isinstance(loaded, str) else weights_summary(latest.step, loaded)
    report: DiffReport | None = None
    no_diff: str | None = None
    if len(infos) < 2:
        no_diff = f"the run has one checkpoint (step {latest.step}): a diff needs two"
    elif isinstance(loaded, str):
        no_diff = f"the latest checkpoint has no model weights to compare ({loaded})"
    else:
        previous = _model_weights(infos[-2])
        if isinstance(previous, str):
            no_diff = f"step {infos[-2].step} has no model weights to compare ({previous})"
        else:  # the latest one's weights are the ones already loaded for the summary
            report = compare_states(previous, loaded, a=os.fspath(infos[-2].path), b=os.fspath(latest.path))
    return RunSummary(
        run_dir=os.fspath(run_dir),
        rows=rows,
        policies=[describe_policy(p) for p in manager.policies],
        monitor=manager.monitor,
        mode=manager.mode,
        damaged=dict(manager.damaged),
        metric_names=numeric_metrics(rows),
        weights=weights,
        diff=report,
        diff_steps=(infos[-2].step, latest.step) if report is not None else None,
        no_diff=no_diff,
    )
