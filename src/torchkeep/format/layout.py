"""The on-disk layout of one tensor file: a safetensors file with torchkeep's checksums.

A file is ``u64 little-endian header length | JSON header | data``. The header maps each tensor
name to its dtype code, shape and ``[start, end)`` byte range in the data region, and holds a
``__metadata__`` object of string pairs. torchkeep adds two reserved metadata keys (see
docs/FORMAT.md): ``torchkeep.xxh3_64`` (a JSON object: tensor name -> hex digest of its bytes) and
``torchkeep.aliases`` (a JSON object: alias -> stored name, for tensors that shared storage), and
``torchkeep.header_xxh3_64``, the checksum of the header bytes themselves (computed with this
value set to sixteen zeros), so a flipped bit anywhere in the file is caught.

Parsing validates everything before allocating anything: the header length against the file size
and a hard limit, each dtype, shape and byte range, and that the ranges tile the data region
exactly. A damaged file therefore fails with :class:`CorruptCheckpointError`, never a crash.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import xxhash

from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format import jsondoc
from torchkeep.format.dtypes import CODE_TO_DTYPE, DTYPE_TO_CODE, ITEMSIZE
from torchkeep.format.jsondoc import check_version

FORMAT_VERSION = "1"
META_FORMAT = "torchkeep.format"
META_CHECKSUMS = "torchkeep.xxh3_64"
META_ALIASES = "torchkeep.aliases"
META_HEADER = "torchkeep.header_xxh3_64"
_HEADER_PLACEHOLDER = "0" * 16
RESERVED_PREFIX = "torchkeep."
MAX_NDIM = 64
_MAX_INT64 = 2**63 - 1


class TensorEntry(NamedTuple):
    """One tensor's place in a file: dtype code, shape and byte range within the data region.

    A NamedTuple, not a dataclass: files may hold many thousands of entries.
    """

    name: str
    code: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return CODE_TO_DTYPE[self.code]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated file header."""

    entries: tuple[TensorEntry, ...]  # in header order
    metadata: Mapping[str, str]  # the user's pairs, without torchkeep's reserved keys
    checksums: Mapping[str, str] | None  # None: the file was not written by torchkeep
    aliases: Mapping[str, str]
    data_start: int
    data_size: int
    format_version: str | None = None

    def by_offset(self) -> list[TensorEntry]:
        return sorted(self.entries, key=_by_offset)


def _by_offset(entry: TensorEntry) -> tuple[int, int]:
    return entry.start, entry.end


def digest(buffer: Any) -> str:
    """The checksum torchkeep records for a tensor's bytes."""
    return xxhash.xxh3_64_hexdigest(buffer)


# ---------------------------------------------------------------------------------------------
# Reading


def read_header(f: Any, path: str, file_size: int) -> Header:
    """Read and validate the header of an open file positioned anywhere."""
    if file_size < 8:
        raise CorruptCheckpointError(path, f"file is {file_size} bytes, too short to hold a header")
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) != 8:
        raise CorruptCheckpointError(path, "file ended inside the header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len == 0:
        raise CorruptCheckpointError(path, "header length is 0")
    if header_len > _config.MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            path, f"header length {header_len} exceeds the limit of {_config.MAX_HEADER_BYTES} bytes"
        )
    if header_len > file_size - 8:
        raise CorruptCheckpointError(
            path, f"header length {header_len} runs past the end of the {file_size}-byte file (truncated?)"
        )
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise CorruptCheckpointError(path, "file ended inside the header (truncated?)")
    return parse_header(raw, path=path, data_start=8 + header_len, data_size=file_size - 8 - header_len)


def parse_header(raw: bytes, *, path: str, data_start: int, data_size: int) -> Header:
    """Validate a JSON header against the size of the data region that follows it."""
    try:
        obj = jsondoc.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"header is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(path, "header is not a JSON object")

    raw_meta = obj.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise CorruptCheckpointError(path, "__metadata__ must be an object of string pairs")
    ours = [k for k in (META_FORMAT, META_CHECKSUMS, META_HEADER) if k in raw_meta]
    if ours and len(ours) != 3:
        # All three are always written together; one missing means a damaged key name.
        raise CorruptCheckpointError(path, f"torchkeep header is incomplete: has only {ours}")
    if META_FORMAT in raw_meta:
        version = raw_meta[META_FORMAT]
        # ASCII digits only: str.isdigit is also true of "²", which int() refuses.
        number = int(version) if version.isascii() and version.isdigit() and len(version) < 10 else None
        check_version(path, "tensor file", number if number is not None else version, int(FORMAT_VERSION))
    if META_HEADER in raw_meta:
        _check_header_digest(raw, raw_meta[META_HEADER], path)

    entries = tuple(_parse_entry(name, info, path) for name, info in obj.items())
    _check_coverage(entries, data_size, path)

    checksums = _parse_name_map(raw_meta, META_CHECKSUMS, path)
    aliases = _parse_name_map(raw_meta, META_ALIASES, path) or {}
    names = {e.name for e in entries}
    if checksums is not None:
        missing = names - checksums.keys()
        if missing:
            raise CorruptCheckpointError(path, f"no checksum recorded for {sorted(missing)[:5]}")
    for alias, target in aliases.items():
        if alias in names or target not in names:
            raise CorruptCheckpointError(path, f"bad alias {alias!r} -> {target!r}")
    user_meta = {k: v for k, v in raw_meta.items() if not k.startswith(RESERVED_PREFIX)}
    return Header(
        entries=entries,
        metadata=user_meta,
        checksums=checksums,
        aliases=aliases,
        data_start=data_start,
        data_size=data_size,
        format_version=raw_meta.get(META_FORMAT),
    )


