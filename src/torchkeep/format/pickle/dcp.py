"""Reading torch.distributed.checkpoint (DCP) directories in one process, without running code.

A DCP directory holds ``.metadata`` (a pickle of plain dataclasses describing every tensor's
chunks and where their bytes are) and ``__R_N.distcp`` files of torch.save blobs. The metadata
classes are rebuilt as plain records, from an allowlist of their names that applies to this
file only; tensors are reassembled from their chunks.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, TorchkeepError
from torchkeep.format.pickle.torchfile import PARSE_ERRORS, read_zip_stream, refuse_unsafe
from torchkeep.format.pickle.unpickler import restricted_loads

METADATA_FILE = ".metadata"
_META = "torch.distributed.checkpoint.metadata"


class Record:
    """A dataclass instance from the metadata, as attributes only."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict or None, slots dict)
            for part in state:
                if isinstance(part, dict):
                    self.__dict__.update(part)
        elif isinstance(state, dict):
            self.__dict__.update(state)

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
    return os.path.join(*[str(p) for p in parts]) if parts else ""


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


def is_dcp_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def read_dcp(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The state a DCP directory holds, nested as it was saved (flat keys if no nesting is recorded)."""
    try:
        return _read_dcp(Path(directory))
    except TorchkeepError:
        raise
    except PARSE_ERRORS as exc:
        raise CorruptCheckpointError(directory, f"unreadable DCP checkpoint: {type(exc).__name__}: {exc}") from exc


def _read_dcp(root: Path) -> dict[str, Any]:
    meta_path = str(root / METADATA_FILE)
    raw = (root / METADATA_FILE).read_bytes()
    refuse_unsafe(raw, meta_path, extra=EXTRA)
    metadata = restricted_loads(raw, path=meta_path, extra=EXTRA)
    if not isinstance(metadata, Record):
        raise CorruptCheckpointError(meta_path, "not DCP metadata")
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CorruptCheckpointError(meta_path, "DCP metadata lacks state_dict_metadata or storage_data")
    locations: dict[tuple[str, tuple[int, ...]], Any] = {}
    for index, info in storage.items():
        offset = tuple(getattr(index, "offset", None) or ())
        locations[(getattr(index, "fqn", ""), offset)] = info
    blobs: dict[str, bytes] = {}

    def blob(info: Any) -> tuple[bytes, str]:
        relative = str(getattr(info, "relative_path", ""))
        if not relative or "/" in relative or relative.startswith("."):
            raise CorruptCheckpointError(meta_path, f"bad data file name {relative!r}")
        if relative not in blobs:
            file = root / relative
            if not file.is_file():
                raise CorruptCheckpointError(file, "DCP data file is missing")
            blobs[relative] = file.read_bytes()
        data = blobs[relative]
        start, length = int(getattr(info, "offset", 0)), int(getattr(info, "length", 0))
        if start < 0 or length < 0 or start + length > len(data):
            raise CorruptCheckpointError(root / relative, f"item [{start}, {start + length}) runs past the file")
        return data[start : start + length], str(root / relative)

    flat: dict[str, Any] = {}
    for fqn, entry in entries.items():
        if type(entry).__name__ == "BytesStorageMetadata":
            data, label = blob(locations.get((fqn, ())) or _only(storage, fqn, meta_path))
            flat[fqn] = read_zip_stream(io.BytesIO(data), label, len(data))
            continue
        properties = getattr(entry, "properties", None)
        dtype, size = getattr(properties, "dtype", None), getattr(entry, "size", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(size, torch.Size):
            raise CorruptCheckpointError(meta_path, f"tensor {fqn!r} has no dtype or size")
        tensor = torch.empty(size, dtype=dtype)
        for chunk in getattr(entry, "chunks", []) or []:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(size) or any(
                o < 0 or o + n > d for o, n, d in zip(offsets, sizes, size, strict=False)
            ):
                raise CorruptCheckpointError(meta_path, f"tensor {fqn!r} has a chunk outside it")
            data, label = blob(locations.get((fqn, offsets)) or _only(storage, fqn, meta_path))
            piece = read_zip_stream(io.BytesIO(data), label, len(data))
            if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != sizes:
                raise CorruptCheckpointError(label, f"chunk of {fqn!r} is not a tensor of shape {list(sizes)}")
            tensor[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))] = piece
        flat[fqn] = tensor
    return _nest(flat, getattr(metadata, "planner_data", None))


def _only(storage: dict[Any, Any], fqn: str, path: str) -> Any:
    matches = [info for index, info in storage.items() if getattr(index, "fqn", None) == fqn]
    if len(matches) != 1:
        raise CorruptCheckpointError(path, f"no storage location for {fqn!r}")
    return matches[0]


def _nest(flat: dict[str, Any], planner_data: Any) -> dict[str, Any]:
    """Rebuild nesting from DCP's record of each flattened key's path (its default planner's)."""
    if not isinstance(planner_data, dict) or not planner_data:
        return flat
    out: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = planner_data.get(fqn)
        if not isinstance(path, (tuple, list)) or not path or not all(isinstance(p, (str, int)) for p in path):
            out[fqn] = value
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return out
