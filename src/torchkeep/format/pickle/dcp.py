"""Reading torch.distributed.checkpoint (DCP) directories in one process, without running code.

A DCP directory holds ``.metadata`` (a pickle of plain dataclasses describing every tensor's
chunks and where their bytes are) and ``__R_N.distcp`` files of torch.save blobs. The metadata
classes are rebuilt as plain records, from an allowlist of their names that applies to this
file only; tensors are reassembled from their chunks.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format.names import is_plain_name, member
from torchkeep.format.pickle import rebuild
from torchkeep.format.pickle.rebuild import describe, itemsize
from torchkeep.format.pickle.torchfile import PARSE_ERRORS, read_zip_stream
from torchkeep.format.pickle.unpickler import RestrictedUnpickler

METADATA_FILE = ".metadata"
_META = "torch.distributed.checkpoint.metadata"


class Record(rebuild.SafeState):
    """A dataclass instance from the metadata, as attributes only."""

    def __setstate__(self, state: Any) -> None:
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)  # (dict or None, slots dict)
        for part in parts:
            if isinstance(part, dict):
                rebuild.charge(48 * len(part), "a DCP record")
                self.__dict__.update(part)

    def __reduce__(self) -> Any:  # never pickled back
        raise TypeError("Record is read-only")


class TensorPropertiesRecord(Record):
    """TensorProperties pickles its fields as a tuple (dtype, layout, requires_grad, memory format, pin_memory)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 5:
            names = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
            self.__dict__.update(dict(zip(names, state, strict=True)))
        else:
            super().__setstate__(state)


def _record_class(name: str) -> type:
    return type(name, (Record,), {})


def _enum_value(value: Any) -> Any:
    return value


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts) or sum(len(p) for p in parts) > 4096:
        raise rebuild.RefusedData("a path made of anything but a few strings")
    return os.path.join(*parts) if parts else ""