def _header_field(value: str) -> bytes:
    return json.dumps({META_HEADER: value}, separators=(",", ":"))[1:-1].encode()


def _check_header_digest(raw: bytes, recorded: str, path: str) -> None:
    """The header's own checksum covers every header byte, with its own value zeroed."""
    field = _header_field(recorded)
    if len(recorded) != len(_HEADER_PLACEHOLDER) or raw.count(field) != 1:
        raise CorruptCheckpointError(path, "header checksum field is malformed")
    if digest(raw.replace(field, _header_field(_HEADER_PLACEHOLDER))) != recorded:
        raise CorruptCheckpointError(path, "header checksum mismatch: the header is damaged")


def _parse_name_map(meta: Mapping[str, str], key: str, path: str) -> dict[str, str] | None:
    if key not in meta:
        return None
    try:
        value = jsondoc.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(path, f"metadata {key} is not valid JSON: {exc!s:.200}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CorruptCheckpointError(path, f"metadata {key} must map names to strings")
    return value


def _parse_entry(name: str, info: Any, path: str) -> TensorEntry:
    # Exact type checks (bool is an int subclass and must not pass as a dimension).
    if not name:
        raise CorruptCheckpointError(path, "a tensor has an empty name")
    if type(info) is not dict:
        raise CorruptCheckpointError(path, "tensor entry is not an object", key=name)
    code = info.get("dtype")
    if type(code) is not str or code not in CODE_TO_DTYPE:
        raise CorruptCheckpointError(path, f"unknown dtype {code!r:.80}; known: {', '.join(CODE_TO_DTYPE)}", key=name)
    shape = info.get("shape")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise CorruptCheckpointError(path, f"invalid shape {shape!r:.200}", key=name)
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise CorruptCheckpointError(path, f"invalid shape {shape!r}", key=name)
    # torch computes strides (and sizes in bytes) in int64, even for a tensor with a 0 dimension.
    if math.prod(max(dim, 1) for dim in shape) * ITEMSIZE[code] > _MAX_INT64:
        raise CorruptCheckpointError(path, f"shape {shape!r} is too large for torch (int64 strides)", key=name)
    offsets = info.get("data_offsets")
    if type(offsets) is not list or len(offsets) != 2:
        raise CorruptCheckpointError(path, f"invalid data_offsets {offsets!r:.80}", key=name)
    start, end = offsets
    if type(start) is not int or type(end) is not int or not 0 <= start <= end:
        raise CorruptCheckpointError(path, f"invalid data_offsets {offsets!r:.80}", key=name)
    expected = math.prod(shape) * ITEMSIZE[code]
    if expected != end - start:
        raise CorruptCheckpointError(
            path, f"shape {shape} of {code} needs {expected} bytes but data_offsets span {end - start}", key=name
        )
    return TensorEntry(name, code, tuple(shape), start, end)


def _check_coverage(entries: tuple[TensorEntry, ...], data_size: int, path: str) -> None:
    position = 0
    previous: TensorEntry | None = None
    for entry in sorted(entries, key=_by_offset):
        if entry.end > data_size:
            raise CorruptCheckpointError(
                path,
                f"bytes [{entry.start}, {entry.end}) run past the {data_size}-byte data region (truncated?)",
                key=entry.name,
            )
        if entry.start < position:
            other = previous.name if previous else "?"
            raise CorruptCheckpointError(path, f"bytes overlap those of {other!r}", key=entry.name)
        if entry.start > position:
            raise CorruptCheckpointError(
                path, f"gap of {entry.start - position} unclaimed bytes before it", key=entry.name
            )
        position = entry.end
        previous = entry
    if position != data_size:
        raise CorruptCheckpointError(path, f"{data_size - position} bytes after the last tensor belong to no tensor")


# ---------------------------------------------------------------------------------------------
# Planning a write


_NO_HOST_BYTES = memoryview(b"")


@dataclass(frozen=True)
class WriteItem:
    """One tensor to write: a zero-copy view of its bytes and its place in the data region.

    ``data`` borrows the memory of ``tensor``, which the item keeps alive; it is empty for a tensor on a
    device, whose bytes are copied out piece by piece as they are written.
    """

    name: str
    tensor: torch.Tensor = field(repr=False)
    data: memoryview = field(repr=False)
    start: int
    nbytes: int


@dataclass(frozen=True)
class FilePlan:
    """Everything needed to write one file: the header bytes and the items in data order."""

    header: bytes
    items: tuple[WriteItem, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(item.nbytes for item in self.items)


def byte_view(raw: torch.Tensor) -> memoryview:
    """A writable memoryview over a CPU tensor's bytes (contiguous, any dtype and shape).

    The view borrows the tensor's memory: the caller keeps the tensor alive while using it.
    """
    nbytes = raw.numel() * raw.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(raw.data_ptr())).cast("B")


def fill_from(stream: Any, view: memoryview, chunk: int = 1 << 30) -> bool:
    """Read from ``stream`` until ``view`` is full (``readinto`` may return less); False when the stream
    ends first. ``chunk`` bounds each call (some platforms refuse huge single reads)."""
    while view.nbytes:
        got = stream.readinto(view[:chunk])
        if not got:
            return False
        view = view[got:]
    return True


class PositionedStream(io.RawIOBase):
    """A read-only, seekable stream of ``size`` bytes that keeps its own position (a seek costs nothing and
    is clamped to the stream); a subclass's ``readinto`` reads at ``position`` and advances it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, min(self.size, base + offset))
        return self.position


class ByteRange(PositionedStream):
    """``length`` bytes of a seekable ``stream`` from ``offset``, as a seekable stream of their own: a read
    goes straight to its place. zipfile's member files reach a position by reading every byte before it;
    a DCP chunk is a range of a larger file. A stream that ends inside the range raises EOFError, as
    zipfile's member files do."""

    def __init__(self, stream: Any, offset: int, length: int) -> None:
        super().__init__(length)
        self.stream, self.offset, self.length = stream, offset, length

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self.length - self.position)
        if wanted <= 0:
            return 0
        self.stream.seek(self.offset + self.position)
        if not fill_from(self.stream, view[:wanted]):
            raise EOFError("the stream ends inside the byte range")
        self.position += wanted
        return wanted


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy buffer over a CPU, contiguous tensor's bytes."""
    return byte_view(tensor)


