"""The ``distributed`` part of a checkpoint's manifest, and reading its sharded tensors in one process.

A checkpoint saved by several ranks (format version 3) records, beside the usual fields::

    "distributed": {
      "world_size": 2,
      "ranks": [{"file": {"name": "rank-00000.safetensors", "size": 1234}, "rng": ..., "objects": {...},
                 "state": ...}, ...],                       # one per rank, in rank order
      "dcp": {"files": {".metadata": {"size": 901, "xxh3_64": "..."}, "__0_0.distcp": {...}, ...},
            "layout": {"model.0.weight": {"dtype": "F32", "shape": [8, 6],
                                          "chunks": [[[0, 0], [4, 6], "__0_0.distcp", 0, 1234], ...]}, ...}}
    }

``dcp`` is there when tensors were saved sharded; the folder is then also a DCP checkpoint, and the
manifest refers to each such tensor by ``{"$dcp": key}``, and ``layout`` repeats DCP's metadata as JSON
(each tensor's chunks: offsets, sizes, file, byte offset, byte length), so a sharded load builds DCP's
``Metadata`` from checked JSON instead of unpickling ``.metadata``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchkeep.checkpoint.layout import CHECKSUM_KEY
from torchkeep.checkpoint.objects import stored_digest
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.dtypes import CODE_TO_DTYPE, DTYPE_TO_CODE
from torchkeep.format.jsondoc import expect
from torchkeep.format.names import is_plain_name, member
from torchkeep.format.pickle.dcp import Chunk, cover_exactly, read_dcp
from torchkeep.storage.base import Storage
from torchkeep.storage.local import LocalStorage
from torchkeep.storage.remote import RemoteStorage, is_url
from torchkeep.weights.load import read_file
from torchkeep.weights.remote import load_url


def layout_of(metadata: Any) -> dict[str, Any]:
    """DCP's ``Metadata`` of a save (tensors only: torchkeep sends DCP nothing else) as JSON."""
    from torch.distributed.checkpoint.metadata import MetadataIndex  # DCP: imported when used (slow)

    layout: dict[str, Any] = {}
    for key, entry in metadata.state_dict_metadata.items():
        chunks = []
        for chunk in entry.chunks:
            info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            chunks.append([list(chunk.offsets), list(chunk.sizes), info.relative_path, info.offset, info.length])
        layout[key] = {"dtype": DTYPE_TO_CODE[entry.properties.dtype], "shape": list(entry.size), "chunks": chunks}
    return layout


