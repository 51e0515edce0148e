"""A manager whose run lives at an fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``...).

Object stores rename nothing atomically, so a step is committed by its manifest: each save writes
``<step>/tensors-<id>.safetensors`` first, then ``<step>/manifest.json`` (which names it) in one write.
A step without a manifest is uncommitted: listings and restores ignore it, and the next manager to
take the lock deletes its tensor objects. ``latest`` is an object written after the checkpoint reads
back; retention deletes a step's manifest first (uncommitting it), then its tensor objects.

The lock is ``.torchkeep.lock``, created only if absent: a conditional write where the store has
one (S3 ``If-None-Match``), a check then a write elsewhere (best-effort). It names its holder; a
manager that died leaves it behind, and the message says to delete it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from torchkeep import _config
from torchkeep._warn import warn
from torchkeep.checkpoint import objects
from torchkeep.checkpoint.background import PendingSave, StagingBuffers, Writer
from torchkeep.checkpoint.io import load_checkpoint, share_tensors
from torchkeep.checkpoint.layout import MANIFEST_FILE, CheckpointPlan, SaveRequest, parse_manifest, plan_checkpoint
from torchkeep.checkpoint.remote import write_remote_checkpoint
from torchkeep.distributed.group import Group, active_group
from torchkeep.distributed.plan import plan_distributed
from torchkeep.distributed.save import save_job
from torchkeep.errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    DistributedError,
)
from torchkeep.manager.folders import manager_info
from torchkeep.manager.policies import RetentionPolicy, plain_metrics, to_delete
from torchkeep.manager.view import CheckpointInfo, RunView
from torchkeep.state.devices import MapLocation
from torchkeep.storage.remote import RemoteStorage

LOCK_OBJECT = ".torchkeep.lock"
LATEST_OBJECT = "latest"
# What a save writes under a step: its tensors, and (saved by several ranks) each rank's file and DCP's files.
OWN_OBJECT = re.compile(
    r"^(tensors-[0-9a-f]{12}\.safetensors|rank-\d{5}-[0-9a-f]{12}\.safetensors"
    r"|dcp-[0-9a-f]{12}/(\.metadata|__\d+_\d+\.distcp))$"
)


class RemoteCheckpointManager(RunView):
    """:class:`~torchkeep.CheckpointManager` for a run at a URL (made by ``CheckpointManager(url, ...)``)."""

    def __init__(
        self,
        url: str,
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
        storage_options: Mapping[str, Any] | None = None,
        async_save: bool = False,
        incremental: bool = False,
        process_group: Any = None,
    ) -> None:
        self.group = active_group(process_group)
        self.incremental = incremental
        self.async_save = async_save
        self._staging = StagingBuffers()
        self._writer = Writer()
        self._pending: PendingSave[CheckpointInfo] | None = None
        self._token: str | None = None
        self._mutex = threading.RLock()
        self.directory = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.run = RemoteStorage(self.directory, self.storage_options)
        self._set_policies(keep_last, keep_best, monitor, mode, keep_every, save_every, policies, template)
        self.read_only = read_only
        self.damaged: dict[str, str] = {}
        leads = self.group is None or self.group.is_coordinator  # with several ranks, rank 0 holds the lock
        if not read_only and leads:
            self._take_lock()
        self._checkpoints: dict[int, CheckpointInfo] = self._scan()
        if not read_only and leads:
            self._delete_uncommitted()
            self._collect_objects()
        if self.group is not None:
            self.group.exchange({}, self.directory, "opening the run")  # rank 0 has taken the lock and cleaned up

    # -- lifecycle ---------------------------------------------------------------------------

    def _take_lock(self) -> None:
        token = uuid.uuid4().hex
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": token}
        if not self.run.create_new(LOCK_OBJECT, json.dumps(holder).encode()):
            try:
                with self.run.open_read(LOCK_OBJECT) as f:
                    who = json.loads(f.read(4096))
                named = f"pid {who.get('pid')} on {who.get('host')}, since {time.ctime(who.get('started', 0))}"
            except Exception:  # the note only names the holder: best-effort
                named = "another manager"
            raise CheckpointWriteError(
                f"{self.directory}/{LOCK_OBJECT}",
                f"{named} writes this run. If it is gone, delete this object; or pass read_only=True to list "
                "and restore",
            )
        self._token = token

    def close(self) -> None:
        """Finish a background save, then release the lock object (if it is still this manager's).
        Raises the error of a background save nobody has seen yet."""
        try:
            self._finish_pending()
        finally:
            self._writer.shutdown()
            self._release()

    def _release(self) -> None:
        with self._mutex:
            token, self._token = self._token, None
        if token is None:
            return
        with contextlib.suppress(Exception), self.run.open_read(LOCK_OBJECT) as f:
            if json.loads(f.read(4096)).get("token") == token:
                self.run.delete(LOCK_OBJECT)

    def __enter__(self) -> RemoteCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self) -> None:
        """Wait for a background save; raise its error."""
        self._finish_pending()

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            error = pending.unreported_error()
            if error is not None:
                raise error

    def _steps(self) -> dict[str, list[str]]:
        """Each step-named prefix and the objects under it (relative names)."""
        found: dict[str, list[str]] = {}
        for name in self.run.list():
            head, _, rest = name.partition("/")
            if rest and self._name_pattern.match(head):
                found.setdefault(head, []).append(rest)
        return found

    def _scan(self) -> dict[int, CheckpointInfo]:
        found: dict[int, CheckpointInfo] = {}
        self.damaged = {}
        for name, members in self._steps().items():
            if MANIFEST_FILE not in members:
                continue  # uncommitted
            where = f"{self.directory}/{name}/{MANIFEST_FILE}"
            try:
                if self.run.size(f"{name}/{MANIFEST_FILE}") > _config.MAX_JSON_BYTES:
                    raise CorruptCheckpointError(where, f"is over the limit of {_config.MAX_JSON_BYTES} bytes")
                with self.run.open_read(f"{name}/{MANIFEST_FILE}") as f:
                    raw = f.read()
                manifest = parse_manifest(raw, where)
            except (OSError, CorruptCheckpointError, CheckpointNotFoundError) as exc:
                self.damaged[name] = str(exc)
                continue
            info = manager_info(manifest, Path(name), self.template)
            if info is None:
                continue
            record = manifest.get("tensors_file", {})
            metrics = info.get("metrics")
            found[info["step"]] = CheckpointInfo(
                step=info["step"],
                path=f"{self.directory}/{name}",
                metrics=dict(metrics) if isinstance(metrics, dict) else {},
                time=float(info.get("time", 0.0)) if isinstance(info.get("time"), (int, float)) else 0.0,
                size=len(raw) + (record.get("size", 0) if isinstance(record.get("size"), int) else 0),
            )
        return found

    def _delete_uncommitted(self) -> None:
        """Tensor objects of steps that never got a manifest (a save cut short), while holding the lock."""
        for name, members in self._steps().items():
            if MANIFEST_FILE in members:
                continue
            for member in members:
                if OWN_OBJECT.match(member):
                    with contextlib.suppress(CheckpointWriteError):
                        self.run.delete(f"{name}/{member}")

    def refresh(self) -> None:
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
        """As :meth:`torchkeep.CheckpointManager.save`: write, read back, move ``latest``, retire.

        With ``async_save=True``: returns a :class:`~torchkeep.PendingSave` once the state is copied; the
        upload, read-back, ``latest`` and retention happen on a background thread (one save in flight).
        """
        self._finish_pending()  # at most one save in flight; its error, if any, is raised here
        with self._mutex:
            plain = plain_metrics(metrics or {})
            now = time.time()
            info = {"manager": 1, "step": step, "metrics": plain, "time": now}
            request = SaveRequest(model, optimizer, scheduler, scaler, components, rng, state, per_rank)
            if self.group is not None:
                return self._save_across_ranks(self.group, step, request, plain, now)
            if per_rank:
                raise ValueError("per_rank= is for managers shared by several ranks; no process group is initialised")
            name = self._check_target(step)
            plan = plan_checkpoint(request, info=info)
            url = f"{self.directory}/{name}"
            if not self.async_save:
                return self._upload(step, url, plan, plain, now)
            staged = self._staging.snapshot(plan)

            def upload() -> CheckpointInfo:
                return self._upload(step, url, staged, plain, now)

            self._pending = self._writer.submit(step, Path(name), upload)
            return self._pending

    def _save_across_ranks(
        self, group: Group, step: int, request: SaveRequest, plain: dict[str, Any], now: float
    ) -> CheckpointInfo | PendingSave[CheckpointInfo]:
        """The distributed protocol at the step's URL (in the background with ``async_save``), then rank 0
        reads back, moves latest and retires."""
        name = self.template.format(step=step)
        url = f"{self.directory}/{name}"
        info = {"manager": 1, "step": step, "metrics": plain, "time": now}

        def make_plan() -> Any:
            if group.is_coordinator:
                self._check_target(step)  # rank 0's view decides; a refusal fails every rank
            return plan_distributed(request, info=info)

        def register(used: Group, _: int) -> CheckpointInfo:
            return self._register_across_ranks(used, step, url, plain, now, lambda: self._register(step, 0, plain, now))

        store = objects.objects_store(url, self.storage_options) if self.incremental else None
        staging = self._staging if self.async_save else None
        job = save_job(url, make_plan, group, register, staging=staging, storage_options=self.storage_options,
                       objects_store=store)  # fmt: skip
        if not self.async_save:
            return job()
        self._pending = self._writer.submit(step, Path(name), job)
        return self._pending

    def _upload(self, step: int, url: str, plan: CheckpointPlan, plain: dict[str, Any], now: float) -> CheckpointInfo:
        """Objects first (incremental: only the new ones), then the checkpoint, then read back and register."""
        written = 0
        if self.incremental:
            plan, written = share_tensors(plan, objects.objects_store(url, self.storage_options))
        written += write_remote_checkpoint(url, plan, self.storage_options)
        return self._register(step, written, plain, now)

    def _collect_objects(self) -> None:
        """Delete objects that no manifest in the run mentions (after retention, and at start-up for what a
        crash left): every ``<folder>/manifest.json`` counts, whatever the folder's name (a renamed checkpoint,
        another template's). While some step's manifest does not parse, nothing is deleted: it may still use
        any of them."""
        if self.damaged:
            return
        with self._mutex:
            store = RemoteStorage(f"{self.directory}/{objects.OBJECTS_DIR}", self.storage_options)
            objects.collect_unused(self.run, store)

    def _check_target(self, step: int) -> str:
        """The step's name, after checking it may be written; nothing is written."""
        if self._token is None:
            raise CheckpointWriteError(self.directory, "this manager is read_only (or closed)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._check_step(step)
        name = self.template.format(step=step)
        if self.run.exists(f"{name}/{MANIFEST_FILE}"):
            raise CheckpointWriteError(
                f"{self.directory}/{name}", "exists, and is not a checkpoint this manager can vouch for"
            )
        return name

    def _register(self, step: int, size: int, plain: dict[str, Any], now: float) -> CheckpointInfo:
        """A committed step read back, then ``latest`` moved to it and retention applied."""
        with self._mutex:
            name = self.template.format(step=step)
            self._read_back(name, step)
            url = f"{self.directory}/{name}"
            self._checkpoints[step] = CheckpointInfo(step=step, path=url, metrics=plain, time=now, size=size)
            with self.run.open_write(LATEST_OBJECT) as sink:
                sink.write(name.encode() + b"\n")
            self._apply_retention(step)
            return self._decorated(self._checkpoints[step], self._best_step(), step)

    def _read_back(self, name: str, step: int) -> dict[str, Any]:
        """The committed manifest of ``step``, checked to describe it and to name a tensor object of its size."""
        where = f"{self.directory}/{name}"
        try:
            with self.run.open_read(f"{name}/{MANIFEST_FILE}") as f:
                manifest = parse_manifest(f.read(), f"{where}/{MANIFEST_FILE}")
            info = manager_info(manifest, Path(name), self.template)
            record = manifest["tensors_file"]
            if info is None or info["step"] != step or self.run.size(f"{name}/{record['name']}") != record["size"]:
                raise CorruptCheckpointError(where, f"does not read back as step {step}")
        except (OSError, CorruptCheckpointError, CheckpointNotFoundError) as exc:
            raise CheckpointWriteError(
                where, f"the new checkpoint does not read back ({exc}); nothing older was deleted"
            ) from exc
        return manifest

    def _apply_retention(self, newest: int) -> None:
        protected = {newest}
        best = self._best_step()
        if best is not None:
            protected.add(best)
        retired = False
        for step in sorted(to_delete(self._candidates(), self.policies, protected=protected)):
            name = self.template.format(step=step)
            members = self._steps().get(name, [])
            foreign = [m for m in members if m != MANIFEST_FILE and not OWN_OBJECT.match(m)]
            if foreign:
                warn(f"kept {self.directory}/{name}: it holds objects the manager did not write ({foreign[:3]})")
                continue
            self.run.delete(f"{name}/{MANIFEST_FILE}")  # uncommitted first: no reader takes it from here on
            del self._checkpoints[step]
            retired = True
            for member in members:
                if member != MANIFEST_FILE:
                    with contextlib.suppress(CheckpointWriteError):
                        self.run.delete(f"{name}/{member}")
        if retired and self.incremental:
            self._collect_objects()

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
        """As :meth:`torchkeep.CheckpointManager.restore`, falling back past damaged checkpoints."""
        if self._pending is not None:
            self._pending.join()  # a save in flight first (its error stays for the next save or wait())
        with self._mutex:
            self.refresh()
            order = self._restore_order(step)
            if self.group is not None:  # every rank restores the checkpoint rank 0 chose
                order = self.group.exchange({"order": order}, self.directory, "choosing the checkpoint")[0]["order"]
            problems = []
            for candidate in order:
                url = f"{self.directory}/{self.template.format(step=candidate)}"
                try:
                    state = load_checkpoint(
                        url,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        scaler=scaler,
                        components=components,
                        rng=rng,
                        map_location=map_location,
                        strict=strict,
                        storage_options=self.storage_options,
                        per_rank=per_rank,
                        process_group=self.group.process_group if self.group is not None else None,
                    )
                except (CorruptCheckpointError, CheckpointNotFoundError, DistributedError) as exc:
                    if not isinstance(step, str):
                        raise
                    problems.append(f"{url}: {exc}")
                    warn(f"skipped {url}: {exc}")
                    continue
                state.setdefault("step", candidate)
                return state
            raise CheckpointNotFoundError(
                self.directory,
                "no checkpoint to restore" + (": none verifies\n" + "\n".join(problems) if problems else ""),
            )
