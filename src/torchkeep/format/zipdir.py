"""Where a zip archive's central directory is, as each reader finds it.

Python's ``zipfile`` reads the central directory immediately before the end record (for zip64, the
zip64 end record immediately before its locator) and shifts every member's offset by however far
that is from the offset the end record declares (to allow data in front of the archive). torch's
reader (miniz) and most others read the directory at the declared offset, with the offsets as
written. In a file written by any zip library both are the same place; a file in which they differ
holds two directories, and torch would load members Python never sees (a benign ``data.pkl`` for
the scan, another for ``torch.load``). :func:`declared_view` finds such a file and gives the archive
as torch reads it, so the scanner reads both and the loader refuses it.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from torchkeep.format.layout import PositionedStream

_END = struct.Struct("<4s4H2LH")  # signature, disk, disk of directory, entries here, entries, size, offset, comment
_END64 = struct.Struct("<4sQ2H2L4Q")  # signature, record size, versions, disks, entries here, entries, size, offset
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, disks
_END_SIG, _END64_SIG, _LOCATOR_SIG = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


@dataclass(frozen=True)
class DeclaredDirectory:
    """The directory at the offset the end records declare, where Python's zipfile reads another place."""

    offset: int  # where torch's reader reads the directory
    size: int
    entries: int
    python_offset: int  # where Python's zipfile reads it

    def describe(self) -> str:
        return (
            f"its end record puts the zip central directory at offset {self.offset:,}, but the directory Python's "
            f"zipfile reads starts at {self.python_offset:,}: torch and Python would read different members"
        )


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def declared_directory(f: BinaryIO) -> DeclaredDirectory | None:
    """None when the archive's directory is where both kinds of reader look (every archive a zip library
    writes); else where the end records say it is. Never raises on damage (None: nothing to compare)."""
    try:
        end = getattr(zipfile, "_EndRecData")(f)  # the end record exactly as zipfile finds it  # noqa: B009
        if not end:
            return None
        location = int(end[9])
        raw = _read_at(f, location, _END.size)
        if len(raw) != _END.size:
            return None
        _sig, _disk, _disk_dir, _here, entries, size, offset, _comment = _END.unpack(raw)
        python_offset = location - size
        if end[0] == _END64_SIG:  # zipfile read the zip64 record right before the locator
            locator = _read_at(f, location - _LOCATOR.size, _LOCATOR.size)
            _lsig, _ldisk, end64_offset, _ldisks = _LOCATOR.unpack(locator)
            record = _read_at(f, end64_offset, _END64.size)
            python_end64 = location - _LOCATOR.size - _END64.size
            python_record = _read_at(f, python_end64, _END64.size)
            if len(record) != _END64.size or not record.startswith(_END64_SIG) or len(python_record) != _END64.size:
                return None
            entries, size, offset = _END64.unpack(record)[7:10]
            python_offset = python_end64 - _END64.unpack(python_record)[8]
        if offset == python_offset:
            return None
        return DeclaredDirectory(int(offset), int(size), int(entries), int(python_offset))
    except (OSError, ValueError, struct.error, OverflowError, zipfile.BadZipFile):
        return None


class _Spliced(PositionedStream):
    """The first ``length`` bytes of ``stream`` followed by ``tail``: an archive rebuilt around a directory."""

    def __init__(self, stream: Any, length: int, tail: bytes) -> None:
        super().__init__(length + len(tail))
        self.stream, self.length, self.tail = stream, length, tail

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.position < self.length:
            self.stream.seek(self.position)
            got = self.stream.readinto(view[: min(len(view), self.length - self.position)]) or 0
        else:
            start = self.position - self.length
            chunk = self.tail[start : start + len(view)]
            view[: len(chunk)] = chunk
            got = len(chunk)
        self.position += got
        return got


def declared_view(f: Any, declared: DeclaredDirectory, file_size: int) -> BinaryIO | None:
    """The archive as a reader of the declared directory sees it: the file up to the end of that directory,
    then a new end record right after it (so zipfile finds it there and shifts nothing). None when the
    declared directory does not fit in the file (such a reader fails)."""
    end_of_directory = declared.offset + declared.size
    if end_of_directory > file_size:
        return None
    entries, size, offset = declared.entries, declared.size, declared.offset
    if entries < 0xFFFF and size < 0xFFFFFFFF and offset < 0xFFFFFFFF:
        tail = _END.pack(_END_SIG, 0, 0, entries, entries, size, offset, 0)
    else:
        tail = (
            _END64.pack(_END64_SIG, _END64.size - 12, 45, 45, 0, 0, entries, entries, size, offset)
            + _LOCATOR.pack(_LOCATOR_SIG, 0, end_of_directory, 1)
            + _END.pack(_END_SIG, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        )
    return io.BufferedReader(_Spliced(f, end_of_directory, tail))
