"""Hand-built hostile pickles: each a few bytes to a few hundred KB that, unchecked, demands gigabytes, recurses
without end, or runs quadratic. Written as raw opcodes (see ``pickletools``), plain and inside torch archives."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

P2, P4 = b"\x80\x02", b"\x80\x04"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def long1(n: int) -> bytes:
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def binint(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def text(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def put(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


def ints_tuple(values: Iterable[int]) -> bytes:
    return b"(" + b"".join(long1(v) for v in values) + b"t"


def tensor(key: str, numel: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """Pushes ``_rebuild_tensor_v2`` of a float32 storage ``key`` (a persistent id), as torch.save writes it."""
    storage = b"(" + text("storage") + glob("torch", "FloatStorage") + text(key) + text("cpu") + long1(numel) + b"tQ"
    args = storage + binint(0) + ints_tuple(size) + ints_tuple(stride) + b"\x89" + glob("collections", "OrderedDict")
    return glob("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b")Rt" + b"R"


def torch_zip(data_pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """A torch.save-like archive around a hand-built data.pkl."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return buf.getvalue()


def legacy_file(main: bytes, keys: list[str], records: list[bytes]) -> bytes:
    """torch.save's pre-1.6 format: magic, protocol, sys_info, the object, its storage keys, the storages."""
    head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    return head + main + pickle.dumps(keys, protocol=2) + b"".join(records)


def _nested_lists(n: int) -> bytes:
    return P2 + b"]" * n + b"a" * (n - 1) + b"."


def _nested_dicts(n: int) -> bytes:
    return P2 + b"}K\x00" * (n - 1) + b"}" + b"s" * (n - 1) + b"."


def _memo_fanout(width: int, levels: int) -> bytes:
    """A list of ``width`` ints, then lists of ``width`` references to the list below: width**levels as a tree."""
    out = P2 + b"](" + b"K\x01" * width + b"e" + put(0)
    for level in range(1, levels + 1):
        out += b"](" + get(level - 1) * width + b"e" + put(level)
    return out + b"."


def _repeated_calls(callable_: bytes, arg: bytes, times: int) -> bytes:
    """``[f(arg)] * times`` with f and arg memoized: each call builds a fresh copy of its argument."""
    return P2 + callable_ + put(0) + arg + put(1) + b"(" + (get(0) + get(1) + b"\x85R") * times + b"l."


def _hash_flood(n: int) -> bytes:
    modulus = (1 << 61) - 1  # every multiple of it hashes to 0
    return P2 + b"}(" + b"".join(long1(k * modulus) + b"N" for k in range(1, n + 1)) + b"u."


# name -> (pickle, expected error, fragment of the message)
HOSTILE: dict[str, tuple[bytes, str, str]] = {
    "bytearray_of_10GB_py2_name": (
        P2 + glob("__builtin__", "bytearray") + long1(10**10) + b"\x85R.",
        "UnsafeCheckpointError",
        "bytearray from",
    ),
    "bytearray_of_10GB": (P4 + glob("builtins", "bytearray") + long1(10**10) + b"\x85R.", "UnsafeCheckpointError", ""),
    "bytes_of_10GB": (P2 + glob("__builtin__", "bytes") + long1(10**10) + b"\x85R.", "UnsafeCheckpointError", ""),
    "nested_lists_100k": (_nested_lists(10**5), "CorruptCheckpointError", "nest more than"),
    "nested_dicts_100k": (_nested_dicts(10**5), "CorruptCheckpointError", "nest more than"),
    "nested_tuple_as_key_100k": (P2 + b"}K\x00" + b"\x85" * 10**5 + b"Ns.", "CorruptCheckpointError", "tuples nest"),
    "list_containing_itself": (P2 + b"]" + put(0) + get(0) + b"a.", "CorruptCheckpointError", "contains itself"),
    "dict_containing_itself": (P2 + b"}" + put(0) + b"K\x00" + get(0) + b"s.", "CorruptCheckpointError", "itself"),
    "memo_fanout_1000_pow_6": (_memo_fanout(1000, 6), "CorruptCheckpointError", "shared references"),
    "set_of_a_shared_list_20k_times": (
        _repeated_calls(glob("__builtin__", "set"), b"(" + b"".join(binint(i) for i in range(20000)) + b"l", 20000),
        "CorruptCheckpointError",
        "past",
    ),
    "codecs_encode_of_1MB_2000_times": (
        P2
        + glob("_codecs", "encode")
        + put(0)
        + text("x" * (1 << 20))
        + put(1)
        + text("latin1")
        + put(2)
        + b"("
        + (get(0) + get(1) + get(2) + b"\x86R") * 2000
        + b"l.",
        "CorruptCheckpointError",
        "past",
    ),
    "ordered_dict_of_shared_pairs": (
        _repeated_calls(
            glob("collections", "OrderedDict"),
            b"(" + b"".join(binint(i) + b"N\x86" for i in range(20000)) + b"l",
            20000,
        ),
        "CorruptCheckpointError",
        "past",
    ),
    "binunicode8_claiming_2_pow_60": (
        P4 + b"\x8d" + struct.pack("<Q", 1 << 60) + b"abc.",
        "CorruptCheckpointError",
        "truncated",
    ),
    "binbytes8_claiming_2_pow_60": (
        P4 + b"\x8e" + struct.pack("<Q", 1 << 60) + b"abc.",
        "CorruptCheckpointError",
        "truncated",
    ),
    "long4_claiming_2_pow_31": (
        P2 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b".",
        "CorruptCheckpointError",
        "truncated",
    ),
    "frame_claiming_2_pow_60": (
        P4 + b"\x95" + struct.pack("<Q", 1 << 60) + b"N.",
        "CorruptCheckpointError",
        "truncated",
    ),
    "int_of_a_million_digits": (b"L" + b"9" * 10**6 + b"L\n.", "CorruptCheckpointError", "digits"),
    "hash_flood_2000_keys": (_hash_flood(2000), "CorruptCheckpointError", "hash"),
    "bad_codec_name": (
        P2 + glob("_codecs", "encode") + text("a") + text("bogus") + b"\x86R.",
        "UnsafeCheckpointError",
        "bogus",
    ),
    "torch_size_past_int64": (
        P2 + glob("torch", "Size") + ints_tuple((2**40, 2**40)) + b"\x85R.",
        "CorruptCheckpointError",
        "2**63",
    ),
    "torch_size_negative": (
        P2 + glob("torch", "Size") + ints_tuple((-1, 3)) + b"\x85R.",
        "CorruptCheckpointError",
        "non-negative",
    ),
    "slice_of_slices": (
        P2 + glob("__builtin__", "slice") + put(0) + get(0) + b"N\x85R\x85R.",
        "UnsafeCheckpointError",
        "slice of",
    ),
    "unknown_opcode": (P2 + b"\xff.", "CorruptCheckpointError", "unknown opcode"),
    "extension_registry_opcode": (P2 + b"\x82\x01.", "UnsafeCheckpointError", "extension registry"),
    "newobj_of_an_ordered_dict": (
        P2 + glob("collections", "OrderedDict") + b")\x81.",
        "UnsafeCheckpointError",
        "NEWOBJ",
    ),
    "append_to_a_set": (P4 + b"\x8fNa.", "UnsafeCheckpointError", "APPEND"),
    "setitem_on_a_list": (P2 + b"]K\x00Ns.", "UnsafeCheckpointError", "SETITEM"),
    "call_of_a_built_value": (P2 + b"]" + b")R.", "UnsafeCheckpointError", "not an allowed global"),
    "stack_underflow": (P2 + b"a.", "CorruptCheckpointError", "malformed pickle"),
    "numpy_dtype_state_with_fields": (
        P2
        + glob("numpy", "dtype")
        + text("f8")
        + b"\x89\x88\x87R"
        + b"(K\x03"
        + text("|")
        + b"N("
        + text("a")
        + b"t}"
        + binint(8)
        + binint(8)
        + b"K\x00tb.",
        "UnsafeCheckpointError",
        "byte order",
    ),
    "numpy_array_without_its_bytes": (
        P2
        + glob("numpy.core.multiarray", "_reconstruct")
        + glob("numpy", "ndarray")
        + b"K\x00\x85C\x01b\x87R"
        + b"(K\x01"
        + ints_tuple((10**6,))
        + glob("numpy", "dtype")
        + text("f8")
        + b"\x89\x88\x87R"
        + b"\x89C\x08"
        + b"\x00" * 8
        + b"tb.",
        "CorruptCheckpointError",
        "without exactly its bytes",
    ),
}

