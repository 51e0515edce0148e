"""CheckpointManager: numbered checkpoints in one directory, atomic commits, retention, fallback."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from torchkeep._warn import warn
from torchkeep.checkpoint import objects
from torchkeep.checkpoint.background import PendingSave, StagingBuffers, Writer
from torchkeep.checkpoint.io import load_checkpoint, share_tensors, write_checkpoint_dir
from torchkeep.checkpoint.layout import (
    MANIFEST_FILE,
    TENSORS_FILE,
    CheckpointPlan,
    SaveRequest,
    manifest_bytes,
    parse_manifest,
    plan_checkpoint,
)
from torchkeep.distributed.group import Group, active_group
from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DistributedError,
    TorchkeepError,
)
from torchkeep.manager import preemption
from torchkeep.manager.folders import (
    Deleter,
    manager_info,
    not_ours,
    remove_leftover,
    step_folders,
)
from torchkeep.manager.lock import LOCK_FILE, Lease, acquire, release
from torchkeep.manager.policies import (
    RetentionPolicy,
    plain_metric,
    plain_metrics,
    to_delete,
)
from torchkeep.manager.view import CheckpointInfo, RunView
from torchkeep.state.devices import MapLocation
from torchkeep.state.tensors import PreparedTensors
from torchkeep.state.values import Decoder
from torchkeep.storage.local import (
    TEMPORARY,
    LocalStorage,
    atomic_write,
    fsync_dir,
    reason,
    temporary_sibling,
    write_errors,
)
from torchkeep.storage.remote import is_url

__all__ = ["LOCK_FILE", "CheckpointInfo", "CheckpointManager"]

LATEST_FILE = "latest"
# Room kept free beyond everything a save writes: the filesystem's own needs, other writers.
SPACE_MARGIN_BYTES = 16 * 1024 * 1024


class CheckpointManager(RunView):
    """Numbered training checkpoints in one directory, with retention and crash safety.

    Each save writes ``directory/step-00000100/`` (``template``) under a temporary name, fsyncs
    it, renames it into place, reads it back, then updates ``latest`` and applies retention: a
    checkpoint is deleted only after the new one is durable and verified, and the latest and the
    best are never deleted. Steps only go forward: a step at or below the newest saved one is
    refused with ``ValueError`` (nothing is written or deleted).

    Retention deletes only what a manager wrote: a folder whose manifest parses, says
    ``"manager": 1`` and names the folder's step, and that holds nothing but ``manifest.json``
    and ``tensors.safetensors``. A checkpoint folder holding anything else (your notes, an
    evaluation file) is left whole, with one warning; move the file out and the next save
    retires it. Folders that merely look like steps are never touched.

    The view is rebuilt from the directory at start-up. One process at a time may write (a lock
    file naming it); within a process, a new manager on the same directory takes over from the
    old one, which then refuses to save. Methods are thread-safe: saves are serialised.

    Every write a save makes (the checkpoint, ``latest``, retiring old checkpoints) raises
    :class:`~torchkeep.errors.CheckpointWriteError` naming the path when it fails. Best-effort by
    design: deleting retired checkpoints in the background (already renamed aside; what is left
    is removed at the next start), cleaning temporaries at start-up, and the note naming the
    lock's holder.

    Args:
        directory: where checkpoints live (created if needed).
        keep_last: keep the N most recent.
        keep_best: keep the N best by ``monitor`` (``mode`` "min" or "max").
        keep_every: keep every step that is a multiple of N, forever.
        save_every: :meth:`should_save` is true at multiples of N.
        policies: more retention policies (objects with ``keep(candidates) -> set[int]``).
        template: directory name for a step; must contain ``{step}`` (format spec allowed).
        read_only: do not take the lock or clean up (for listing and restoring only).
        incremental: store each large tensor once, by content, in the run's ``objects/`` folder: a
            tensor that did not change since a kept checkpoint (a frozen backbone, a fine-tune's base
            weights) is not written again, once its stored bytes are checked against its key (a damaged
            one is rewritten, with a warning). An object is deleted only when no manifest in the run
            folder names it (a folder you renamed, or another template's, keeps its objects).
            Such checkpoints are format version 2 (torchkeep older than this reads none of them).
        async_save: :meth:`save` returns once the state is copied into reusable staging buffers and
            writes, verifies and commits on a background thread (then moves ``latest`` and applies
            retention). One save is in flight at a time: the next ``save`` first waits for it. A
            background error is raised by the next ``save``, :meth:`wait` or :meth:`close` (or the
            handle's ``wait()``); at interpreter exit a save in flight is finished, and an error that
            nothing raised is written to stderr (naming the checkpoint; the exit status is unchanged).

    Raises:
        CheckpointWriteError: another process writes here (the message names it), or the
            directory cannot be written (pass ``read_only=True`` to list and restore).

    Example:
        >>> mgr = CheckpointManager("runs/1", keep_last=2, keep_best=1, monitor="val_acc", mode="max")
        >>> if mgr.should_save(step):
        ...     mgr.save(step, metrics={"val_acc": acc}, model=model, optimizer=opt, epoch=epoch)
        >>> state = mgr.restore(model=model, optimizer=opt)
    """

    def __new__(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        if is_url(directory):  # a run on object storage: the same API, committed by manifests
            from torchkeep.manager.remote import RemoteCheckpointManager

            return RemoteCheckpointManager(str(directory), **kwargs)
        return super().__new__(cls)

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
        async_save: bool = False,
        incremental: bool = False,
        process_group: Any = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if storage_options:
            raise ValueError(f"{directory}: storage_options are for runs at a URL (s3://...), not a local folder")
        self.group = active_group(process_group)
        self._lease: Lease | None = None
        self._mutex = threading.RLock()
        self._save_order = threading.Lock()  # serialises save() callers, held while waiting for the previous save
        self.async_save = async_save
        self._staging = StagingBuffers()
        self._writer = Writer()
        self._pending: PendingSave[CheckpointInfo] | None = None
        self._saving = False
        self.incremental = incremental
        self._retiring: set[str] = set()  # retired checkpoints renamed aside, being deleted: they use no object
        self._manifest_keys: objects.ManifestMemo = {}  # the objects each manifest in the run mentions
        self._deleter = Deleter()
        self._warned: set[str] = set()
        self.directory: Path = Path(directory)
        self._set_policies(keep_last, keep_best, monitor, mode, keep_every, save_every, policies, template)
        self.read_only = read_only
        self.damaged: dict[str, str] = {}
        if read_only:
            if not self.directory.is_dir():
                raise CheckpointNotFoundError(self.directory)
        else:
            with write_errors(self.directory, "creating the run directory"):
                self.directory.mkdir(parents=True, exist_ok=True)
            if self._leads:  # with several ranks, rank 0 holds the lock, moves latest and deletes
                self._lease = acquire(self.directory)
                self._clean_temporaries()
        self._checkpoints: dict[int, CheckpointInfo] = self._scan()
        if not read_only and self._leads:
            self._collect_objects()  # what a killed save or retention left
        if self.group is not None:
            self.group.exchange({}, self.directory, "opening the run directory")  # rank 0 has cleaned up

    @property
    def _leads(self) -> bool:
        """This process holds the lock and writes latest (the only process, or rank 0 of several)."""
        return self.group is None or self.group.is_coordinator

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Finish a background save and pending deletions, and release the directory lock (unless another
        manager took it over). Raises the error of a background save nobody has seen yet."""
        try:
            self._finish_pending()
        finally:
            self._writer.shutdown()
            with self._mutex:
                self._deleter.wait()
                if self._lease is not None:
                    release(self._lease)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Attributes are missing when __init__ failed early; at interpreter exit the OS drops the lock.
        if "_lease" in self.__dict__ and "_deleter" in self.__dict__ and "_writer" in self.__dict__:
            with contextlib.suppress(Exception):
                pending, self._pending = self._pending, None
                if pending is not None:
                    pending.join()  # its error is not taken here: it is written to stderr at interpreter exit
                self.close()

    def _clean_temporaries(self) -> None:
        """Remove what a crashed save or deletion left, when it is provably ours.

        That is a ``.tmp-`` sibling of ``latest``, or of a step folder holding nothing but the
        files a save writes (and their own temporaries). Anything else is left, with a warning.
        Removal is best-effort: what cannot be removed now is tried again at the next start.
        """
        with write_errors(self.directory, "listing the run directory"):
            entries = list(os.scandir(self.directory))
        for entry in entries:
            match = TEMPORARY.match(entry.name)
            if match is None:
                continue
            base = match["base"]
            if base == LATEST_FILE and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif self._name_pattern.match(base) and entry.is_dir(follow_symlinks=False):
                remove_leftover(Path(entry.path))

    def _scan(self) -> dict[int, CheckpointInfo]:
        """Every checkpoint a manager wrote here, from the disk: one manifest read per folder."""
        found: dict[int, CheckpointInfo] = {}
        self.damaged = {}
        try:
            entries = list(step_folders(self.directory, self.template))
        except OSError as exc:
            raise CheckpointNotFoundError(self.directory, f"cannot be listed: {reason(exc)}") from exc
        for entry in entries:
            if entry.damage is not None:
                self.damaged[entry.name] = entry.damage
                continue
            info, manifest, raw, path = entry.info, entry.manifest, entry.raw, entry.path
            if info is None or manifest is None:
                continue  # a checkpoint, but not one of a manager's (save_checkpoint, a copy...)
            tensors = manifest.get("tensors_file")
            recorded = tensors.get("size") if isinstance(tensors, dict) else None
            step = info["step"]
            found[step] = CheckpointInfo(
                step=step,
                path=path,
                metrics=_read_metrics(info.get("metrics"), str(path / MANIFEST_FILE)),
                time=_number(info.get("time")),
                size=len(raw) + (recorded if isinstance(recorded, int) else 0),
            )
        return found

    def refresh(self) -> None:
        """Rebuild the view from the directory (another process may have written)."""
        with self._mutex:
            self._checkpoints = self._scan()

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
        per_rank: Mapping[str, Any] | None = None,
        **state: Any,
    ) -> CheckpointInfo | PendingSave[CheckpointInfo]:
        """Write checkpoint ``step`` atomically, read it back, then apply retention.

        With several ranks (a process group), every rank calls ``save`` with the same step: each
        writes its part (see :func:`torchkeep.save_checkpoint`, ``per_rank`` included), rank 0 commits
        once all are durable, then moves ``latest`` and applies retention; rank 0's metrics are kept.

        With ``async_save=True`` this returns a :class:`PendingSave` as soon as the state is copied;
        its ``wait()`` returns the :class:`CheckpointInfo`. ``latest``, ``best`` and retention move
        only once the checkpoint is durable and read back.

        Other arguments as :func:`torchkeep.save_checkpoint`. ``metrics`` values may be Python
        numbers, 0-dim tensors (any device, with grad too) or NumPy scalars and 0-d arrays; they
        are stored as Python ints and floats. NaN is stored but never ranked best.

        Raises:
            ValueError: ``step`` is not after the newest saved step (steps only go forward), or a
                metric is a tensor or array of more than one number.
            TypeError: a metric is not a real number (a string, a bool, a complex).
            CheckpointWriteError: not enough free space (checked first), the disk filled up, the
                new checkpoint did not read back, a folder not written by the manager has the
                step's name, or another manager took over; earlier checkpoints are intact.
        """
        request = SaveRequest(model, optimizer, scheduler, scaler, components, rng, state, per_rank)
        if self.group is not None:
            return self._save_across_ranks(self.group, step, metrics, request)
        if per_rank:
            raise ValueError("per_rank= is for managers shared by several ranks; no process group is initialised")
        with self._save_order:
            self._saving = True
            try:
                self._finish_pending()  # at most one save in flight; its error, if any, is raised here
                with self._mutex:
                    target, plan, plain, now = self._plan_save(step, metrics, request)
                    if not self.async_save:
                        return self._commit_save(step, target, plan, plain, now)
                    snapshot = self._staging.snapshot(plan)
                    pending = self._writer.submit(
                        step, target, lambda: self._commit_save(step, target, snapshot, plain, now)
                    )
                    self._pending = pending
                    return pending
            finally:
                self._saving = False

    def save_on_signal(
        self,
        state: Callable[[], Mapping[str, Any]],
        *,
        signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1),
        deadline: float = 60.0,
    ) -> Callable[[], None]:
        """Save a final checkpoint when the job is told to stop, then let the signal act as before.

        ``state()`` returns :meth:`save`'s arguments, ``step`` included (``lambda: dict(step=step,
        model=model, optimizer=opt, epoch=epoch)``). On SIGTERM (schedulers' notice) or SIGUSR1
        (preemption warnings), a save in flight is finished (waiting at most ``deadline`` seconds),
        then ``state()`` is saved synchronously unless that step is already saved; then the previous
        handler runs, or the default action (SIGTERM ends the process). Install from the main thread;
        returns a function that uninstalls. A signal that arrives during a ``save`` call does not
        start a second one: that save is the final one.
        """
        return preemption.install(self, state, signals, deadline)

    def save_now(self, step: int, deadline: float, **kwargs: Any) -> bool:
        """The final, blocking save of :meth:`save_on_signal`; False when skipped (and why, as a warning)."""
        if self._saving:
            warn("a signal arrived during save(): that save is the final one")
            return False
        pending = self._pending
        if pending is not None:
            try:
                pending.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                warn("the save in flight outlasted the deadline: no final save")
                return False
            except TorchkeepError:
                pass  # that step failed; the final save below replaces it
            self._pending = None
        with self._mutex:
            if self._checkpoints and step <= max(self._checkpoints):
                return False  # already saved
        was, self.async_save = self.async_save, False
        try:
            self.save(step, **kwargs)
        finally:
            self.async_save = was
        return True

    def _plan_save(
        self, step: int, metrics: Mapping[str, Any] | None, request: SaveRequest
    ) -> tuple[Path, CheckpointPlan, dict[str, Any], float]:
        """Check the step and the directory, plan what to write, and check it fits; nothing is written."""
        plain = plain_metrics(metrics or {})
        target = self._check_target(step)
        now = time.time()
        plan = plan_checkpoint(request, info={"manager": 1, "step": step, "metrics": plain, "time": now})
        self._check_space(plan, target)
        return target, plan, plain, now

    def _check_target(self, step: int) -> Path:
        """The folder for ``step``, after checking it may be written; nothing is written."""
        if self.read_only or (self._leads and self._lease is None):
            raise CheckpointWriteError(self.directory, "this manager is read_only")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._lease is not None:
            self._lease.check()
        self._check_step(step)
        target = self.directory / self.template.format(step=step)
        if os.path.lexists(target):
            why = self.damaged.get(target.name, "its manifest is not a manager's for this step")
            raise CheckpointWriteError(
                target,
                f"exists, and is not a checkpoint this manager can vouch for ({why}); nothing was written. "
                "Move it out of the way, or use another directory or template",
            )
        return target

    def _save_across_ranks(
        self, group: Group, step: int, metrics: Mapping[str, Any] | None, request: SaveRequest
    ) -> CheckpointInfo | PendingSave[CheckpointInfo]:
        """The distributed protocol (torchkeep.distributed.save), then rank 0 moves latest and retires."""
        from torchkeep.distributed.plan import plan_distributed
        from torchkeep.distributed.save import save_job

        plain = plain_metrics(metrics or {})
        now = time.time()
        target = self.directory / self.template.format(step=step)

        def make_plan() -> Any:
            if group.is_coordinator:
                self._check_target(step)  # rank 0's view decides; a refusal fails every rank
            return plan_distributed(request, info={"manager": 1, "step": step, "metrics": plain, "time": now})

        def register(used: Group, _: int) -> CheckpointInfo:
            return self._register_across_ranks(
                used, step, target, plain, now, lambda: self._register(step, target, plain, now)
            )

        with self._save_order:
            self._finish_pending()  # at most one save in flight; its error, if any, is raised here
            with self._mutex:
                store = objects.objects_store(target) if self.incremental else None
                staging = self._staging if self.async_save else None
                job = save_job(target, make_plan, group, register, staging=staging, objects_store=store)
                if not self.async_save:
                    return job()
                self._pending = self._writer.submit(step, target, job)
                return self._pending

    def _commit_save(
        self, step: int, target: Path, plan: CheckpointPlan, plain: dict[str, Any], now: float
    ) -> CheckpointInfo:
        """Write, read back, then move ``latest`` and apply retention (on the worker thread when async)."""
        try:
            with write_errors(target, "writing the checkpoint"):
                if self.incremental:
                    plan, _ = share_tensors(plan, objects.objects_store(target))
                write_checkpoint_dir(target, plan)
        except CheckpointWriteError as exc:
            raise CheckpointWriteError(
                exc.path, f"{exc.problem}; earlier checkpoints are intact, nothing was left", cause=exc
            ) from exc
        return self._register(step, target, plain, now)

    def _register(self, step: int, target: Path, plain: dict[str, Any], now: float) -> CheckpointInfo:
        """A committed checkpoint read back, then ``latest`` moved to it and retention applied."""
        with self._mutex:
            size = self._read_back(target, step)
            if self._lease is not None:
                self._lease.check()  # another manager took over while this one was writing
            self._checkpoints[step] = CheckpointInfo(step=step, path=target, metrics=plain, time=now, size=size)
            self._write_latest(target, step)
            self._apply_retention(step)
            return self._decorated(self._checkpoints[step], self._best_step(), step)

    def _finish_pending(self) -> None:
        """Wait for the background save, if any; raise its error if nobody has seen it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending.unreported_error()
            if error is not None:
                raise error

    def _check_space(self, plan: CheckpointPlan, target: Path) -> None:
        """Refuse up front when the tensors, the manifest and ``latest`` would not fit with the margin."""
        tensors = _tensor_file_size(plan.tensors)
        manifest = len(manifest_bytes(plan.manifest, {"name": TENSORS_FILE, "size": tensors}))
        needed = tensors + manifest + len(target.name) + 1 + SPACE_MARGIN_BYTES
        with write_errors(self.directory, "checking the free space"):
            free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointWriteError(
                target,
                f"needs about {needed / 1e6:.1f} MB (tensors {tensors / 1e6:.1f} MB, manifest "
                f"{manifest / 1e6:.1f} MB, a {SPACE_MARGIN_BYTES / 1e6:.0f} MB margin) but only {free / 1e6:.1f} MB "
                "are free; nothing was written",
            )

    def _read_back(self, target: Path, step: int) -> int:
        """Parse the committed manifest again and check the tensor file's size; returns the checkpoint's size."""
        manifest_path = target / MANIFEST_FILE
        try:
            raw = manifest_path.read_bytes()
            manifest = parse_manifest(raw, str(manifest_path))
            info = manager_info(manifest, target, self.template)
            if info is None or info["step"] != step:
                raise CorruptCheckpointError(manifest_path, f"does not describe step {step} of a manager")
            tensors = manifest.get("tensors_file")
            recorded = tensors.get("size") if isinstance(tensors, dict) else None
            actual = os.stat(target / TENSORS_FILE).st_size
            if actual != recorded:
                raise CorruptCheckpointError(
                    target / TENSORS_FILE, f"size {actual} differs from the {recorded} recorded"
                )
            for key in objects.referenced(manifest):
                path = objects.objects_dir(target) / key
                if os.stat(path).st_size != int(key.rsplit("-", 1)[1]):
                    raise CorruptCheckpointError(path, "object has the wrong size")
        except (OSError, CorruptCheckpointError) as exc:
            raise CheckpointWriteError(
                target,
                f"the new checkpoint does not read back ({exc}); nothing older was deleted and "
                f"{LATEST_FILE} was not changed",
            ) from exc
        return len(raw) + actual

    def _write_latest(self, target: Path, step: int) -> None:
        try:
            with atomic_write(self.directory / LATEST_FILE) as sink:
                sink.write(target.name.encode() + b"\n")
        except CheckpointWriteError as exc:
            raise CheckpointWriteError(
                exc.path,
                f"{exc.problem}; checkpoint step {step} is saved and verified at {target}, but retention did "
                "not run, so nothing older was deleted",
                cause=exc,
            ) from exc

    def _apply_retention(self, newest: int) -> None:
        """Retire what no policy keeps: checked to be ours, renamed aside, deleted in the background."""
        protected = {newest}
        best = self._best_step()
        if best is not None:
            protected.add(best)
        retired = False
        try:
            for step in sorted(to_delete(self._candidates(), self.policies, protected=protected)):
                path = Path(self._checkpoints[step].path)
                if not os.path.lexists(path):
                    del self._checkpoints[step]  # deleted by hand meanwhile
                    continue
                why = not_ours(path, step, self.template)
                if why is not None:
                    if path.name not in self._warned:
                        self._warned.add(path.name)
                        warn(
                            f"kept {path}: it {why}, so retention leaves it whole; move what you added out of it "
                            "and a later save will retire it"
                        )
                    continue
                # Renamed first: a crash mid-delete leaves a temporary name, cleaned at the next start.
                doomed = temporary_sibling(path)
                try:
                    os.rename(path, doomed)
                except FileNotFoundError:
                    del self._checkpoints[step]
                    continue
                except OSError as exc:
                    raise CheckpointWriteError(
                        path,
                        f"retiring it failed: {reason(exc)}; step {newest} is saved, and this older checkpoint is kept",
                        cause=exc,
                    ) from exc
                del self._checkpoints[step]
                self._retiring.add(doomed.name)
                self._deleter.add(doomed)
                retired = True
        finally:
            if retired:
                with write_errors(self.directory, "syncing the run directory after retiring old checkpoints"):
                    fsync_dir(self.directory)
                self._deleter.start()
                self._collect_objects()

    def _collect_objects(self) -> None:
        """Delete shared objects that no manifest in the run folder mentions (after retention, and at start-up
        for what a crash left): not only this manager's steps count, but every folder holding a manifest,
        whatever its name (a renamed checkpoint, another template's), except retired ones being deleted."""
        folder = self.directory / objects.OBJECTS_DIR
        if not folder.is_dir():
            return
        with self._mutex:
            self._retiring = {name for name in self._retiring if os.path.lexists(self.directory / name)}
            objects.collect_unused(
                LocalStorage(self.directory), LocalStorage(folder), skip=self._retiring, memo=self._manifest_keys
            )

    def wait(self) -> None:
        """Wait for a background save (raising its error) and for deletions of retired checkpoints."""
        with self._save_order:
            self._finish_pending()
        self._deleter.wait()

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
        per_rank: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Restore from ``"latest"``, ``"best"`` or a step number; returns the saved plain values.

        With several ranks every rank calls it; rank 0's choice of checkpoint is used by all, and a
        checkpoint that fails on any rank is skipped by all (see :func:`torchkeep.load_checkpoint`
        for resharding and ``per_rank``).

        Checksums are verified. For "latest" and "best", a checkpoint that is damaged or
        incomplete is skipped, with a warning naming it and why, for the next newest (or next
        best) that verifies. The returned dict also holds ``"step"`` unless the state has one.

        Raises:
            CheckpointNotFoundError: no checkpoint (that verifies) exists.
        """
        pending = self._pending
        if pending is not None:
            pending.join()  # a save in flight first (its error stays for the next save or wait() to raise)
        with self._mutex:
            self.refresh()
            order = self._restore_order(step)
            newest = max(self._checkpoints, default=-1)
            for name, why in self.damaged.items():
                match = self._name_pattern.match(name)
                if step == "latest" and match and int(match.group(1)) > newest:
                    warn(f"skipped {self.directory / name}: {why}")
            if self.group is not None:  # every rank restores the checkpoint rank 0 chose
                order = self.group.exchange({"order": order}, self.directory, "choosing the checkpoint")[0]["order"]
            problems = []
            for candidate in order:
                path = self.directory / self.template.format(step=candidate)
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
                        per_rank=per_rank,
                        process_group=self.group.process_group if self.group is not None else None,
                    )
                except (CorruptCheckpointError, CheckpointNotFoundError, DistributedError) as exc:
                    if not isinstance(step, str):
                        raise
                    problems.append(f"{path}: {exc}")
                    warn(f"skipped {path}: {exc}")
                    continue
                state.setdefault("step", candidate)
                return state
            raise CheckpointNotFoundError(
                self.directory,
                "no checkpoint to restore" + (": none verifies\n" + "\n".join(problems) if problems else ""),
            )


def _read_metrics(node: Any, source: str) -> dict[str, Any]:
    """Saved metrics as numbers; what is not a number stored in the JSON (older saves' tensors) is left out."""
    if not isinstance(node, dict):
        return {}
    decoder = Decoder({}, source, lambda tensor, _device: tensor)
    metrics: dict[str, Any] = {}
    for name, value in node.items():
        with contextlib.suppress(CorruptCheckpointError, TypeError, ValueError, KeyError):
            metrics[name] = plain_metric(name, decoder.decode(value))
    return metrics


def _tensor_file_size(prepared: PreparedTensors) -> int:
    """About the tensor file's size: the data, and a header entry per tensor (its name twice: the
    entry and its checksum). Laying the file out exactly would hash all the data a second time."""
    header = 1024 + sum(2 * len(name.encode()) + 128 + 21 * t.dim() for name, t in prepared.tensors.items())
    header += sum(len(a.encode()) + len(b.encode()) + 8 for a, b in prepared.aliases.items())
    return 8 + header + prepared.nbytes


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
