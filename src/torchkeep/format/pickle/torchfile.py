"""Reading files written by torch.save (zip archives and the legacy pre-1.6 format) without running code."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format.layout import byte_view
from torchkeep.format.pickle import rebuild
from torchkeep.format.pickle.rebuild import LoadedStorage, StorageType, itemsize
from torchkeep.format.pickle.scan import scan_pickle_bytes
from torchkeep.format.pickle.unpickler import RestrictedUnpickler, restricted_loads

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


def refuse_unsafe(
    data: bytes, path: str, *, start: int = 0, extra: Mapping[tuple[str, str], Any] | None = None
) -> None:
    """Raise UnsafeCheckpointError naming every global outside the allowlist, before unpickling."""
    scan, _ = scan_pickle_bytes(data, path, start=start)
    allowed = set(extra or ())
    refused = tuple(sorted({str(g) for g in scan.globals if g.verdict != "safe" and (g.module, g.name) not in allowed}))
    if refused:
        raise UnsafeCheckpointError(
            path,
            f"the pickle imports {', '.join(refused)}, which can run code. torchkeep did not run it. "
            "If you trust this file, pass trusted=True (it is then loaded with full pickle); "
            "to keep the safety, convert it once with `torchkeep convert --trusted`",
            globals_=refused,
        )


def _new_storage(nbytes: int) -> torch.UntypedStorage:
    return torch.empty(nbytes, dtype=torch.uint8).untyped_storage()


def _fill(storage: torch.UntypedStorage, data: memoryview) -> None:
    if data.nbytes:
        target = torch.empty(0, dtype=torch.uint8).set_(storage)
        target.numpy()[:] = np.frombuffer(data, dtype=np.uint8)


def is_zip(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04")


def read_torch_file(path: str) -> Any:
    """The object a torch.save file holds, rebuilt from an allowlist only."""
    with open(path, "rb") as f:
        head = f.read(4)
    if is_zip(head):
        return _read_zip(path)
    return _read_legacy(path)


def _data_offset(f: Any, info: zipfile.ZipInfo, path: str, file_size: int) -> int:
    if not 0 <= info.header_offset < file_size:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} has an out-of-range offset")
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or not local.startswith(b"PK\x03\x04"):
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} has no local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(info.header_offset + 30 + name_len + extra_len)


def _read_zip(path: str) -> Any:
    with open(path, "rb", buffering=0) as raw:
        return read_zip_stream(raw, path, os.path.getsize(path))


def read_zip_stream(raw: Any, path: str, file_size: int, *, extra: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """A torch.save archive from a seekable binary stream of ``file_size`` bytes."""
    try:
        archive = zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CorruptCheckpointError(path, f"not a readable zip archive: {exc}") from exc
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in infos if name.endswith("data.pkl") and name.count("/") <= 1]
        if len(pickles) != 1:
            raise CorruptCheckpointError(path, f"expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = infos.get(prefix + "byteorder")
        if byteorder is not None and _read_member(archive, raw, byteorder, path, file_size) != b"little":
            raise CorruptCheckpointError(path, "big-endian archives are not supported")
        data = _read_member(archive, raw, infos[pickles[0]], path, file_size)
        refuse_unsafe(data, path, extra=extra)

        def load_storage(kind: StorageType, key: str, location: str, numel: int) -> LoadedStorage:
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CorruptCheckpointError(path, f"storage {key!r} is missing from the archive")
            nbytes = numel * itemsize(kind.dtype)
            if info.file_size < nbytes:
                raise CorruptCheckpointError(path, f"storage {key!r} holds {info.file_size} bytes, needs {nbytes}")
            untyped = _new_storage(nbytes)
            if info.compress_type == zipfile.ZIP_STORED and info.file_size == nbytes:
                _read_stored_into(raw, info, path, file_size, untyped)  # straight into the storage: one copy
            else:
                _fill(untyped, memoryview(_read_member(archive, raw, info, path, file_size))[:nbytes])
            return LoadedStorage(untyped, kind.dtype, location)

        with rebuild.deferred_checks(path):
            return restricted_loads(data, path=path, load_storage=load_storage, extra=extra)


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
    filled = 0
    while filled < info.file_size:
        got = raw.readinto(view[filled:])
        if not got:
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} is truncated")
        filled += got
    if zlib.crc32(view) != info.CRC:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} fails its CRC check")


def _read_member(archive: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo, path: str, file_size: int) -> bytes:
    """A member's bytes, checked: sizes within the file (or a sane deflate ratio) and the CRC."""
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} declares inconsistent sizes")
        start = _data_offset(raw, info, path, file_size)
        if start + info.file_size > file_size:
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} runs past the end of the file")
        raw.seek(start)
        data = raw.read(info.file_size)
        if len(data) != info.file_size:
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} is truncated")
    else:
        if info.compress_size > file_size or info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} declares an impossible size")
        try:
            data = archive.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} is damaged: {exc}") from exc
    if zlib.crc32(data) != info.CRC:
        raise CorruptCheckpointError(path, f"zip entry {info.filename!r} fails its CRC check")
    return bytes(data)


