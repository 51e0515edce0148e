"""Reading files written by torch.save (zip archives and the legacy pre-1.6 format) without running code."""

from __future__ import annotations

import contextlib
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format import zipdir
from torchkeep.format.layout import byte_view, fill_from
from torchkeep.format.names import refuse_special
from torchkeep.format.pickle import rebuild
from torchkeep.format.pickle.rebuild import LoadedStorage, StorageType, itemsize
from torchkeep.format.pickle.unpickler import BUDGET_FLOOR, RestrictedUnpickler, restricted_loads

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# What parsing libraries (zipfile, numpy, struct, zlib) raise on damaged input.
PARSE_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    KeyError,
    IndexError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    MemoryError,
    TypeError,
    RecursionError,
    AttributeError,
)
# deflate cannot expand data more than ~1032x; a record claiming more is a zip bomb.
MAX_DEFLATE_RATIO = 1100
# Compressed members (torch.save never compresses; someone re-zipped the file) may inflate in all to
# max(BUDGET_FLOOR, this many times the archive's size).
MAX_INFLATED_RATIO = 4


def _new_storage(nbytes: int) -> torch.UntypedStorage:
    return torch.empty(nbytes, dtype=torch.uint8).untyped_storage()


def _fill(storage: torch.UntypedStorage, data: memoryview) -> None:
    if data.nbytes:
        target = torch.empty(0, dtype=torch.uint8).set_(storage)
        target.numpy()[:] = np.frombuffer(data, dtype=np.uint8)


# What zipfile raises on a damaged or unsupported archive (an unknown version or method: NotImplementedError).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, ValueError, RuntimeError)


def open_zip(raw: Any, path: str) -> zipfile.ZipFile:
    """The one way torchkeep opens a zip archive: any damage is a CorruptCheckpointError naming ``path``."""
    try:
        archive = zipfile.ZipFile(raw)
    except ZIP_ERRORS as exc:
        raise CorruptCheckpointError(path, f"not a readable zip archive: {exc}") from exc
    declared = zipdir.declared_directory(raw)
    if declared is not None:  # two directories: torch.load would read other members than these
        archive.close()
        raise CorruptCheckpointError(path, f"{declared.describe()}; the file is damaged or built to mislead a scanner")
    return archive


def is_zip(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


def _skipped(read_limit: int | None, nbytes: int, dtype: torch.dtype) -> bool:
    """Whether a storage is left unread (its tensors on the meta device). A quantized one is always read:
    no quantized tensor exists on the meta device, and its int8 bytes are a quarter of the float weights."""
    return read_limit is not None and nbytes > read_limit and dtype not in _QUANTIZED


def read_torch_file(path: str, *, read_limit: int | None = None) -> Any:
    """The object a torch.save file holds, rebuilt from an allowlist only.

    ``read_limit``: storages of more bytes are not read: their tensors come back on the meta device (shape,
    dtype and strides, no memory), for describing a file without reading its weights; sizes are still
    checked against the file. None reads everything.
    """
    refuse_special(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if is_zip(head):
        with open(path, "rb", buffering=0) as raw:
            return read_zip_stream(raw, path, os.path.getsize(path), read_limit=read_limit)
    return _read_legacy(path, read_limit=read_limit)


def _geometry_storage(nbytes: int) -> torch.UntypedStorage:
    """A storage of ``nbytes`` on the meta device: tensors built on it have a shape and no memory."""
    return torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage()


def _data_offset(f: Any, info: zipfile.ZipInfo, path: str, file_size: int) -> int:
    if not 0 <= info.header_offset < file_size:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} has an out-of-range offset")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or not local.startswith(b"PK\x03\x04"):
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(info.header_offset + 30 + name_len + extra_len)


def read_zip_stream(
    raw: Any,
    path: str,
    file_size: int,
    *,
    extra: Mapping[tuple[str, str], Any] | None = None,
    read_limit: int | None = None,
) -> Any:
    """A torch.save archive from a seekable binary stream of ``file_size`` bytes (``read_limit``: as
    read_torch_file)."""
    with _Archive(raw, path, file_size) as archive:
        stored = 0  # bytes read from uncompressed members: more than the file holds means they overlap

        def load_storage(kind: StorageType, key: str, location: str, numel: int) -> LoadedStorage:
            # Each key is loaded once, from its own member: storages are backed by the archive's bytes.
            nonlocal stored
            info, nbytes = archive.storage_member(key, kind, numel)
            if _skipped(read_limit, nbytes, kind.dtype):
                return LoadedStorage(_geometry_storage(nbytes), kind.dtype, location)
            if info.compress_type == zipfile.ZIP_STORED:
                stored += info.file_size
                if stored > file_size:
                    raise CorruptCheckpointError(
                        path, "its uncompressed storages hold more bytes than the file (entries that overlap)"
                    )
            if info.compress_type == zipfile.ZIP_STORED and info.file_size == nbytes:
                untyped = _new_storage(nbytes)
                _read_stored_into(raw, info, path, file_size, untyped)  # straight into the storage: one copy
            else:
                member = archive.members.read(info)
                untyped = _new_storage(nbytes)
                _fill(untyped, memoryview(member)[:nbytes])
            return LoadedStorage(untyped, kind.dtype, location)

        with rebuild.deferred_checks(path, run_on_exit=read_limit is None):  # sparse checks need all data
            return restricted_loads(archive.pickle, path=path, load_storage=load_storage, extra=extra)


@dataclass(frozen=True)
class LocatedTensor:
    """A tensor of a torch.save archive, not read: its geometry (a tensor on the meta device) and the
    offset in the stream of its storage's bytes, stored uncompressed."""

    geometry: torch.Tensor
    start: int
    nbytes: int


def locate_tensor(raw: Any, path: str, file_size: int) -> LocatedTensor | None:
    """Where the one tensor a torch.save archive holds (as DCP saves each chunk) keeps its bytes, from
    the archive's directory and pickle only; None when it holds something else or compressed bytes."""
    located: list[zipfile.ZipInfo] = []
    with _Archive(raw, path, file_size) as archive:

        def load_storage(kind: StorageType, key: str, location: str, numel: int) -> LoadedStorage:
            info, nbytes = archive.storage_member(key, kind, numel)
            located.append(info)
            return LoadedStorage(_geometry_storage(nbytes), kind.dtype, location)

        with rebuild.deferred_checks(path):
            geometry = restricted_loads(archive.pickle, path=path, load_storage=load_storage)
    if not isinstance(geometry, torch.Tensor) or type(geometry) is not torch.Tensor or len(located) != 1:
        return None
    info = located[0]
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    start = _data_offset(raw, info, path, file_size)
    if start + info.file_size > file_size:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} runs past the end of the file")
    return LocatedTensor(geometry, start, info.file_size)