RECORDS = (
    "Metadata",
    "TensorStorageMetadata",
    "TensorProperties",
    "ChunkStorageMetadata",
    "BytesStorageMetadata",
    "MetadataIndex",
    "StorageMeta",
)
EXTRA: dict[tuple[str, str], Any] = {(_META, name): _record_class(name) for name in RECORDS}
EXTRA[(_META, "TensorProperties")] = TensorPropertiesRecord
EXTRA[(_META, "_MEM_FORMAT_ENCODING")] = _enum_value
EXTRA[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _record_class("_StorageInfo")
EXTRA[("pathlib", "PosixPath")] = _path
EXTRA[("pathlib", "WindowsPath")] = _path
EXTRA[("pathlib", "PurePosixPath")] = _path


OBJECT_READ_LIMIT = 1 << 20  # bytes: a non-tensor entry this small is read even when tensors are not


def is_dcp_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def read_dcp(directory: str | os.PathLike[str], *, read_limit: int | None = None) -> dict[str, Any]:
    """The state a DCP directory holds, nested as it was saved (flat keys if no nesting is recorded).

    ``read_limit``: tensors and objects of more bytes are not read (tensors come back on the meta device,
    objects as None), for describing a folder; None reads everything.

    Raises:
        CorruptCheckpointError: damaged or inconsistent metadata (a tensor its chunks do not cover
            exactly, a data file outside the folder, a shape or dtype that is not one), or data.
        UnsafeCheckpointError: a pickle that would run code.
    """
    try:
        with _DataFiles(Path(directory)) as files:
            return _read_dcp(files, read_limit)
    except TorchkeepError:
        raise
    except PARSE_ERRORS as exc:
        raise CorruptCheckpointError(directory, f"unreadable DCP checkpoint: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class _Item:
    """Where one entry's bytes are: checked inside the folder and inside its file."""

    file: BinaryIO
    start: int
    length: int
    label: str
    relative: str  # the data file's name in the folder


class _DataFiles(contextlib.ExitStack):
    """The folder's data files, each opened once, read item by item (seek + bounded read)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.meta_path = str(root / METADATA_FILE)
        self.open_files: dict[str, tuple[BinaryIO, int]] = {}
        self.ranges: dict[str, list[tuple[int, int, str]]] = {}  # file -> (offset, length, fqn) of each item

    def locate(self, info: Any, fqn: str) -> _Item:
        """Check ``info.relative_path`` at ``[offset, offset + length)``; nothing is read yet."""
        relative, start, length = (getattr(info, name, None) for name in ("relative_path", "offset", "length"))
        if not isinstance(relative, str) or len(relative) > 255 or not is_plain_name(relative):
            raise CorruptCheckpointError(self.meta_path, f"data file {describe(relative)} is not a plain file name "
                                         "inside the checkpoint folder", key=fqn)  # fmt: skip
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(self.meta_path, "is stored transformed (compressed); load it with "
                                         "torch.distributed.checkpoint", key=fqn)  # fmt: skip
        if relative not in self.open_files:
            file = member(self.root, relative, self.meta_path, what="DCP data file")
            if not file.is_file():
                raise CorruptCheckpointError(file, "DCP data file is missing", key=fqn)
            opened: BinaryIO = self.enter_context(file.open("rb"))
            self.open_files[relative] = (opened, os.fstat(opened.fileno()).st_size)
        f, size = self.open_files[relative]
        label = str(self.root / relative)
        if type(start) is not int or type(length) is not int or start < 0 or length < 0 or start + length > size:
            raise CorruptCheckpointError(label, f"item [{describe(start)}, +{describe(length)}) runs past the "
                                         f"file's {size} bytes", key=fqn)  # fmt: skip
        self.ranges.setdefault(relative, []).append((start, length, fqn))
        return _Item(f, start, length, label, relative)

    def check_disjoint(self) -> None:
        """Two entries reading the same bytes would let a small file fill many large tensors."""
        for relative, items in self.ranges.items():
            items.sort()
            for (a_start, a_length, a_fqn), (b_start, _, b_fqn) in itertools.pairwise(items):
                if b_start < a_start + a_length:
                    raise CorruptCheckpointError(self.root / relative, f"{a_fqn!r} and {b_fqn!r} overlap in the file")

    @staticmethod
    def load(item: _Item) -> Any:
        """The object one item holds (a torch.save blob), read from its byte range only."""
        item.file.seek(item.start)
        data = item.file.read(item.length)
        if len(data) != item.length:
            raise CorruptCheckpointError(item.label, "item is truncated")
        return read_zip_stream(io.BytesIO(data), item.label, len(data))


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: _Item


@dataclass(frozen=True)
class _Planned:
    """A DCP folder's metadata, every entry's reads planned and checked; no data read yet."""

    metadata: Any  # the Record tree of ``.metadata``
    storage: dict[Any, Any]  # its storage_data: MetadataIndex record -> _StorageInfo record
    plans: dict[str, _Item | tuple[torch.dtype, torch.Size, list[Chunk]]]


def _plan_dcp(files: _DataFiles) -> _Planned:
    root, meta_path = files.root, files.meta_path
    member(root, METADATA_FILE, meta_path, what="DCP metadata")  # not a link out of the folder
    with open(meta_path, "rb") as f:
        metadata = RestrictedUnpickler(f, path=meta_path, extra=EXTRA, size=os.fstat(f.fileno()).st_size).load()
    if not isinstance(metadata, Record):
        raise CorruptCheckpointError(meta_path, "not DCP metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CorruptCheckpointError(meta_path, "DCP metadata lacks state_dict_metadata or storage_data")
    locations: dict[tuple[str, tuple[int, ...]], Any] = {}
    by_fqn: dict[str, list[Any]] = {}
    for index, info in storage.items():
        fqn, offset = getattr(index, "fqn", None), getattr(index, "offset", None)
        if not isinstance(fqn, str) or not (offset is None or isinstance(offset, tuple)):
            raise CorruptCheckpointError(meta_path, f"malformed storage index {describe(index)}")
        locations[(fqn, tuple(offset or ()))] = info
        by_fqn.setdefault(fqn, []).append(info)

    def locate(fqn: str, offsets: tuple[int, ...]) -> _Item:
        found = locations.get((fqn, offsets))
        if found is None:
            if len(by_fqn.get(fqn, ())) != 1:
                raise CorruptCheckpointError(meta_path, "has no storage_data entry for one of its parts: the "
                                             "checkpoint is incomplete", key=fqn)  # fmt: skip
            found = by_fqn[fqn][0]
        return files.locate(found, fqn)

    # Plan every read first: sizes, coverage and byte ranges are checked before anything is allocated.
    plans: dict[str, _Item | tuple[torch.dtype, torch.Size, list[Chunk]]] = {}
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(meta_path, f"state key {describe(fqn)} is not a string")
        if type(entry).__name__ == "BytesStorageMetadata":
            plans[fqn] = locate(fqn, ())
        elif type(entry).__name__ == "TensorStorageMetadata":
            plans[fqn] = _plan_tensor(meta_path, fqn, entry, locate)
        else:
            raise CorruptCheckpointError(meta_path, f"is described by {describe(entry)}", key=fqn)
    files.check_disjoint()
    return _Planned(metadata, storage, plans)


def _read_dcp(files: _DataFiles, read_limit: int | None) -> dict[str, Any]:
    planned = _plan_dcp(files)
    flat: dict[str, Any] = {}
    for fqn, plan in planned.plans.items():
        if isinstance(plan, _Item):
            # objects (a step, param groups' values) are small torch.save blobs: read unless unusually large
            small = read_limit is None or plan.length <= max(read_limit, OBJECT_READ_LIMIT)
            flat[fqn] = files.load(plan) if small else None
            continue
        dtype, size, chunks = plan
        if read_limit is not None and math.prod(size) * itemsize(dtype) > read_limit:
            flat[fqn] = torch.empty(size, dtype=dtype, device="meta")
            continue
        tensor = torch.empty(size, dtype=dtype)
        for chunk in chunks:
            piece = files.load(chunk.item)
            if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != chunk.sizes or piece.dtype != dtype:
                raise CorruptCheckpointError(chunk.item.label, f"chunk is not a {dtype} tensor of shape "
                                             f"{list(chunk.sizes)}", key=fqn)  # fmt: skip
            tensor[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))] = piece
        flat[fqn] = tensor
    return _nest(flat, getattr(planned.metadata, "planner_data", None), files.meta_path)


def dcp_metadata(directory: str | os.PathLike[str]) -> Any:
    """A DCP folder's ``.metadata`` as torch's own ``Metadata``, read without running code and checked as
    :func:`read_dcp` checks it (chunk coverage, byte ranges inside plain files of the folder): what
    ``torch.distributed.checkpoint.load`` needs, instead of unpickling the file with Python's own unpickler."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    try:
        with _DataFiles(Path(directory)) as files:
            planned = _plan_dcp(files)
    except TorchkeepError:
        raise
    except PARSE_ERRORS as exc:
        raise CorruptCheckpointError(directory, f"unreadable DCP checkpoint: {type(exc).__name__}: {exc}") from exc
    entries: dict[str, Any] = {}
    storage: dict[Any, Any] = {}

    def place(fqn: str, offsets: tuple[int, ...] | None, item: _Item) -> None:
        index = MetadataIndex(fqn, torch.Size(offsets) if offsets is not None else None)
        storage[index] = _StorageInfo(relative_path=item.relative, offset=item.start, length=item.length)

    for fqn, plan in planned.plans.items():
        if isinstance(plan, _Item):
            entries[fqn] = BytesStorageMetadata()
            place(fqn, None, plan)
            continue
        dtype, size, chunks = plan
        entries[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype),
            size=size,
            chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in chunks],
        )
        for chunk in chunks:
            place(fqn, chunk.offsets, chunk.item)
    return Metadata(state_dict_metadata=entries, storage_data=storage)


