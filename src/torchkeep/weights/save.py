"""torchkeep.save: a state dict (or a module's) to one safetensors file or a sharded folder."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep import _config
from torchkeep._gc import gc_paused
from torchkeep.errors import CheckpointWriteError, TorchkeepError
from torchkeep.format.io import write_plan
from torchkeep.format.layout import RESERVED_PREFIX, plan_file
from torchkeep.format.sharding import (
    index_document,
    is_weights_file,
    parse_index,
    parse_size,
    shard_names,
    split_shards,
)
from torchkeep.format.staging import staged_digests
from torchkeep.state.tensors import PreparedTensors, prepare, state_and_metadata
from torchkeep.storage.base import Storage
from torchkeep.storage.local import LocalStorage, remove_stale_temporaries, write_errors
from torchkeep.storage.remote import RemoteStorage, is_url, split_url
from torchkeep.weights.files import FOREIGN_SUFFIXES, SAFETENSORS_SUFFIX


@gc_paused
def save(
    obj: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Save weights safely: no pickle, atomic, checksummed.

    Args:
        obj: an ``nn.Module`` (its state dict, without DataParallel/DDP/compile prefixes) or a
            mapping of names to tensors.
        path: a ``.safetensors`` file, or a folder (then ``model.safetensors`` inside it, or the
            Hugging Face sharded layout when ``max_shard_size`` splits it).
        metadata: string pairs kept in each file's header.
        max_shard_size: bytes per shard, as an int or a string such as ``"500MB"`` or ``"2GiB"``.
        storage_options: for a URL (``s3://bucket/model.safetensors``, ``memory://...``): passed to
            fsspec (credentials, ``endpoint_url``...). Each object is published whole or not at all; a
            sharded folder's index is written last.

    Raises:
        UnsupportedTensorError: a tensor the format cannot hold (sparse, quantized, ...).
        ValueError: bad metadata, a bad size, or a file name that is not ``.safetensors``.

    Example:
        >>> torchkeep.save(model, "model.safetensors", metadata={"epoch": "3"})
    """
    meta = _check_metadata(metadata)
    state, reserved = state_and_metadata(obj)  # reserved: how torch.ao quantized entries were stored, if any
    prepared = prepare(state, keep_devices=True)  # GPU tensors are staged piece by piece as they are written
    meta.update(reserved)
    if is_url(path):
        url = str(path)
        limit = parse_size(max_shard_size) if max_shard_size is not None else None
        if url.endswith(SAFETENSORS_SUFFIX) and limit is None:
            folder, name = split_url(url)
            write_weights(RemoteStorage(folder, storage_options), name, prepared, meta)
        else:
            save_folder(RemoteStorage(url, storage_options), prepared, meta, limit)
        return
    target = Path(path)
    if target.name.endswith(SAFETENSORS_SUFFIX) and max_shard_size is None:
        if target.is_dir():
            raise CheckpointWriteError(target, "is a directory; a .safetensors file name is needed")
        with write_errors(target.parent, "creating the folder"):
            target.parent.mkdir(parents=True, exist_ok=True)
        write_weights(LocalStorage(target.parent), target.name, prepared, meta)
        remove_stale_temporaries(target.parent, lambda base: base == target.name)  # what killed saves left
        return
    if target.suffix in FOREIGN_SUFFIXES or target.name.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(
            f"{target}: torchkeep writes safetensors; name the file '*.safetensors', or give a folder"
            + (" (max_shard_size needs a folder)" if max_shard_size is not None else "")
        )
    if target.exists() and not target.is_dir():
        raise CheckpointWriteError(target, "exists and is not a folder; give a folder, or a *.safetensors file name")
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    save_folder(LocalStorage(target), prepared, meta, limit)
    remove_stale_temporaries(target, is_weights_file)  # what killed saves left


def _live_shards(storage: Storage) -> set[str]:
    """The shard names the folder's current index refers to (none if it has no readable index)."""
    if not storage.exists(_config.INDEX_FILE_NAME):
        return set()
    try:
        with storage.open_read(_config.INDEX_FILE_NAME) as f:
            return set(parse_index(f.read(_config.MAX_JSON_BYTES), _config.INDEX_FILE_NAME).values())
    except (TorchkeepError, OSError):
        return set(storage.list())  # unreadable: assume every file may be live, so none is overwritten


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str; got {key!r}: {value!r} (use json.dumps for values)")
        if key.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r}: the prefix {RESERVED_PREFIX!r} is reserved for torchkeep")
    return meta


