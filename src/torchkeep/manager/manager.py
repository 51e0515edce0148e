"""CheckpointManager: numbered checkpoints in one directory, atomic commits, retention, fallback."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchkeep.checkpoint.io import checkpoint_size, load_checkpoint, write_checkpoint_dir
from torchkeep.checkpoint.layout import MANIFEST_FILE, parse_manifest, plan_checkpoint
from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    TorchkeepWarning,
)
from torchkeep.manager.policies import (
    Candidate,
    KeepBest,
    KeepEvery,
    KeepLast,
    RetentionPolicy,
    SaveEvery,
    parse_mode,
    to_delete,
)
from torchkeep.state.devices import MapLocation
from torchkeep.storage.local import TEMP_MARKER, atomic_write, fsync_dir, temporary_sibling

LOCK_FILE = ".torchkeep.lock"
LATEST_FILE = "latest"
# Room kept free beyond a checkpoint's expected size: the manifest, the filesystem's own needs.
SPACE_MARGIN_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a manager."""

    step: int
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    size: int = 0
    is_best: bool = False
    is_latest: bool = False


class CheckpointManager:
    """Numbered training checkpoints in one directory, with retention and crash safety.

    Each save writes ``directory/step-00000100/`` (``template``) under a temporary name, fsyncs
    it, renames it into place, then updates ``latest`` and applies retention: a checkpoint is
    deleted only after the new one is durable, and the latest and best are never deleted.
    The manager's view is rebuilt from the directory at start-up, and one process at a time
    may write (a lock file).

    Args:
        directory: where checkpoints live (created if needed).
        keep_last: keep the N most recent.
        keep_best: keep the N best by ``monitor`` (``mode`` "min" or "max").
        keep_every: keep every step that is a multiple of N, forever.
        save_every: :meth:`should_save` is true at multiples of N.
        policies: more retention policies (objects with ``keep(candidates) -> set[int]``).
        template: directory name for a step; must contain ``{step}`` (format spec allowed).
        read_only: do not take the lock or clean up (for listing and restoring only).

    Example:
        >>> mgr = CheckpointManager("runs/1", keep_last=2, keep_best=1, monitor="val_acc", mode="max")
        >>> if mgr.should_save(step):
        ...     mgr.save(step, metrics={"val_acc": acc}, model=model, optimizer=opt, epoch=epoch)
        >>> state = mgr.restore(model=model, optimizer=opt)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        save_every: int | None = None,
        policies: Sequence[RetentionPolicy] = (),
        template: str = "step-{step:08d}",
        read_only: bool = False,
    ) -> None:
        self._lock_fd: int | None = None
        self._doomed: list[Path] = []
        self._deleter: threading.Thread | None = None
        self.directory = Path(directory)
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
        self._name_pattern = _template_pattern(template)
        self.read_only = read_only
        self.damaged: dict[str, str] = {}
        if read_only:
            if not self.directory.is_dir():
                raise CheckpointNotFoundError(self.directory)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._clean_temporaries()
        self._checkpoints: dict[int, CheckpointInfo] = self._scan()

    # -- lifecycle ---------------------------------------------------------------------------

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise CheckpointWriteError(
                self.directory,
                "another process is writing checkpoints here (its lock is held); use another directory, "
                "or read_only=True to list and restore",
            ) from exc
        self._lock_fd = fd

    def close(self) -> None:
        """Finish pending deletions and release the directory lock."""
        if getattr(self, "_deleter", None) is not None:
            self.wait()
        fd = getattr(self, "_lock_fd", None)  # absent when __init__ failed early
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _clean_temporaries(self) -> None:
        """Remove what a crashed save left: temporary siblings of our own checkpoint names."""
        for entry in self.directory.iterdir():
            name = entry.name
            if not (name.startswith(".") and TEMP_MARKER in name):
                continue
            base = name[1:].split(TEMP_MARKER)[0]
            if self._name_pattern.match(base):
                shutil.rmtree(entry, ignore_errors=True)
            elif base == LATEST_FILE:
                entry.unlink(missing_ok=True)

    def _scan(self) -> dict[int, CheckpointInfo]:
        found: dict[int, CheckpointInfo] = {}
        self.damaged = {}
        for entry in sorted(self.directory.iterdir()):
            match = self._name_pattern.match(entry.name)
            if not match or not entry.is_dir():
                continue
            try:
                manifest = parse_manifest((entry / MANIFEST_FILE).read_bytes(), str(entry / MANIFEST_FILE))
            except (OSError, CorruptCheckpointError) as exc:
                self.damaged[entry.name] = str(exc)
                continue
            info = manifest.get("info") or {}
            step = info.get("step")
            if not isinstance(step, int) or self.template.format(step=step) != entry.name:
                continue  # not one of ours
            found[step] = CheckpointInfo(
                step=step,
                path=entry,
                metrics=dict(info.get("metrics") or {}),
                time=float(info.get("time") or 0.0),
                size=checkpoint_size(entry),
            )
        return found

    def refresh(self) -> None:
        """Rebuild the view from the directory (another process may have written)."""
        self._checkpoints = self._scan()

    # -- queries -----------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        return [Candidate(i.step, i.metrics) for i in self._checkpoints.values()]

    def _best_step(self) -> int | None:
        if self.monitor is None:
            return None
        ranked = KeepBest(1, self.monitor, self.mode).ranked(self._candidates())
        return ranked[0] if ranked else None

    def _decorated(self, info: CheckpointInfo) -> CheckpointInfo:
        latest = max(self._checkpoints) if self._checkpoints else None
        return CheckpointInfo(
            step=info.step,
            path=info.path,
            metrics=info.metrics,
            time=info.time,
            size=info.size,
            is_best=info.step == self._best_step(),
            is_latest=info.step == latest,
        )

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint, oldest first."""
        return [self._decorated(self._checkpoints[s]) for s in sorted(self._checkpoints)]

    def latest(self) -> CheckpointInfo | None:
        return self._decorated(self._checkpoints[max(self._checkpoints)]) if self._checkpoints else None

    def best(self) -> CheckpointInfo | None:
        step = self._best_step()
        return self._decorated(self._checkpoints[step]) if step is not None else None

    def should_save(self, step: int) -> bool:
        """True at multiples of ``save_every`` (always, without it), unless ``step`` is already saved."""
        if step in self._checkpoints:
            return False
        return self.save_policy.should_save(step) if self.save_policy else True

    # -- save --------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        metrics: Mapping[str, Any] | None = None,
        model: nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        components: Mapping[str, Any] | None = None,
        rng: bool = True,
        **state: Any,
    ) -> CheckpointInfo:
        """Write checkpoint ``step`` atomically, then apply retention. Arguments as save_checkpoint.

        Raises:
            ValueError: ``step`` is already saved.
            CheckpointWriteError: not enough free space (checked first) or the disk filled up;
                earlier checkpoints are intact and nothing is left behind.
        """
        if self.read_only:
            raise CheckpointWriteError(self.directory, "this manager is read_only")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if step in self._checkpoints:
            raise ValueError(f"step {step} is already saved at {self._checkpoints[step].path}")
        metrics = dict(metrics or {})
        now = time.time()
        plan = plan_checkpoint(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            components=components,
            rng=rng,
            state=state,
            info={"manager": 1, "step": step, "metrics": metrics, "time": now},
        )
        target = self.directory / self.template.format(step=step)
        self._check_space(plan.nbytes, target)
        try:
            size = write_checkpoint_dir(target, plan)
        except OSError as exc:
            raise CheckpointWriteError(
                target, f"writing failed ({exc.strerror or exc}); earlier checkpoints are intact, nothing was left"
            ) from exc
        self._checkpoints[step] = CheckpointInfo(step=step, path=target, metrics=metrics, time=now, size=size)
        self._write_latest(target.name)
        self._apply_retention()
        return self._decorated(self._checkpoints[step])

    def _check_space(self, nbytes: int, target: Path) -> None:
        free = shutil.disk_usage(self.directory).free
        needed = nbytes + SPACE_MARGIN_BYTES
        if free < needed:
            raise CheckpointWriteError(
                target, f"needs about {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free; nothing was written"
            )

    def _write_latest(self, name: str) -> None:
        with contextlib.suppress(OSError), atomic_write(self.directory / LATEST_FILE) as sink:
            sink.write(name.encode() + b"\n")

    def _apply_retention(self) -> None:
        protected = {max(self._checkpoints)}
        best = self._best_step()
        if best is not None:
            protected.add(best)
        for step in sorted(to_delete(self._candidates(), self.policies, protected=protected)):
            info = self._checkpoints.pop(step)
            # Renamed first: a crash mid-delete leaves a temporary name, cleaned at the next start.
            doomed = temporary_sibling(info.path)
            os.rename(info.path, doomed)
            self._doomed.append(doomed)
        fsync_dir(self.directory)
        if self._doomed and (self._deleter is None or not self._deleter.is_alive()):
            # Unlinking gigabytes takes a while; training need not wait for it.
            self._deleter = threading.Thread(target=self._delete_doomed, name="torchkeep-retention", daemon=True)
            self._deleter.start()

    def _delete_doomed(self) -> None:
        while self._doomed:
            shutil.rmtree(self._doomed.pop(0), ignore_errors=True)

    def wait(self) -> None:
        """Wait for background deletions of retired checkpoints to finish."""
        if self._deleter is not None:
            self._deleter.join()
        self._delete_doomed()

    # -- restore -----------------------------------------------------------------------------

    def restore(
        self,
        step: int | str = "latest",
        *,
        model: nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        components: Mapping[str, Any] | None = None,
        rng: bool = True,
        map_location: MapLocation = "cpu",
        strict: bool = True,
    ) -> dict[str, Any]:
        """Restore from ``"latest"``, ``"best"`` or a step number; returns the saved plain values.

        Checksums are verified. For "latest" and "best", a checkpoint that is damaged or
        incomplete is skipped, with a warning naming it and why, for the next newest (or next
        best) that verifies. The returned dict also holds ``"step"`` unless the state has one.

        Raises:
            CheckpointNotFoundError: no checkpoint (that verifies) exists.
        """
        self.refresh()
        if step == "latest":
            order = sorted(self._checkpoints, reverse=True)
        elif step == "best":
            if self.monitor is None:
                raise ValueError("restore('best') needs a manager created with monitor=")
            order = KeepBest(len(self._checkpoints) or 1, self.monitor, self.mode).ranked(self._candidates())
        elif isinstance(step, int) and not isinstance(step, bool):
            if step not in self._checkpoints:
                raise CheckpointNotFoundError(self.directory / self.template.format(step=step), "no such step")
            order = [step]
        else:
            raise ValueError(f"step must be 'latest', 'best' or an int, got {step!r}")
        newest = max(self._checkpoints, default=-1)
        for name, why in self.damaged.items():
            match = self._name_pattern.match(name)
            if step == "latest" and match and int(match.group(1)) > newest:
                warnings.warn(f"skipped {self.directory / name}: {why}", TorchkeepWarning, stacklevel=2)
        problems = []
        for candidate in order:
            path = self._checkpoints[candidate].path
            try:
                state = load_checkpoint(
                    path,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    components=components,
                    rng=rng,
                    map_location=map_location,
                    strict=strict,
                )
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                if not isinstance(step, str):
                    raise
                problems.append(f"{path}: {exc}")
                warnings.warn(f"skipped {path}: {exc}", TorchkeepWarning, stacklevel=2)
                continue
            state.setdefault("step", candidate)
            return state
        raise CheckpointNotFoundError(
            self.directory, "no checkpoint to restore" + (": none verifies\n" + "\n".join(problems) if problems else "")
        )


def _template_pattern(template: str) -> re.Pattern[str]:
    if template.count("{step") != 1:
        raise ValueError(f"template must contain {{step}} exactly once, got {template!r}")
    prefix, rest = template.split("{step", 1)
    if "}" not in rest:
        raise ValueError(f"template {template!r} has an unclosed {{step")
    suffix = rest.split("}", 1)[1]
    if "{" in prefix + suffix or "/" in template:
        raise ValueError(f"template {template!r}: only {{step}} may be formatted, and no '/'")
    return re.compile("^" + re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