def layout_metadata(layout: Any, files: dict[str, dict[str, Any]], path: str) -> Any:
    """DCP's ``Metadata`` rebuilt from a manifest's ``layout``, checked as the ``.metadata`` reader checks:
    known dtypes, chunks inside their tensor that tile it exactly once, byte ranges inside listed files."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    expect(isinstance(layout, dict), path, "manifest field 'distributed.dcp.layout' is not an object")
    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for key, entry in layout.items():
        try:
            dtype = CODE_TO_DTYPE[entry["dtype"]]
            shape = torch.Size(_ints(entry["shape"]))
            chunks = []
            for offsets, sizes, file, start, length in entry["chunks"]:
                offsets, sizes = _ints(offsets), _ints(sizes)
                info = files[file] if is_plain_name(file) else None
                ok = (
                    info is not None
                    and len(offsets) == len(sizes) == len(shape)
                    and all(o + n <= d for o, n, d in zip(offsets, sizes, shape, strict=True))
                    and type(start) is int
                    and type(length) is int
                    and start >= 0
                    and start + length <= info["size"]
                    and math.prod(sizes) * dtype.itemsize <= length
                )
                if not ok:
                    raise ValueError(f"chunk at {offsets} of {sizes} in {file!r:.80} does not fit")
                chunks.append(Chunk(tuple(offsets), tuple(sizes), None))  # type: ignore[arg-type]
                index = MetadataIndex(key, torch.Size(offsets))
                storage[index] = _StorageInfo(relative_path=file, offset=start, length=length)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(path, f"layout of the sharded tensor is malformed: {exc}", key=key) from exc
        if sum(math.prod(c.sizes) for c in chunks) != math.prod(shape) or not cover_exactly(shape, chunks):
            raise CorruptCheckpointError(path, "its chunks do not tile its shape exactly once", key=key)
        entries[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=shape,
            chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in chunks],
        )
    return Metadata(state_dict_metadata=entries, storage_data=storage)


def _ints(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{value!r:.80} is not a list of non-negative ints")
    return value


@dataclass(frozen=True)
class Section:
    """A validated ``distributed`` manifest field."""

    world_size: int
    ranks: list[dict[str, Any]]
    dcp_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    dcp_layout: Any = None  # the JSON layout of the sharded tensors (None: read .metadata)
    dcp_folder: str = ""  # where the DCP files are, inside the checkpoint ("": beside the manifest)

    @property
    def sharded(self) -> bool:
        return bool(self.dcp_files)


def parse_section(manifest: dict[str, Any], path: str) -> Section | None:
    """The manifest's ``distributed`` field, checked; None for a single-process checkpoint."""
    raw = manifest.get("distributed")
    if raw is None:
        return None
    expect(isinstance(raw, dict), path, "manifest field 'distributed' is not an object")
    size = raw.get("world_size")
    expect(type(size) is int and size >= 1, path, f"manifest records world size {size!r}, not a positive int")
    ranks = raw.get("ranks")
    expect(
        isinstance(ranks, list) and len(ranks) == size and all(isinstance(r, dict) for r in ranks),
        path,
        f"manifest records {size} ranks but not one entry for each",
    )
    for rank, entry in enumerate(ranks):
        file = entry.get("file")
        expect(
            isinstance(file, dict) and is_plain_name(file.get("name")) and type(file.get("size")) is int,
            path,
            f"manifest entry of rank {rank} names no plain file with a size",
        )
    files: dict[str, dict[str, Any]] = {}
    if "dcp" in raw:
        dcp = raw["dcp"]
        listed = dcp.get("files") if isinstance(dcp, dict) else None
        if not isinstance(listed, dict) or not listed:
            raise CorruptCheckpointError(path, "manifest field 'distributed.dcp' lists no files")
        for name, info in listed.items():
            expect(
                is_plain_name(name)
                and isinstance(info, dict)
                and type(info.get("size")) is int
                and isinstance(info.get(CHECKSUM_KEY), str),
                path,
                f"manifest lists DCP file {name!r:.80} without a plain name, a size and a checksum",
            )
        folder = dcp.get("folder", "")
        expect(
            folder == "" or is_plain_name(folder), path, f"manifest names DCP folder {folder!r:.80}, not a plain name"
        )
        return Section(size, ranks, listed, dcp.get("layout"), folder)
    return Section(size, ranks, files)


def describe_stored(storage: Storage, name: str) -> dict[str, Any]:
    """A stored file's size and checksum, as a manifest records them: hashed through a read-only mapping
    of the page cache on a disk, streamed from an object store."""
    size, checksum = stored_digest(storage, name)
    return {"size": size, CHECKSUM_KEY: checksum}


def verify_file(root: Path, name: str, info: dict[str, Any], manifest_path: str) -> None:
    """A file of the checkpoint has the size and checksum the manifest records.

    Raises:
        CorruptCheckpointError: missing, truncated, or changed since it was written.
    """
    path = member(root, name, manifest_path, what="checkpoint file")
    if not path.is_file():
        raise CorruptCheckpointError(path, "is missing: the checkpoint is incomplete")
    size = path.stat().st_size
    if size != info["size"]:  # fail fast, before hashing
        raise CorruptCheckpointError(path, f"size {size} differs from the {info['size']} recorded in the manifest")
    _check_description(str(path), describe_stored(LocalStorage(root), name), info)