def plan_file(
    tensors: Mapping[str, torch.Tensor],
    *,
    aliases: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    digests: Mapping[str, str] | None = None,
) -> FilePlan:
    """Lay out ``tensors`` (contiguous, safetensors dtypes) in a file.

    Data is ordered by element size, largest first, so every tensor starts on its natural
    alignment, as safetensors does; the header keeps the caller's order. Output is deterministic.
    A tensor on a device (GPU) needs its checksum in ``digests`` (format/staging.py's ``staged_digests``
    hashes it through small host buffers); its bytes are written the same way, never held on the host whole.
    """
    known = dict(digests or {})
    views = {name: tensor_bytes(tensor) for name, tensor in tensors.items() if tensor.device.type == "cpu"}
    on_device = [name for name in tensors if name not in views and name not in known]
    if on_device:
        raise ValueError(f"tensors on a device need their checksums given: {on_device[:5]}")
    known.update((name, digest(data)) for name, data in views.items() if name not in known)
    codes = {name: DTYPE_TO_CODE[tensor.dtype] for name, tensor in tensors.items()}
    order = sorted(tensors, key=lambda name: -ITEMSIZE[codes[name]])
    offsets: dict[str, list[int]] = {}
    items: list[WriteItem] = []
    position = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        data = views.get(name, _NO_HOST_BYTES)
        offsets[name] = [position, position + nbytes]
        items.append(WriteItem(name=name, tensor=tensor, data=data, start=position, nbytes=nbytes))
        position += nbytes

    meta: dict[str, str] = dict(metadata or {})
    meta[META_FORMAT] = FORMAT_VERSION
    meta[META_CHECKSUMS] = json.dumps({name: known[name] for name in tensors}, separators=(",", ":"))
    if aliases:
        meta[META_ALIASES] = json.dumps(dict(aliases), separators=(",", ":"))
    meta[META_HEADER] = _HEADER_PLACEHOLDER
    header_obj: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    for name, tensor in tensors.items():
        header_obj[name] = {"dtype": codes[name], "shape": list(tensor.shape), "data_offsets": offsets[name]}
    body = json.dumps(header_obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = -(8 + len(body)) % _config.HEADER_ALIGNMENT
    body += b" " * pad
    placeholder = _header_field(_HEADER_PLACEHOLDER)
    body = body.replace(placeholder, _header_field(digest(body)))
    return FilePlan(header=struct.pack("<Q", len(body)) + body, items=tuple(items))
