"""Training checkpoints at an fsspec URL: the manifest, written last, is the commit point.

An object store has no atomic rename of a folder. The tensor file is written under a new name each
time (``tensors-<id>.safetensors``), then the manifest that names it replaces the old one in one PUT:
a reader sees the old checkpoint or the new one, whole. The tensor file the old manifest named is
deleted after (a crash in between leaves an unreferenced file, never a damaged checkpoint).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep import _config
from torchkeep.checkpoint import objects
from torchkeep.checkpoint.layout import MANIFEST_FILE, CheckpointPlan, manifest_bytes, parse_manifest
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError, TorchkeepError
from torchkeep.storage.remote import RemoteStorage
from torchkeep.weights.remote import load_url
from torchkeep.weights.save import write_weights


def _manifest(storage: RemoteStorage) -> dict[str, Any]:
    where = f"{storage.url}/{MANIFEST_FILE}"
    if storage.size(MANIFEST_FILE) > _config.MAX_JSON_BYTES:
        raise CorruptCheckpointError(where, f"is over the limit of {_config.MAX_JSON_BYTES} bytes")
    with storage.open_read(MANIFEST_FILE) as f:
        return parse_manifest(f.read(), where)


def write_remote_checkpoint(url: str, plan: CheckpointPlan, storage_options: Mapping[str, Any] | None) -> int:
    """Write the tensor file under a fresh name, then the manifest (the commit point); returns bytes written."""
    storage = RemoteStorage(url, storage_options)
    previous = None
    if storage.exists(MANIFEST_FILE):
        with contextlib.suppress(TorchkeepError):
            previous = _manifest(storage)["tensors_file"]["name"]
    name = f"tensors-{uuid.uuid4().hex[:12]}.safetensors"
    size = write_weights(storage, name, plan.tensors, {})
    manifest = manifest_bytes(plan.manifest, {"name": name, "size": size})
    with storage.open_write(MANIFEST_FILE) as sink:
        sink.write(manifest)
    if previous is not None and previous != name:
        with contextlib.suppress(TorchkeepError):
            storage.delete(previous)
    return size + len(manifest)


def read_remote_checkpoint(
    url: str, storage_options: Mapping[str, Any] | None, *, verify: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The validated manifest and every tensor (fetched, checksums verified) of the checkpoint at ``url``."""
    storage = RemoteStorage(url, storage_options)
    if not storage.exists(MANIFEST_FILE):
        raise CheckpointNotFoundError(url, f"no {MANIFEST_FILE}: not a checkpoint, or one never committed")
    manifest = _manifest(storage)
    record = manifest["tensors_file"]
    if not storage.exists(record["name"]):
        raise CorruptCheckpointError(url, f"{record['name']} is missing")
    actual = storage.size(record["name"])
    if actual != record["size"]:
        raise CorruptCheckpointError(
            f"{storage.url}/{record['name']}",
            f"size {actual} differs from the {record['size']} recorded in the manifest",
        )
    tensors = load_url(f"{storage.url}/{record['name']}", storage_options=storage_options, verify=verify)
    shared = manifest.get("shared_tensors")
    if shared is not None:  # an incremental checkpoint: its large tensors are objects of the run
        store = objects.objects_store(url, storage_options)
        for name, entry in objects.check_entries(shared, f"{storage.url}/{MANIFEST_FILE}").items():
            if name in tensors:
                raise CorruptCheckpointError(url, f"tensor {name!r:.80} is both in the file and shared")
            tensors[name] = objects.read(store, name, entry, verify=verify)
    return manifest, tensors
