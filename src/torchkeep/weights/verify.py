"""torchkeep.verify: check every tensor of a weights path against its recorded checksum."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torchkeep.format import deploy
from torchkeep.format.io import verify_tensors
from torchkeep.format.names import refuse_special
from torchkeep.format.pickle.dcp import is_dcp_dir, read_dcp
from torchkeep.storage.remote import is_url
from torchkeep.weights.files import resolve
from torchkeep.weights.legacy import Kind, detect_once, read_raw
from torchkeep.weights.load import (
    check_against_index,
    is_training_checkpoint,
    open_header,
    open_weights_file,
    read_weights,
)


def verify_checkpoint(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[int, int | None]:
    """A torchkeep checkpoint (a folder or a URL) read as load_checkpoint reads it: its manifest, tensor file
    and shared objects, and (saved by several ranks) every rank's and DCP file. Returns the tensors checked
    and, for a distributed checkpoint, how many rank and DCP files."""
    from torchkeep.checkpoint.io import read_checkpoint

    loaded = read_checkpoint(path, storage_options=storage_options)
    parts = None
    if "distributed" in loaded.manifest:
        from torchkeep.distributed.load import verify_parts

        parts = verify_parts(loaded, storage_options)
    return len(loaded.decoder.tensors), parts


def verify(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int | None:
    """Read everything once and check it; returns the number of tensors checked.

    ``progress(bytes checked, total bytes)`` is called as local safetensors files are checked.

    Returns None when no file has checksums (written by another tool): everything was read then, as
    ``load`` reads it (pickles through the allowlist, zip CRCs and sizes checked), so damage still fails.
    Deployment files (TorchScript, .pt2, ONNX) have none: their weights are read whole (zip entries
    CRC-checked), nothing in them run.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: damage, naming the file and the tensor.
    """
    if is_training_checkpoint(path, storage_options):  # a checkpoint: as load_checkpoint checks it
        return verify_checkpoint(path, storage_options)[0]
    if is_url(path):  # s3://... (storage_options for fsspec): every tensor fetched and checked
        from torchkeep.weights.remote import load_url, remote_headers

        found, _ = remote_headers(str(path), storage_options)
        tensors = load_url(str(path), storage_options=storage_options, verify=True)
        return len(tensors) if any(h.checksums is not None for _, h, _ in found) else None
    refuse_special(path)
    seen: dict[str, Kind] = {}  # each file's kind, detected once
    if Path(path).is_file():
        kind = detect_once(os.fspath(path), seen)
        if kind in deploy.DEPLOY_KINDS:
            deploy.read_weights(os.fspath(path), kind)
            return None
        if kind in ("torch", "npy", "npz"):  # read whole, safely: the allowlist, zip CRCs, sizes
            read_raw(os.fspath(path), kind=kind)
            return None
    if is_dcp_dir(path):
        read_dcp(path)
        return None
    files = resolve(path)
    if all(detect_once(files.path(name), seen) == "torch" for name in files.files):  # pytorch_model.bin shards
        read_weights(files, mmap=False, verify=True, seen=seen)  # as load reads them: the index checked too
        return None
    checked = 0
    any_checksums = False
    total = sum(os.path.getsize(files.path(name)) for name in files.files)
    done = 0

    def tensor_checked(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    for name in files.files:
        file_path = files.path(name)
        with open_weights_file(file_path) as f:
            header = open_header(f, file_path)
            check_against_index([e.name for e in header.entries], files.expected, name, file_path)  # as load does
            any_checksums |= header.checksums is not None
            checked += verify_tensors(f, header, file_path, tensor_checked)
    if progress is not None:
        progress(total, total)
    return checked if any_checksums else None
