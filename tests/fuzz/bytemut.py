"""Byte-level mutations of a file: flips, truncations, insertions, deletions, large values over fields."""

from __future__ import annotations

from hypothesis import strategies as s

mutation = s.one_of(
    s.tuples(s.just("flip"), s.integers(0, 10**6), s.integers(1, 255)),
    s.tuples(s.just("truncate"), s.integers(0, 10**6), s.just(0)),
    s.tuples(s.just("insert"), s.integers(0, 10**6), s.integers(0, 255)),
    s.tuples(s.just("delete"), s.integers(0, 10**6), s.integers(1, 64)),
    s.tuples(s.just("smash"), s.integers(0, 10**6), s.integers(0, 255)),
)
mutations = s.lists(mutation, min_size=1, max_size=4)


def mutate(data: bytes, changes: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in changes:
        if not out:
            break
        i = position % len(out)
        if kind == "flip":
            out[i] ^= value
        elif kind == "truncate":
            del out[i:]
        elif kind == "insert":
            out[i:i] = bytes([value]) * (1 + value % 8)
        elif kind == "delete":
            del out[i : i + value]
        else:  # smash 8 bytes, e.g. a length or an offset field, with a large value
            out[i : i + 8] = (value * 0x0101010101010101).to_bytes(8, "little")
    return bytes(out)