def _read_legacy(path: str) -> Any:
    """The pre-1.6 format: magic, protocol, sys_info, the object, the storage keys, then raw storages.

    A plain pickle (not written by torch.save) is read as one restricted pickle.
    """
    data = Path(path).read_bytes()
    refuse_unsafe(data, path)
    stream = io.BytesIO(data)
    try:
        magic = RestrictedUnpickler(stream.read(), path=path).load()
    except Exception:  # not a torch legacy file: fall through to a plain pickle
        magic = None
    if magic != LEGACY_MAGIC:
        return restricted_loads(data, path=path)

    def next_pickle(position: int, what: str) -> tuple[Any, int]:
        scan, end = scan_pickle_bytes(data, path, start=position)
        if scan.error:
            raise CorruptCheckpointError(path, f"legacy file: damaged {what}: {scan.error}")
        refused = [str(g) for g in scan.globals if g.verdict != "safe"]
        if refused:
            raise UnsafeCheckpointError(path, f"the pickle imports {', '.join(refused)}; pass trusted=True if you "
                                        "trust this file", globals_=tuple(refused))  # fmt: skip
        return data[position:end], end

    position = 0
    chunk, position = next_pickle(position, "magic number")
    chunk, position = next_pickle(position, "protocol version")
    if restricted_loads(chunk, path=path) != LEGACY_PROTOCOL:
        raise CorruptCheckpointError(path, "legacy file: unknown protocol version")
    _, position = next_pickle(position, "system info")
    main, position = next_pickle(position, "object")
    storages: dict[str, LoadedStorage] = {}
    file_size = len(data)

    def load_storage(kind: StorageType, key: str, location: str, numel: int) -> LoadedStorage:
        nbytes = numel * itemsize(kind.dtype)
        if nbytes > file_size:
            raise CorruptCheckpointError(path, f"storage {key!r} claims {nbytes} bytes, more than the file")
        storage = LoadedStorage(_new_storage(nbytes), kind.dtype, location)
        storages[key] = storage
        return storage

    with rebuild.deferred_checks(path, run_on_exit=False) as checks:
        obj = restricted_loads(main, path=path, load_storage=load_storage)
    keys_chunk, position = next_pickle(position, "storage keys")
    keys = restricted_loads(keys_chunk, path=path)
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise CorruptCheckpointError(path, "legacy file: storage keys do not match the object's storages")
    for key in keys:
        storage = storages[key]
        if position + 8 > file_size:
            raise CorruptCheckpointError(path, "legacy file: truncated storage data")
        (numel,) = struct.unpack("<q", data[position : position + 8])
        position += 8
        nbytes = storage.untyped.nbytes()
        if numel * itemsize(storage.dtype) != nbytes or position + nbytes > file_size:
            raise CorruptCheckpointError(path, f"legacy file: storage {key!r} is truncated or mis-sized")
        _fill(storage.untyped, memoryview(data)[position : position + nbytes])
        position += nbytes
    checks.run()
    return obj