# Hostile tensors: name -> (data.pkl, storages, expected error, fragment)
HOSTILE_TENSORS: dict[str, tuple[bytes, dict[str, bytes], str, str]] = {
    "view_past_int64_elements": (
        P2 + tensor("0", 4, (2**40, 2**40), (0, 0)) + b".",
        {"0": bytes(16)},
        "CorruptCheckpointError",
        "2**63",
    ),
    "view_broadcast_to_2_pow_62": (
        P2 + tensor("0", 4, (2**31, 2**31), (0, 0)) + b".",
        {"0": bytes(16)},
        "CorruptCheckpointError",
        "repeats",
    ),
    "view_past_its_storage": (
        P2 + tensor("0", 4, (5,), (1,)) + b".",
        {"0": bytes(16)},
        "CorruptCheckpointError",
        "exceeds its storage",
    ),
    "storage_claiming_10_pow_12_elements": (
        P2 + tensor("0", 10**12, (4,), (1,)) + b".",
        {"0": bytes(16)},
        "CorruptCheckpointError",
        "needs",
    ),
    "legacy_set_on_a_tensor_by_build": (
        P2
        + tensor("0", 4, (4,), (1,))
        + b"("
        + tensor("0", 4, (4,), (1,))
        + binint(0)
        + ints_tuple((4,))
        + ints_tuple((1,))
        + b"tb.",
        {"0": bytes(16)},
        "UnsafeCheckpointError",
        "BUILD",
    ),
}


def legacy_storages_claiming_the_file(count: int) -> bytes:
    """A legacy file of 1 MiB whose object names ``count`` storages of 1 MiB each: each fits, together they do not."""
    numel = (1 << 20) // 4
    refs = b"".join(text(str(i)) + tensor(str(i), numel, (1,), (1,)) for i in range(count))
    main = P2 + b"}(" + refs + b"u."
    return legacy_file(main, [str(i) for i in range(count)], [struct.pack("<q", numel) + bytes(1 << 20)])


def write_hostile(directory: Path) -> dict[str, tuple[Path, str, str]]:
    """Every hostile file (plain pickle, inside a torch archive, legacy) -> (path, expected error, fragment)."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, str, str]] = {}
    for name, (data, error, fragment) in HOSTILE.items():
        for kind, blob in (("pkl", data), ("pt", torch_zip(data))):
            path = directory / f"{name}.{kind}"
            path.write_bytes(blob)
            files[path.name] = (path, error, fragment)
    for name, (data, storages, error, fragment) in HOSTILE_TENSORS.items():
        path = directory / f"{name}.pt"
        path.write_bytes(torch_zip(data, storages))
        files[path.name] = (path, error, fragment)
    path = directory / "legacy_storages_claiming_the_file.pth"
    path.write_bytes(legacy_storages_claiming_the_file(64))
    files[path.name] = (path, "CorruptCheckpointError", "more than the file holds")
    return files