def _plan_tensor(
    meta_path: str, fqn: str, entry: Any, locate: Callable[[str, tuple[int, ...]], _Item]
) -> tuple[torch.dtype, torch.Size, list[Chunk]]:
    """One tensor's chunks, which must cover it exactly once (no gaps, no overlaps)."""
    properties = getattr(entry, "properties", None)
    dtype, size = getattr(properties, "dtype", None), getattr(entry, "size", None)
    if not isinstance(dtype, torch.dtype) or dtype in rebuild.QUANTIZED_ITEMSIZE:
        raise CorruptCheckpointError(meta_path, f"dtype {describe(dtype)} is not a tensor dtype", key=fqn)
    if not isinstance(size, torch.Size):
        raise CorruptCheckpointError(meta_path, f"size {describe(size)} is not a torch.Size", key=fqn)
    numel = math.prod(size)  # a torch.Size from the allowlist: non-negative dims, fewer than 2**63 elements
    raw_chunks = getattr(entry, "chunks", None)
    if not isinstance(raw_chunks, list):
        raise CorruptCheckpointError(meta_path, "has no list of chunks", key=fqn)
    chunks: list[Chunk] = []
    for chunk in raw_chunks:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not isinstance(offsets, torch.Size) or not isinstance(sizes, torch.Size):
            raise CorruptCheckpointError(meta_path, "has a chunk without offsets and sizes", key=fqn)
        if (
            len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o + n > d for o, n, d in zip(offsets, sizes, size, strict=True))
        ):
            raise CorruptCheckpointError(meta_path, f"has a chunk at {list(offsets)} of {list(sizes)} outside its "
                                         f"shape {list(size)}", key=fqn)  # fmt: skip
        item = locate(fqn, tuple(offsets))
        if math.prod(sizes) * itemsize(dtype) > item.length:
            raise CorruptCheckpointError(meta_path, f"has a chunk of {list(sizes)} whose data is too short", key=fqn)
        chunks.append(Chunk(tuple(offsets), tuple(sizes), item))
    if sum(math.prod(c.sizes) for c in chunks) != numel or not cover_exactly(size, chunks):
        raise CorruptCheckpointError(
            meta_path, f"its chunks do not cover its shape {list(size)} exactly once (a missing or overlapping "
            "chunk): the checkpoint is incomplete", key=fqn,
        )  # fmt: skip
    return dtype, size, chunks


