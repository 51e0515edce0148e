"""torchkeep.average: the mean (or an exponential moving average) of several checkpoints' weights.

As timm's ``avg_checkpoints`` and SWA users do: floating-point tensors are summed in float64, one
checkpoint at a time (memory: the sum plus one checkpoint, read through the page cache), then cast back
to their dtype; integer and bool tensors (counters such as ``num_batches_tracked``) are not averaged,
they come from the newest checkpoint. Every checkpoint must hold the same names, shapes and dtypes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.checkpoint.io import checkpoint_size
from torchkeep.errors import CheckpointNotFoundError, StateMismatchError
from torchkeep.weights.load import load
from torchkeep.weights.save import save


@dataclass(frozen=True)
class AverageReport:
    """What was averaged into ``output``: the sources in order (oldest first) and how."""

    output: str
    sources: list[str]
    method: str  # "mean" or "ema(decay)"
    averaged: list[str] = field(default_factory=list)  # floating-point tensors
    copied: list[str] = field(default_factory=list)  # integer/bool tensors, from the newest source

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "sources": self.sources,
            "method": self.method,
            "averaged": self.averaged,
            "copied": self.copied,
        }

    def __str__(self) -> str:
        lines = [f"{self.output}: {self.method} of {len(self.sources)} checkpoint(s)"]
        lines += [f"  {source}" for source in self.sources]
        lines.append(f"averaged {len(self.averaged)} floating-point tensors")
        if self.copied:
            shown = ", ".join(self.copied[:5]) + (", ..." if len(self.copied) > 5 else "")
            lines.append(f"copied from the newest: {len(self.copied)} integer/bool tensors ({shown})")
        return "\n".join(lines)


def average(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    last: int | None = None,
    ema: float | None = None,
    trusted: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AverageReport:
    """Average the weights of several checkpoints into one safetensors file.

    Args:
        sources: checkpoints or weight files, oldest first (any format :func:`torchkeep.load` reads),
            or a CheckpointManager run directory (its checkpoints, by step).
        output: the ``.safetensors`` file (or folder) to write; written atomically.
        last: use only the newest ``last`` sources.
        ema: instead of the mean, an exponential moving average in order: ``avg = ema * avg + (1 - ema) * w``,
            starting from the oldest.
        trusted: for pickle-based sources, allow full unpickling (runs their code).
        progress: called with (bytes of sources read, total bytes) after each source.

    Raises:
        CheckpointNotFoundError: no sources, an empty run, or a single path that is not a run
            (:func:`torchkeep.manager.folders.is_run`).
        StateMismatchError: sources whose names, shapes or dtypes differ (naming the file and the key).
    """
    paths = _sources(sources)
    if last is not None:
        if last < 1:
            raise ValueError(f"last must be at least 1, got {last}")
        paths = paths[-last:]
    if ema is not None and not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    totals: dict[str, torch.Tensor] = {}
    newest: dict[str, torch.Tensor] = {}
    reference: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    sizes = [checkpoint_size(path) for path in paths]
    for index, path in enumerate(paths):
        weights = load(path, trusted=trusted)
        _check_same(reference, weights, path, paths[0])
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                newest[name] = tensor
                continue
            if index == 0:
                totals[name] = tensor.to(torch.float64, copy=True)  # the sum's own memory, not the mapped file's
            elif ema is None:
                totals[name].add_(tensor)  # computed in float64: in-place ops promote to the result's dtype
            else:
                totals[name].mul_(ema).add_(tensor, alpha=1.0 - ema)
        reference = reference or {n: (tuple(t.shape), t.dtype) for n, t in weights.items()}
        if progress is not None:
            progress(sum(sizes[: index + 1]), sum(sizes))
    out: dict[str, torch.Tensor] = {}
    for name, (_, dtype) in reference.items():
        if name in totals:
            mean = totals[name] if ema is not None else totals[name] / len(paths)
            out[name] = mean.to(dtype)
        else:
            out[name] = newest[name].clone()
    method = "mean" if ema is None else f"ema({ema:g})"
    save(out, output, metadata={"averaged": method, "averaged_sources": str(len(paths))})
    averaged = [n for n in reference if n in totals]
    return AverageReport(str(output), paths, method, averaged, [n for n in reference if n not in totals])


def _sources(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
    if isinstance(sources, (str, os.PathLike)):
        from torchkeep.manager.folders import is_run
        from torchkeep.manager.manager import CheckpointManager

        run = Path(sources)
        if not is_run(run):
            raise CheckpointNotFoundError(run, "is not a CheckpointManager run directory; pass the files to average")
        infos = CheckpointManager(run, read_only=True).list()
        paths = [str(info.path) for info in sorted(infos, key=lambda info: info.step)]
    else:
        paths = [os.fspath(s) for s in sources]
    if not paths:
        raise CheckpointNotFoundError(str(sources), "holds no checkpoints to average")
    return paths


def _check_same(
    reference: dict[str, tuple[tuple[int, ...], torch.dtype]], weights: dict[str, torch.Tensor], path: str, first: str
) -> None:
    if not reference:
        return
    if set(weights) != set(reference):
        extra, missing = sorted(set(weights) - set(reference)), sorted(set(reference) - set(weights))
        raise StateMismatchError(
            path,
            f"holds other tensors than {first}: {len(extra)} more ({extra[:3]}), {len(missing)} fewer ({missing[:3]}); "
            "only checkpoints of one model can be averaged",
        )
    for name, tensor in weights.items():
        shape, dtype = reference[name]
        if (tuple(tensor.shape), tensor.dtype) != (shape, dtype):
            raise StateMismatchError(
                path,
                f"{name!r} is {tensor.dtype}{list(tensor.shape)} here and {dtype}{list(shape)} in {first}",
            )