def write_weights(storage: Storage, name: str, prepared: PreparedTensors, metadata: Mapping[str, str]) -> int:
    """Write one file through ``storage``; returns its size."""
    digests = staged_digests(prepared.tensors)  # tensors on a GPU: hashed through small pinned buffers
    plan = plan_file(prepared.tensors, aliases=prepared.aliases, metadata=metadata, digests=digests)
    with storage.open_write(name) as sink:
        write_plan(plan, sink)
    return plan.size


def save_folder(
    storage: Storage, prepared: PreparedTensors, metadata: Mapping[str, str], max_shard_size: int | None
) -> list[str]:
    """Write ``model.safetensors``, or shards then the index (the commit point), then drop stale files.

    Other torchkeep writers of the folder wait (``storage.exclusive()``), so two saves never delete each
    other's shards. A save that fails leaves the folder's previous weights as they were, and none of its
    own shards behind.
    """
    names = list(prepared.tensors)
    groups = (
        split_shards(
            names, lambda n: prepared.tensors[n].numel() * prepared.tensors[n].element_size(), max_shard_size or 0
        )
        if max_shard_size is not None
        else [names]
    )
    with storage.exclusive():
        files = shard_names(len(groups))
        live = _live_shards(storage)
        if len(files) > 1 and set(files) & live:
            tag = uuid.uuid4().hex[:6]
            files = [name.removesuffix(SAFETENSORS_SUFFIX) + f"-r{tag}{SAFETENSORS_SUFFIX}" for name in files]
        weight_map: dict[str, str] = {}
        shards = []
        for file, group in zip(files, groups, strict=True):
            members = set(group)
            shards.append(
                PreparedTensors(
                    tensors={n: prepared.tensors[n] for n in group},
                    aliases={a: t for a, t in prepared.aliases.items() if t in members},
                )
            )
            weight_map.update(dict.fromkeys(group, file))
        committed = False  # once the index is in place, its shards are the folder's weights
        try:
            _write_shards(storage, files, shards, metadata)
            if len(files) > 1:
                # Every shard is there before the index names them: a folder removed or emptied meanwhile
                # (each write would make it again) fails the save instead of committing an index of ghosts.
                gone = [f for f in files if not storage.exists(f)]
                if gone:
                    raise CheckpointWriteError(
                        storage.local_path(gone[0]) or gone[0],
                        f"{len(gone)} of the {len(files)} shards written disappeared before the index was "
                        "written (the folder was removed or changed during the save); nothing was committed",
                    )
                with storage.open_write(_config.INDEX_FILE_NAME) as sink:
                    sink.write(index_document(weight_map, prepared.nbytes))
                    committed = True  # set before the rename: a failure after it may have published the index
        except BaseException:
            if len(files) > 1:  # this save's shards (never a live one: those names were avoided above)
                if committed and storage.exists(_config.INDEX_FILE_NAME):
                    files = [f for f in files if f not in _live_shards(storage)]  # the index in place names them
                for file in files:
                    with contextlib.suppress(Exception):
                        storage.delete(file)
            raise
        written = [*files, _config.INDEX_FILE_NAME] if len(files) > 1 else list(files)
        # The old index goes first: it is what readers follow, so a cut-short cleanup never leaves an
        # index naming deleted shards. Only the folder's own level is looked at, never below it.
        stale = [n for n in storage.list(recursive=False) if is_weights_file(n) and n not in written]
        for name in sorted(stale, key=lambda n: n != _config.INDEX_FILE_NAME):
            storage.delete(name)
    return written


def _write_shards(
    storage: Storage, files: list[str], shards: list[PreparedTensors], metadata: Mapping[str, str]
) -> None:
    """Shards are written by a few threads (hashing and writing release the GIL); each writes from the
    tensors themselves, so nothing is staged."""
    with ThreadPoolExecutor(max_workers=max(1, min(_config.IO_THREADS, len(shards)))) as pool:
        for future in [pool.submit(write_weights, storage, f, s, metadata) for f, s in zip(files, shards, strict=True)]:
            future.result()