def _check_description(where: str, actual: dict[str, Any], info: dict[str, Any]) -> None:
    if actual["size"] != info["size"]:
        raise CorruptCheckpointError(
            where, f"size {actual['size']} differs from the {info['size']} recorded in the manifest"
        )
    if actual[CHECKSUM_KEY] != info[CHECKSUM_KEY]:
        raise CorruptCheckpointError(where, "checksum mismatch: the file is damaged or was changed after the save")


class FullTensors:
    """Sharded tensors reassembled whole, in one process (no process group): for inference, export,
    consolidation. Every DCP file is verified first; DCP's reader (files or fsspec) then fills whole tensors
    from the manifest's checked JSON layout (torchkeep's static DCP reader for folders saved without one)."""

    def __init__(self, where: Where, section: Section, manifest_path: str) -> None:
        self.where = where
        self.dcp = Where(where.join(section.dcp_folder), where.storage_options)
        self.section = section
        self.manifest_path = manifest_path
        self._tensors: dict[str, Any] | None = None

    def __call__(self, key: str) -> torch.Tensor:
        if self._tensors is None:
            for name, info in self.section.dcp_files.items():
                self.dcp.verify(name, info, self.manifest_path)
            self._tensors = self._read()
        value = self._tensors.get(key)
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                self.where.base, f"the sharded tensors lack {key!r:.80}, which the manifest names"
            )
        return value

    def _read(self) -> dict[str, Any]:
        if self.section.dcp_layout is None:  # saved before the manifest recorded the layout
            if self.dcp.remote:
                raise CorruptCheckpointError(self.manifest_path, "a sharded checkpoint at a URL without a layout")
            return read_dcp(self.dcp.base)
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        metadata = layout_metadata(self.section.dcp_layout, self.section.dcp_files, self.manifest_path)
        whole = {
            key: torch.empty(entry.size, dtype=entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
        }
        with warnings.catch_warnings():  # torch warns that it assumes one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(whole, storage_reader=self.dcp.dcp_reader("", metadata), no_dist=True)
        return whole


@dataclass(frozen=True)
class Where:
    """A checkpoint's location, a folder or a URL, and how its files are reached there."""

    base: str
    storage_options: Mapping[str, Any] | None = None

    @property
    def remote(self) -> bool:
        return is_url(self.base)

    def join(self, *names: str) -> str:
        return "/".join([self.base.rstrip("/"), *(n for n in names if n)])

    def verify(self, name: str, info: dict[str, Any], manifest_path: str) -> None:
        """A file's size and checksum against the manifest's record (streamed from a store)."""
        if not self.remote:
            verify_file(Path(self.base), name, info, manifest_path)
            return
        storage = RemoteStorage(self.base, self.storage_options)
        if not storage.exists(name):
            raise CorruptCheckpointError(self.join(name), "is missing: the checkpoint is incomplete")
        _check_description(self.join(name), describe_stored(storage, name), info)

    def read_tensors(self, name: str, size: int) -> dict[str, torch.Tensor]:
        """A safetensors file of the checkpoint, every checksum verified."""
        path = self.join(name)
        if self.remote:
            if RemoteStorage(self.base, self.storage_options).size(name) != size:
                raise CorruptCheckpointError(path, "size differs from the one recorded in the manifest")
            return load_url(path, storage_options=self.storage_options, verify=True)
        if not Path(path).is_file():
            raise CorruptCheckpointError(path, "is missing: the checkpoint is incomplete")
        if Path(path).stat().st_size != size:
            raise CorruptCheckpointError(path, "size differs from the one recorded in the manifest")
        return read_file(path, mmap=False, verify=True)[1]

    def dcp_reader(self, folder: str, metadata: Any) -> Any:
        from torchkeep.checkpoint.direct_reads import CheckedFsspecReader, CheckedReader  # DCP: slow to import

        if self.remote:
            return CheckedFsspecReader(self.join(folder), metadata, **dict(self.storage_options or {}))
        return CheckedReader(Path(self.join(folder)), metadata)
