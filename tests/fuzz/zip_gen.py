"""Hostile zip containers built from a real torch.save archive.

The members of a real archive are written back with a compression method chosen per member
(stored, deflate, bzip2, lzma), some dropped, renamed or duplicated (two entries, one name), some
forced to zip64; then fields of the local headers, the central directory and its end record are
overwritten with values that lie: sizes, offsets, counts, compression methods, the encryption flag.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zipfile

from hypothesis import strategies as s

from tests.fuzz import seeds

METHODS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
RENAMES = [
    "archive/data.pkl",
    "other/data.pkl",
    "/archive/data.pkl",
    "archive/../data.pkl",
    "archive/data/0",
    "archive/data/1",
    "data.pkl",
    "archive/data.pkl.bak",
    "archive\\data.pkl",
    "archive/byteorder",
    "",
]
# (signature, {field: (offset, struct format)})
RECORDS = {
    "local": (
        b"PK\x03\x04",
        {
            "flags": (6, "<H"),
            "method": (8, "<H"),
            "crc": (14, "<I"),
            "csize": (18, "<I"),
            "usize": (22, "<I"),
            "namelen": (26, "<H"),
            "extralen": (28, "<H"),
        },
    ),
    "central": (
        b"PK\x01\x02",
        {
            "needed": (6, "<H"),
            "flags": (8, "<H"),
            "method": (10, "<H"),
            "crc": (16, "<I"),
            "csize": (20, "<I"),
            "usize": (24, "<I"),
            "namelen": (28, "<H"),
            "extralen": (30, "<H"),
            "commentlen": (32, "<H"),
            "disk": (34, "<H"),
            "offset": (42, "<I"),
        },
    ),
    "end": (
        b"PK\x05\x06",
        {
            "disk": (4, "<H"),
            "entries_disk": (8, "<H"),
            "entries": (10, "<H"),
            "cdsize": (12, "<I"),
            "cdoffset": (16, "<I"),
            "commentlen": (20, "<H"),
        },
    ),
}
VALUES = ["zero", "one", "max", "plus1", "minus1", "double", 8, 12, 14, 99, 2**31, 0x0800, 0x0009]


@functools.cache
def members() -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(seeds.pickled()["torch_zip"])) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


field_change = s.tuples(
    s.sampled_from(sorted(RECORDS)),
    s.integers(0, 100),  # which record of that kind
    s.sampled_from(sorted({f for _, fields in RECORDS.values() for f in fields})),
    s.sampled_from(VALUES),
)
zip_cases = s.tuples(
    s.lists(s.sampled_from(METHODS), min_size=1, max_size=12),  # per member, cycled
    s.lists(
        s.tuples(
            s.integers(0, 100), s.sampled_from(["drop", "dup", "rename", "zip64", "empty"]), s.sampled_from(RENAMES)
        ),
        max_size=3,
    ),
    s.lists(field_change, max_size=3),
)


def _patch(data: bytearray, change: tuple[str, int, str, object]) -> None:
    kind, which, field, value = change
    signature, fields = RECORDS[kind]
    if field not in fields:
        return
    starts = []
    at = data.find(signature)
    while at != -1:
        starts.append(at)
        at = data.find(signature, at + 1)
    if not starts:
        return
    offset, fmt = fields[field]
    position = starts[which % len(starts)] + offset
    size = struct.calcsize(fmt)
    if position + size > len(data):
        return
    (old,) = struct.unpack_from(fmt, data, position)
    limit = (1 << (8 * size)) - 1
    new = {"zero": 0, "one": 1, "max": limit, "plus1": old + 1, "minus1": old - 1, "double": old * 2}.get(
        str(value), value
    )
    struct.pack_into(fmt, data, position, int(new) & limit)  # type: ignore[call-overload]


def write_zip_case(case: tuple[list[int], list[tuple[int, str, str]], list[tuple[str, int, str, object]]]) -> bytes:
    methods, edits, fields = case
    entries = [(name, data, methods[i % len(methods)], False) for i, (name, data) in enumerate(members())]
    for which, edit, new_name in edits:
        i = which % len(entries)
        name, data, method, zip64 = entries[i]
        if edit == "drop" and len(entries) > 1:
            del entries[i]
        elif edit == "dup":
            entries.append((name, data[::-1] if data else b"x", method, zip64))
        elif edit == "rename":
            entries[i] = (new_name, data, method, zip64)
        elif edit == "zip64":
            entries[i] = (name, data, method, True)
        elif edit == "empty":
            entries[i] = (name, b"", method, zip64)
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as archive:
        warnings.simplefilter("ignore")  # "Duplicate name": the point
        for name, data, method, zip64 in entries:
            info = zipfile.ZipInfo(name or "unnamed")
            info.compress_type = method
            with archive.open(info, "w", force_zip64=zip64) as member:
                member.write(data)
    out = bytearray(buf.getvalue())
    for change in fields:
        _patch(out, change)
    return bytes(out)
