"""Writing a checkpoint from every rank of a process group, committed once, by rank 0, or not at all.

The protocol (docs/FORMAT.md, "Distributed checkpoints"), each step ending in an exchange where
every rank says how its part went, so that one failing rank fails the save on all of them:

1. plan: every rank takes its state; rank 0 makes the temporary folder beside the target; the ranks
   check they save to the same place;
2. every rank writes its own ``rank-NNNNN.safetensors``; rank 0 the shared ``tensors.safetensors``;
3. sharded tensors, if any: ``torch.distributed.checkpoint.save`` (every rank its shards, in
   parallel); then each rank hashes a share of the DCP files, for the manifest;
4. rank 0 writes the manifest (naming every file, its size and checksum), syncs the folder and
   renames it into place: the commit. Until then the target (and ``latest``) is untouched; after a
   failure the temporary folder is removed (or, after a crash, by the next manager's start-up).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchkeep import _config
from torchkeep.checkpoint.background import StagingBuffers
from torchkeep.checkpoint.io import share_tensors
from torchkeep.checkpoint.layout import MANIFEST_FILE, TENSORS_FILE, is_checkpoint_file, manifest_bytes
from torchkeep.checkpoint.sharded import describe_stored, layout_of
from torchkeep.distributed.group import Group, no_message
from torchkeep.distributed.plan import RANK_FILE, DistributedPlan, snapshot
from torchkeep.errors import CheckpointWriteError
from torchkeep.storage.base import Storage
from torchkeep.storage.local import (
    LocalStorage,
    commit_dir,
    fsync_dir,
    refuse_foreign,
    temporary_sibling,
    write_errors,
)
from torchkeep.storage.remote import RemoteStorage, is_url
from torchkeep.weights.save import write_weights

DCP_METADATA = ".metadata"


class LocalPlace:
    """A folder every rank sees: written as a temporary sibling, committed by renaming it into place."""

    def __init__(self, target: Path, temp_name: str | None) -> None:
        self.target = Path(os.path.abspath(target))  # "." and "..": a name to put a temporary beside
        self.temp = self.target.parent / temp_name if temp_name else temporary_sibling(self.target)
        self.storage = LocalStorage(self.temp)
        self.made = False
        self.dcp_folder = ""  # the DCP files sit beside the manifest (the folder is also a DCP checkpoint)

    def key(self) -> str:
        return self.temp.name

    def rank_file(self, rank: int) -> str:
        return RANK_FILE.format(rank=rank)

    def tensors_file(self) -> str:
        return TENSORS_FILE

    def create(self) -> None:
        refuse_foreign(self.target, is_checkpoint_file)  # a checkpoint folder is replaced, nothing else
        with write_errors(self.target, "creating the checkpoint folder"):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.temp.mkdir()
            self.made = True

    def dcp_writer(self) -> Any:
        return FileSystemWriter(self.temp, thread_count=_config.IO_THREADS, sync_files=True)

    def describe(self, name: str) -> dict[str, Any]:
        with write_errors(self.temp / name, "hashing the written file"):
            return describe_stored(self.storage, name)

    def commit(self, manifest: bytes) -> None:
        with self.storage.open_write(MANIFEST_FILE) as sink:
            sink.write(manifest)
        with write_errors(self.target, "syncing the checkpoint folder"):
            fsync_dir(self.temp)
        commit_dir(self.temp, self.target, owned=is_checkpoint_file)
        self.made = False

    def abandon(self) -> None:
        if self.made:
            shutil.rmtree(self.temp, ignore_errors=True)


class RemotePlace:
    """A URL (object storage): every object written under a name of this save, the manifest last (the commit);
    the previous checkpoint's objects deleted after."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, save_id: str | None) -> None:
        self.url = url.rstrip("/")
        self.options = dict(storage_options or {})
        self.storage = RemoteStorage(self.url, self.options)
        self.save_id = save_id or uuid.uuid4().hex[:12]
        self.dcp_folder = f"dcp-{self.save_id}"
        self.made = False

    def key(self) -> str:
        return self.save_id

    def rank_file(self, rank: int) -> str:
        return f"rank-{rank:05d}-{self.save_id}.safetensors"

    def tensors_file(self) -> str:
        return f"tensors-{self.save_id}.safetensors"

    def create(self) -> None:
        self.made = True  # objects appear as they are written; nothing to make first

    def dcp_writer(self) -> Any:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(f"{self.url}/{self.dcp_folder}", thread_count=_config.IO_THREADS, **self.options)

    def describe(self, name: str) -> dict[str, Any]:
        """An object's size and checksum, read back (streamed) from the store."""
        try:
            return describe_stored(self.storage, f"{self.dcp_folder}/{name}")
        except Exception as exc:
            raise CheckpointWriteError(f"{self.url}/{self.dcp_folder}/{name}", f"reading back failed: {exc}") from exc

    def commit(self, manifest: bytes) -> None:
        previous = _previous_objects(self.storage)
        with self.storage.open_write(MANIFEST_FILE) as sink:
            sink.write(manifest)
        self.made = False
        for name in previous:  # the replaced checkpoint's objects (their names carry its own save id)
            with contextlib.suppress(Exception):
                self.storage.delete(name)

    def abandon(self) -> None:
        if self.made:
            for name in self.storage.list():
                if self.save_id in name:
                    with contextlib.suppress(Exception):
                        self.storage.delete(name)