class _Archive(contextlib.AbstractContextManager["_Archive"]):
    """A torch.save zip archive opened and checked: its one data.pkl read, little-endian."""

    def __init__(self, raw: Any, path: str, file_size: int) -> None:
        self.path = path
        self.zip = open_zip(raw, path)  # one opener: every error zipfile raises on damage is typed there
        try:
            self.members = _Members(self.zip, raw, path, file_size)
            self.infos = {info.filename: info for info in self.zip.infolist()}
            pickles = [name for name in self.infos if name.endswith("data.pkl") and name.count("/") <= 1]
            if len(pickles) != 1:
                raise CorruptCheckpointError(path, f"expected one data.pkl in the archive, found {len(pickles)}")
            self.prefix = pickles[0][: -len("data.pkl")]
            byteorder = self.infos.get(self.prefix + "byteorder")
            if byteorder is not None and self.members.read(byteorder) != b"little":
                raise CorruptCheckpointError(path, "big-endian archives are not supported")
            self.pickle = self.members.read(self.infos[pickles[0]])
        except BaseException:
            self.zip.close()
            raise

    def storage_member(self, key: str, kind: StorageType, numel: int) -> tuple[zipfile.ZipInfo, int]:
        """The member holding storage ``key``, and the bytes it must hold."""
        info = self.infos.get(f"{self.prefix}data/{key}")
        if info is None:
            raise CorruptCheckpointError(self.path, f"storage {key!r} is missing from the archive")
        nbytes = numel * itemsize(kind.dtype)
        if info.file_size < nbytes:
            raise CorruptCheckpointError(self.path, f"storage {key!r} holds {info.file_size} bytes, needs {nbytes}")
        return info, nbytes

    def __exit__(self, *exc: object) -> None:
        self.zip.close()


def _read_stored_into(
    raw: Any, info: zipfile.ZipInfo, path: str, file_size: int, storage: torch.UntypedStorage
) -> None:
    """An uncompressed member read directly into ``storage``, then CRC-checked there."""
    if info.compress_size != info.file_size:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} declares inconsistent sizes")
    start = _data_offset(raw, info, path, file_size)
    if start + info.file_size > file_size:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} runs past the end of the file")
    if not info.file_size:
        return
    view = byte_view(torch.empty(0, dtype=torch.uint8).set_(storage))
    raw.seek(start)
    if not fill_from(raw, view):
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} is truncated")
    if zlib.crc32(view) != info.CRC:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} fails its CRC check")