def cover_exactly(size: torch.Size, chunks: list[Chunk]) -> bool:
    """With volumes summing to the tensor's, full coverage means no two chunks overlap (and the reverse).

    Chunks that all span the tensor but along one dimension (FSDP's dim-0 shards, tensor-parallel
    rows or columns) are sorted and checked to tile it; other layouts are checked pairwise, or, with
    very many chunks, on a mask of the tensor.
    """
    if len(chunks) == 1:
        return chunks[0].sizes == tuple(size)
    varying = [d for d in range(len(size)) if any(c.offsets[d] != 0 or c.sizes[d] != size[d] for c in chunks)]
    if len(varying) == 1:
        d = varying[0]
        end = 0
        for chunk in sorted(chunks, key=lambda c: c.offsets[d]):
            if chunk.offsets[d] != end:
                return False
            end += chunk.sizes[d]
        return end == size[d]
    if len(chunks) <= 256:
        boxes = [c for c in chunks if math.prod(c.sizes)]
        return not any(
            all(
                a.offsets[d] < b.offsets[d] + b.sizes[d] and b.offsets[d] < a.offsets[d] + a.sizes[d]
                for d in range(len(size))
            )
            for a, b in itertools.combinations(boxes, 2)
        )
    covered = torch.zeros(size, dtype=torch.bool)  # a byte per element: chunk data already backs 1+ per element
    for chunk in chunks:
        covered[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))] = True
    return bool(covered.all())


def _nest(flat: dict[str, Any], planner_data: Any, path: str) -> dict[str, Any]:
    """Rebuild nesting from DCP's record of each flattened key's path (its default planner's)."""
    if not isinstance(planner_data, dict) or not planner_data:
        return flat
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        parts = planner_data.get(fqn)
        if not isinstance(parts, (tuple, list)) or not parts or not all(isinstance(p, (str, int)) for p in parts):
            out[fqn] = value
            continue
        _set_element(out, list(parts), value, fqn, path)
    return out


def _set_element(root: dict[str, Any], parts: list[str | int], value: Any, fqn: str, path: str) -> None:
    """As DCP's own unflattening does: an int part is a list index, a str part a dict key (DCP turned every dict
    key into a str when it flattened), so optimizer param_groups come back as lists."""
    node: Any = root
    if not isinstance(parts[0], str):
        raise CorruptCheckpointError(path, f"planner data for {fqn!r} starts with an index", key=fqn)
    for part, following in itertools.pairwise(parts):
        empty: Any = [] if isinstance(following, int) else {}
        node = _child(node, part, empty, fqn, path)
    _put(node, parts[-1], value, fqn, path)


def _child(node: Any, part: str | int, empty: Any, fqn: str, path: str) -> Any:
    existing = _get(node, part, fqn, path)
    if existing is None:
        _put(node, part, empty, fqn, path)
        return empty
    if type(existing) is not type(empty):
        raise CorruptCheckpointError(path, f"planner data nests {fqn!r} inconsistently", key=fqn)
    return existing


def _get(node: Any, part: str | int, fqn: str, path: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int):
        return node[part] if 0 <= part < len(node) else None
    raise CorruptCheckpointError(path, f"planner data nests {fqn!r} under a value", key=fqn)


def _put(node: Any, part: str | int, value: Any, fqn: str, path: str) -> None:
    if isinstance(node, dict) and isinstance(part, str):
        node[part] = value
    elif isinstance(node, list) and isinstance(part, int) and 0 <= part < _config.MAX_DCP_LIST:
        node.extend([None] * (part + 1 - len(node)))
        node[part] = value
    else:
        raise CorruptCheckpointError(path, f"planner data for {fqn!r} has a bad part {part!r:.40}", key=fqn)