def _previous_objects(storage: RemoteStorage) -> set[str]:
    """The objects the committed manifest at ``storage`` names (before it is replaced)."""
    from torchkeep.checkpoint.layout import parse_manifest
    from torchkeep.checkpoint.sharded import parse_section

    try:
        with storage.open_read(MANIFEST_FILE) as f:
            manifest = parse_manifest(f.read(_config.MAX_JSON_BYTES + 1), f"{storage.url}/{MANIFEST_FILE}")
        section = parse_section(manifest, f"{storage.url}/{MANIFEST_FILE}")
    except Exception:  # nothing committed there, or unreadable: nothing to clean
        return set()
    names = {manifest["tensors_file"]["name"]}
    if section is not None:
        names |= {entry["file"]["name"] for entry in section.ranks}
        names |= {f"{section.dcp_folder}/{n}" if section.dcp_folder else n for n in section.dcp_files}
    return names


Place = LocalPlace | RemotePlace
T = TypeVar("T")


def save_distributed(
    target: str | Path,
    make_plan: Callable[[], DistributedPlan],
    group: Group,
    storage_options: Mapping[str, Any] | None = None,
    objects_store: Storage | None = None,
) -> int:
    """Run the save protocol on this rank; returns the bytes this rank wrote.

    ``objects_store``: an incremental run's objects; rank 0 stores each large shared tensor there once
    (by content) and the manifest lists it, before the commit.

    Raises:
        DistributedError: on every rank, when any rank failed (naming it and why) or stopped answering.
    """
    remote = is_url(target)
    place: Place = RemotePlace(str(target), storage_options, None) if remote else LocalPlace(Path(target), None)

    def prepare() -> DistributedPlan:
        plan = make_plan()
        if group.is_coordinator:
            place.create()
        return plan

    where = str(target).rstrip("/") if remote else os.path.abspath(target)
    try:
        plan, answers = group.step(
            target,
            "planning the checkpoint",
            prepare,
            lambda plan: {"target": where, "key": place.key(), "sharded": sorted(plan.sharded)},
        )
        _check_same(group, target, answers)
        if not group.is_coordinator:  # rank 0's names are the ones used
            place = RemotePlace(where, storage_options, answers[0]["key"]) if remote else LocalPlace(
                Path(target), answers[0]["key"]
            )  # fmt: skip
        storage = place.storage
        own_name = place.rank_file(group.rank)

        shared = plan.shared

        def write_own() -> int:
            nonlocal shared
            written = write_weights(storage, own_name, plan.own.tensors, {})
            if group.is_coordinator:
                if objects_store is not None:
                    shared, stored = share_tensors(shared, objects_store)
                    written += stored
                written += write_weights(storage, place.tensors_file(), shared.tensors, {})
            return written

        written, fragments = group.step(
            target,
            "writing each rank's files",
            write_own,
            lambda size: {"own": {"file": {"name": own_name, "size": storage.size(own_name)}, **plan.own.node}},
        )
        dcp_files: dict[str, Any] = {}
        layout: dict[str, Any] = {}
        if plan.sharded:
            (_, layout), digests = group.step(
                target, "writing the sharded tensors (DCP)", lambda: _write_dcp(plan, place, group), _files_message
            )
            for answer in digests:
                dcp_files.update(answer["files"])

        def commit() -> None:
            if not group.is_coordinator:
                return
            manifest = dict(shared.manifest)
            dcp = {"files": dcp_files, "layout": layout, **({"folder": place.dcp_folder} if place.dcp_folder else {})}
            manifest["distributed"] = {
                "world_size": group.size,
                "ranks": [answer["own"] for answer in fragments],
                **({"dcp": dcp} if plan.sharded else {}),
            }
            tensors = {"name": place.tensors_file(), "size": storage.size(place.tensors_file())}
            place.commit(manifest_bytes(manifest, tensors))

        group.step(target, "committing the checkpoint", commit, no_message)
        return written
    finally:
        if group.is_coordinator:
            place.abandon()