class _Members:
    """Reads an archive's members, checked: sizes within the file, a bounded total inflation, the CRC."""

    def __init__(self, archive: zipfile.ZipFile, raw: Any, path: str, file_size: int) -> None:
        self.archive, self.raw, self.path, self.file_size = archive, raw, path, file_size
        self.inflate_budget = max(BUDGET_FLOOR, MAX_INFLATED_RATIO * file_size)

    def read(self, info: zipfile.ZipInfo) -> bytes:
        path, name = self.path, info.filename
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise CorruptCheckpointError(path, f"zip entry {name!r} declares inconsistent sizes")
            start = _data_offset(self.raw, info, path, self.file_size)
            if start + info.file_size > self.file_size:
                raise CorruptCheckpointError(path, f"zip entry {name!r} runs past the end of the file")
            self.raw.seek(start)
            data = self.raw.read(info.file_size)
            if len(data) != info.file_size:
                raise CorruptCheckpointError(path, f"zip entry {name!r} is truncated")
        else:
            if info.compress_size > self.file_size or info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                raise CorruptCheckpointError(path, f"zip entry {name!r} declares an impossible size")
            self.inflate_budget -= info.file_size
            if self.inflate_budget < 0:
                raise CorruptCheckpointError(
                    path, f"compressed entries inflate past {MAX_INFLATED_RATIO}x the archive's size (a zip bomb?); "
                    "torch.save does not compress: re-save the file with torch.save",
                )  # fmt: skip
            try:
                data = self.archive.read(info)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
                raise CorruptCheckpointError(path, f"zip entry {name!r} is damaged: {exc}") from exc
        if zlib.crc32(data) != info.CRC:
            raise CorruptCheckpointError(path, f"zip entry {name!r} fails its CRC check")
        return bytes(data)


def _read_legacy(path: str, *, read_limit: int | None = None) -> Any:
    """The pre-1.6 format: magic, protocol, sys_info, the object, the storage keys, then raw storages.

    Read as a stream: each pickle is unpickled straight from the file (bounded by the bytes left),
    and each storage is read into its own memory, so memory is the storages plus the objects.
    A plain pickle (not written by torch.save) is read as one restricted pickle.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:

        def next_pickle(load_storage: Any = None) -> Any:
            return RestrictedUnpickler(f, path=path, size=file_size - f.tell(), load_storage=load_storage).load()

        first = next_pickle()
        if type(first) is not int or first != LEGACY_MAGIC:  # a plain pickle: it must be all the file holds
            left = file_size - f.tell()
            if left:
                raise CorruptCheckpointError(
                    path,
                    f"{left} bytes follow the end of the pickle (another pickle a loader may read next); "
                    "torchkeep reads files whole or not at all",
                )
            return first
        if next_pickle() != LEGACY_PROTOCOL:
            raise CorruptCheckpointError(path, "legacy file: unknown protocol version")
        next_pickle()  # sys_info: byte order and type sizes, little-endian and standard on every torch
        storages: dict[str, LoadedStorage] = {}
        claimed = f.tell()

        def load_storage(kind: StorageType, key: str, location: str, numel: int) -> LoadedStorage:
            # The storages follow the pickles: together they cannot claim more than the file holds.
            nonlocal claimed
            nbytes = numel * itemsize(kind.dtype)
            claimed += nbytes
            if claimed > file_size:
                raise CorruptCheckpointError(path, f"storage {key!r} claims {nbytes} bytes, more than the file holds")
            skipped = _skipped(read_limit, nbytes, kind.dtype)
            storage = LoadedStorage(
                _geometry_storage(nbytes) if skipped else _new_storage(nbytes), kind.dtype, location
            )
            storages[key] = storage
            return storage

        with rebuild.deferred_checks(path, run_on_exit=False) as checks:
            obj = next_pickle(load_storage)
        keys = next_pickle()
        if not isinstance(keys, list) or len(keys) != len(storages) or set(keys) != set(storages):
            raise CorruptCheckpointError(path, "legacy file: storage keys do not match the object's storages")
        for key in keys:
            _read_legacy_storage(f, path, key, storages[key], file_size)
    if read_limit is None:
        checks.run()  # sparse tensors' indices need their data
    return obj


def _read_legacy_storage(f: Any, path: str, key: str, storage: LoadedStorage, file_size: int) -> None:
    """One storage record: its element count (int64), then its bytes, read straight into the storage."""
    header = f.read(8)
    if len(header) != 8:
        raise CorruptCheckpointError(path, "legacy file: truncated storage data")
    (numel,) = struct.unpack("<q", header)
    nbytes = storage.untyped.nbytes()
    if numel * itemsize(storage.dtype) != nbytes or f.tell() + nbytes > file_size:
        raise CorruptCheckpointError(path, f"legacy file: storage {key!r} is truncated or mis-sized")
    if storage.untyped.device.type == "meta":  # not wanted: only its size was checked
        f.seek(nbytes, os.SEEK_CUR)
    elif nbytes and not fill_from(f, byte_view(torch.empty(0, dtype=torch.uint8).set_(storage.untyped))):
        raise CorruptCheckpointError(path, f"legacy file: storage {key!r} is truncated")
