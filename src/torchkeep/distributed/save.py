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

import mmap
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from torchkeep import _config
from torchkeep.checkpoint.layout import CHECKSUM_KEY, MANIFEST_FILE, TENSORS_FILE, manifest_bytes
from torchkeep.checkpoint.sharded import layout_of
from torchkeep.distributed.group import Group
from torchkeep.distributed.plan import RANK_FILE, DistributedPlan
from torchkeep.errors import CheckpointWriteError
from torchkeep.format.layout import digest
from torchkeep.storage.local import LocalStorage, commit_dir, fsync_dir, temporary_sibling, write_errors
from torchkeep.weights.save import write_weights

DCP_METADATA = ".metadata"


def save_distributed(target: Path, make_plan: Callable[[], DistributedPlan], group: Group) -> int:
    """Run the save protocol on this rank; returns the bytes this rank wrote.

    Raises:
        DistributedError: on every rank, when any rank failed (naming it and why) or stopped answering.
    """
    temp = temporary_sibling(target)  # rank 0's name is the one used
    made = False

    def prepare() -> DistributedPlan:
        nonlocal made
        plan = make_plan()
        if group.is_coordinator:
            with write_errors(target, "creating the checkpoint folder"):
                target.parent.mkdir(parents=True, exist_ok=True)
                temp.mkdir()
                made = True
        return plan

    try:
        plan, answers = group.step(
            target,
            "planning the checkpoint",
            prepare,
            lambda plan: {"target": os.path.abspath(target), "temp": temp.name, "sharded": sorted(plan.sharded)},
        )
        _check_same(group, target, answers)
        folder = target.parent / answers[0]["temp"]
        storage = LocalStorage(folder)

        def write_own() -> int:
            written = write_weights(storage, RANK_FILE.format(rank=group.rank), plan.own.tensors, {})
            if group.is_coordinator:
                written += write_weights(storage, TENSORS_FILE, plan.shared.tensors, {})
            return written

        written, fragments = group.step(
            target,
            "writing each rank's files",
            write_own,
            lambda size: {
                "own": {
                    "file": {
                        "name": RANK_FILE.format(rank=group.rank),
                        "size": storage.size(RANK_FILE.format(rank=group.rank)),
                    },
                    **plan.own.node,
                },
                "shared_size": size,
            },
        )
        dcp_files: dict[str, Any] = {}
        layout: dict[str, Any] = {}
        if plan.sharded:
            (_, layout), digests = group.step(
                target, "writing the sharded tensors (DCP)", lambda: _write_dcp(plan, folder, group), _files_message
            )
            for answer in digests:
                dcp_files.update(answer["files"])

        def commit() -> None:
            if not group.is_coordinator:
                return
            manifest = dict(plan.shared.manifest)
            manifest["distributed"] = {
                "world_size": group.size,
                "ranks": [answer["own"] for answer in fragments],
                **({"dcp": {"files": dcp_files, "layout": layout}} if plan.sharded else {}),
            }
            tensors = {"name": TENSORS_FILE, "size": storage.size(TENSORS_FILE)}
            with storage.open_write(MANIFEST_FILE) as sink:
                sink.write(manifest_bytes(manifest, tensors))
            with write_errors(target, "syncing the checkpoint folder"):
                fsync_dir(folder)
            commit_dir(folder, target)

        group.step(target, "committing the checkpoint", commit, lambda _: {})
        made = False
        return written
    finally:
        if made:
            shutil.rmtree(temp, ignore_errors=True)


def _check_same(group: Group, target: Path, answers: list[dict[str, Any]]) -> None:
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


def _write_dcp(plan: DistributedPlan, folder: Path, group: Group) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's collective save of the sharded tensors, then this rank's share of the files hashed."""
    writer = FileSystemWriter(folder, thread_count=_config.IO_THREADS, sync_files=True)
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
        raise CheckpointWriteError(folder, f"torch.distributed.checkpoint.save failed: {detail or exc}") from None
    names = sorted({info.relative_path for info in (metadata.storage_data or {}).values()} | {DCP_METADATA})
    files = {name: _describe(folder / name) for name in names[group.rank :: group.size]}
    return files, layout_of(metadata) if group.is_coordinator else {}


def _describe(path: Path) -> dict[str, Any]:
    """A file's size and checksum, hashed from the page cache through a read-only mapping."""
    with write_errors(path, "hashing the written file"), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {"size": 0, CHECKSUM_KEY: digest(b"")}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return {"size": size, CHECKSUM_KEY: digest(mapped)}