def save_job(
    target: str | Path,
    make_plan: Callable[[], DistributedPlan],
    group: Group,
    then: Callable[[Group, int], T],
    *,
    staging: StagingBuffers | None,
    storage_options: Mapping[str, Any] | None = None,
    objects_store: Storage | None = None,
) -> Callable[[], T]:
    """The save across ranks as a job: run it at once (``staging`` None) or on a writer thread.

    With ``staging``, the plan is made and copied into the buffers now, while the caller waits, and
    agreed on at once: a rank that cannot plan fails every rank here instead of leaving the others
    waiting in the background. The job then writes on the ranks' background group, so its collectives
    never meet the training's. ``then(group, bytes_written)`` runs after the commit, on the save's group.
    """
    if staging is None:

        def blocking() -> T:
            return then(group, save_distributed(target, make_plan, group, storage_options, objects_store))

        return blocking
    buffers = staging
    staged, _ = group.step(target, "planning the checkpoint", lambda: snapshot(buffers, make_plan()), no_message)
    background = group.background()

    def in_background() -> T:
        written = save_distributed(target, lambda: staged, background, storage_options, objects_store)
        return then(background, written)

    return in_background


def _check_same(group: Group, target: str | Path, answers: list[dict[str, Any]]) -> None:
    from torchkeep.errors import DistributedError

    targets = {a["target"] for a in answers}
    if len(targets) > 1:
        raise DistributedError(target, f"the ranks save to different paths ({sorted(targets)}); give every rank one")
    sharded = [a["sharded"] for a in answers]
    if any(s != sharded[0] for s in sharded):
        differing = [rank for rank, s in enumerate(sharded) if s != sharded[0]]
        raise DistributedError(
            target,
            f"rank(s) {differing} hold other sharded tensors than rank 0; every rank must save the same model, "
            "sharded the same way",
            ranks=tuple(differing),
        )


def _files_message(result: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return {"files": result[0]}


def _write_dcp(plan: DistributedPlan, place: Place, group: Group) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's collective save of the sharded tensors, then this rank's share of the files hashed."""
    writer = place.dcp_writer()
    try:
        with warnings.catch_warnings():  # without a group torch warns it assumes one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            metadata = dcp_save(
                plan.sharded,
                storage_writer=writer,
                process_group=group.process_group,
                no_dist=group.process_group is None,
            )
    except CheckpointException as exc:  # a BaseException in torch: turned into an ordinary failure
        failures = getattr(exc, "failures", {}) or {}
        detail = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
        raise CheckpointWriteError(
            str(place.storage.url if isinstance(place, RemotePlace) else place.temp),
            f"torch.distributed.checkpoint.save failed: {detail or exc}",
        ) from None
    names = sorted({info.relative_path for info in (metadata.storage_data or {}).values()} | {DCP_METADATA})
    files = {name: place.describe(name) for name in names[group.rank :: group.size]}
    return files, layout_of(metadata) if group.is_coordinator else {}
