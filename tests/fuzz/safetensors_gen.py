"""Safetensors files with hostile headers: real headers mutated as JSON, and headers generated from scratch.

A mutated header is written back with a correct length prefix and padding, and either stripped of
torchkeep's checksum keys (a plain safetensors file: nothing checked, every validator reached),
re-signed (header and tensor checksums recomputed, as an attacker can), or left as it is. The data
region can be refitted to the largest offset the header claims, so range checks pass and the bytes
reach torch. Generated headers tile their offsets exactly, with shapes that hold huge dimensions,
zero dimensions, and element counts that overflow int64.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from hypothesis import strategies as s

from tests.fuzz import jsonmut, seeds
from torchkeep.format.dtypes import CODE_TO_DTYPE, ITEMSIZE
from torchkeep.format.layout import META_CHECKSUMS, META_FORMAT, META_HEADER, RESERVED_PREFIX, digest

MAX_DATA = 1 << 20  # a generated file holds at most this much data; larger claims get none
DIMS = [0, 1, 2, 3, 5, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64]
CODES = [*CODE_TO_DTYPE, "F8_E8M0", "I4", "C128", "bool", "", "F32 "]
NAMES = ["w", "a.b", "a.b.c", "", " ", "__metadata__x", "torchkeep.xxh3_64", "module.w", "_orig_mod.w", "é"]

mutated = s.tuples(
    s.just("mutated"),
    s.sampled_from(["plain", "tied"]),
    jsonmut.mutations,
    s.sampled_from(["strip", "resign", "keep"]),
    s.booleans(),  # refit the data region
)
entry = s.tuples(
    s.one_of(s.sampled_from(NAMES), s.text(max_size=6)),
    s.sampled_from(CODES),
    s.lists(s.one_of(s.sampled_from(DIMS), s.integers(0, 6)), max_size=6),
)
generated = s.tuples(
    s.just("generated"),
    s.lists(entry, min_size=1, max_size=5),
    s.sampled_from(["strip", "resign"]),
    s.integers(-3, 3),  # bytes of data more (or fewer) than the header claims
)
header_cases = s.one_of(mutated, generated)


def _header_field(value: str) -> bytes:
    return json.dumps({META_HEADER: value}, separators=(",", ":"))[1:-1].encode()


def _span(info: Any) -> tuple[int, int] | None:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
        start, end = offsets
        if 0 <= start <= end <= MAX_DATA:
            return start, end
    return None


def serialize(header: Any, data: bytes, signing: str) -> bytes:
    """Length prefix, header (padded to 8), data; with torchkeep's keys stripped, recomputed, or kept."""
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    resign = False
    if isinstance(meta, dict):
        if signing == "strip":
            header["__metadata__"] = {k: v for k, v in meta.items() if not str(k).startswith(RESERVED_PREFIX)}
        elif signing == "resign":
            sums = {}
            for name, info in header.items():
                span = _span(info)
                if span is not None:
                    sums[name] = digest(data[span[0] : span[1]])
            meta.update({META_FORMAT: "1", META_CHECKSUMS: json.dumps(sums, separators=(",", ":"))})
            meta[META_HEADER] = "0" * 16
            resign = True
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    if resign:
        body = body.replace(_header_field("0" * 16), _header_field(digest(body)))
    return struct.pack("<Q", len(body)) + body + data


def _split(file: bytes) -> tuple[Any, bytes]:
    (length,) = struct.unpack("<Q", file[:8])
    return json.loads(file[8 : 8 + length]), file[8 + length :]


def _refit(header: Any, data: bytes) -> bytes:
    ends = [span[1] for info in (header.values() if isinstance(header, dict) else []) if (span := _span(info))]
    size = max(ends, default=len(data))
    return data[:size] + bytes(max(0, size - len(data)))


def _generated(entries: list[tuple[str, str, list[int]]], extra: int) -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": {}}
    position = 0
    for name, code, shape in entries:
        nbytes = math.prod(shape) * ITEMSIZE.get(code, 4)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    size = max(0, position + extra) if position <= MAX_DATA else 0
    return header, bytes(size)


def write_header_case(case: tuple[Any, ...]) -> bytes:
    if case[0] == "generated":
        _, entries, signing, extra = case
        header, data = _generated(entries, extra)
        return serialize(header, data, signing)
    _, seed, changes, signing, refit = case
    header, data = _split(seeds.safetensors() if seed == "plain" else seeds.tied_safetensors())
    header = jsonmut.apply(header, changes)
    if refit:
        data = _refit(header, data)
    return serialize(header, data, signing)
