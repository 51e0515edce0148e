"""Generated pickle opcode streams, wrapped as torch.save zip archives, legacy torch files and bare pickles.

The generator builds *expressions* (byte strings that push one value) from the opcodes of
``pickletools.opcodes``: scalars of every width (with lengths that lie), lists, dicts, tuples and
sets through MARK/APPEND(S)/SETITEM(S)/ADDITEMS, calls of allowlisted and forbidden globals
(GLOBAL, STACK_GLOBAL, INST, OBJ, REDUCE, NEWOBJ, NEWOBJ_EX, BUILD) with random arguments,
storages through persistent ids, real ``_rebuild_tensor_v2`` calls with hostile sizes and strides,
memo PUT/GET (shared sub-lists that double at each level), deep nesting, and stray opcodes
anywhere. Most streams are almost well-formed, so they get past the parser into the rebuilders.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile

from hypothesis import strategies as s

# Globals a stream may name: what torch.save writes, the rest of the allowlist, and forbidden ones.
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "FloatStorage"),
    ("torch", "LongStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BoolStorage"),
    ("torch", "QInt8Storage"),
    ("torch.storage", "UntypedStorage"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float32"),
    ("torch", "int64"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "per_tensor_affine"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "bytearray"),
    ("builtins", "range"),
    ("builtins", "bytes"),
    ("__builtin__", "set"),
    ("_codecs", "encode"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("argparse", "Namespace"),
    ("pytorch_lightning.utilities.parsing", "AttributeDict"),
    ("os", "system"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("posix", "system"),
    ("nt", "system"),
    ("subprocess", "Popen"),
    ("torch", "load"),
    ("__main__", "Net"),
    ("copyreg", "_reconstructor"),
    ("builtins", "object"),
    ("", ""),
    ("torch", ""),
    ("a\nb", "c"),
]
STORAGES = ["FloatStorage", "LongStorage", "HalfStorage", "BoolStorage", "ByteStorage", "QInt8Storage", "DoubleStorage"]
INTS = [0, 1, 2, 3, -1, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, -(2**63), 2**64, 10**40]

P = pickle  # the opcode byte constants


def unicode(text: str, form: int = 0) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    if form == 0 and len(data) < 256:
        return P.SHORT_BINUNICODE + bytes([len(data)]) + data
    if form == 1:
        return P.BINUNICODE8 + struct.pack("<Q", len(data)) + data
    if form == 2 and "\n" not in text and "\\" not in text:
        return P.UNICODE + data + b"\n"
    return P.BINUNICODE + struct.pack("<I", len(data)) + data


def integer(value: int, form: int = 0) -> bytes:
    if form == 0 and 0 <= value < 256:
        return P.BININT1 + bytes([value])
    if form == 0 and 0 <= value < 65536:
        return P.BININT2 + struct.pack("<H", value)
    if form <= 1 and -(2**31) <= value < 2**31:
        return P.BININT + struct.pack("<i", value)
    if form == 2:
        return P.INT + str(value).encode() + b"\n"
    if form == 3:
        return P.LONG + str(value).encode() + b"L\n"
    data = pickle.encode_long(value)
    return P.LONG1 + bytes([len(data)]) + data if len(data) < 256 else P.LONG4 + struct.pack("<i", len(data)) + data


def global_(module: str, name: str, stack: bool) -> bytes:
    if stack:
        return unicode(module) + P.MEMOIZE + unicode(name) + P.MEMOIZE + P.STACK_GLOBAL
    return P.GLOBAL + module.encode("utf-8", "surrogatepass") + b"\n" + name.encode("utf-8", "surrogatepass") + b"\n"


def tuple_of(items: list[bytes]) -> bytes:
    if len(items) == 0:
        return P.EMPTY_TUPLE
    if len(items) <= 3:
        return b"".join(items) + [P.TUPLE1, P.TUPLE2, P.TUPLE3][len(items) - 1]
    return P.MARK + b"".join(items) + P.TUPLE


def storage_ref(kind: str, key: str, location: str, numel: int, legacy: bool) -> bytes:
    parts = [unicode("storage"), global_("torch", kind, False), unicode(key), unicode(location), integer(numel)]
    if legacy:
        parts.append(P.NONE)
    return P.MARK + b"".join(parts) + P.TUPLE + P.BINPERSID


ints = s.one_of(s.sampled_from(INTS), s.integers(-(2**70), 2**70), s.integers(0, 16))
texts = s.one_of(
    s.sampled_from(
        [
            "",
            "0",
            "1",
            "storage",
            "cpu",
            "cuda:0",
            "latin1",
            "utf-8",
            "rot13",
            "bogus-codec",
            "weight",
            "__setstate__",
            "__dict__",
            "\udc80",
        ]
    ),
    s.text(max_size=8),
)

scalar = s.one_of(
    s.sampled_from([P.NONE, P.NEWTRUE, P.NEWFALSE, P.EMPTY_LIST, P.EMPTY_DICT, P.EMPTY_TUPLE, P.EMPTY_SET]),
    s.builds(integer, ints, s.integers(0, 4)),
    s.floats().map(lambda f: P.BINFLOAT + struct.pack(">d", f)),
    s.builds(unicode, texts, s.integers(0, 3)),
    s.binary(max_size=16).map(lambda b: P.SHORT_BINBYTES + bytes([len(b)]) + b),
    s.binary(max_size=16).map(lambda b: P.BYTEARRAY8 + struct.pack("<Q", len(b)) + b),
    # lengths that lie: far more than the stream holds
    s.sampled_from([2**31, 2**40, 2**63 - 1]).map(lambda n: P.BINBYTES8 + struct.pack("<Q", n) + b"xx"),
    s.sampled_from([2**31, 2**40]).map(lambda n: P.BYTEARRAY8 + struct.pack("<Q", n) + b"xx"),
    s.sampled_from([2**31 - 1, 10**6]).map(lambda n: P.LONG4 + struct.pack("<i", n) + b"\x01"),
    s.integers(0, 20).map(lambda i: P.BINGET + bytes([i])),
    s.integers(0, 2**32 - 1).map(lambda i: P.LONG_BINGET + struct.pack("<I", i)),
    s.builds(
        storage_ref,
        s.sampled_from(STORAGES),
        s.sampled_from(["0", "1", "2", "x", "../0"]),
        s.sampled_from(["cpu", "cuda:0", "meta", "bogus"]),
        ints,
        s.booleans(),
    ),
)


def _expressions(inner: s.SearchStrategy[bytes]) -> s.SearchStrategy[bytes]:
    items = s.lists(inner, max_size=4)
    globals_ = s.builds(lambda g, st: global_(g[0], g[1], st), s.sampled_from(GLOBALS), s.booleans())
    return s.one_of(
        items.map(lambda xs: P.EMPTY_LIST + (P.MARK + b"".join(xs) + P.APPENDS if xs else b"")),
        items.map(lambda xs: P.MARK + b"".join(xs) + P.LIST),
        items.map(lambda xs: P.EMPTY_LIST + b"".join(x + P.APPEND for x in xs)),
        s.lists(s.tuples(inner, inner), max_size=3).map(
            lambda kv: P.EMPTY_DICT + P.MARK + b"".join(k + v for k, v in kv) + P.SETITEMS
        ),
        s.lists(s.tuples(inner, inner), max_size=3).map(lambda kv: P.MARK + b"".join(k + v for k, v in kv) + P.DICT),
        items.map(tuple_of),
        items.map(lambda xs: P.EMPTY_SET + P.MARK + b"".join(xs) + P.ADDITEMS),
        items.map(lambda xs: P.MARK + b"".join(xs) + P.FROZENSET),
        # calls: a global and its arguments
        s.builds(lambda g, args: g + tuple_of(args) + P.REDUCE, globals_, items),
        s.builds(lambda g, args: g + tuple_of(args) + P.NEWOBJ, globals_, items),
        s.builds(lambda g, args, kw: g + tuple_of(args) + kw + P.NEWOBJ_EX, globals_, items, inner),
        s.builds(lambda g, args: P.MARK + g + b"".join(args) + P.OBJ, globals_, items),
        s.builds(
            lambda g, args: P.MARK + b"".join(args) + P.INST + g[0].encode() + b"\n" + g[1].encode() + b"\n",
            s.sampled_from(GLOBALS),
            items,
        ),
        s.builds(lambda obj, state: obj + state + P.BUILD, inner, inner),
        # a tensor as torch.save writes it, with hostile numbers
        s.builds(
            lambda storage, offset, size, stride, grad: (
                global_("torch._utils", "_rebuild_tensor_v2", False)
                + P.MARK
                + storage
                + offset
                + tuple_of(size)
                + tuple_of(stride)
                + grad
                + global_("collections", "OrderedDict", False)
                + P.EMPTY_TUPLE
                + P.REDUCE
                + P.TUPLE
                + P.REDUCE
            ),
            inner,
            s.builds(integer, ints),
            s.lists(s.builds(integer, ints), max_size=4),
            s.lists(s.builds(integer, ints), max_size=4),
            s.sampled_from([P.NEWFALSE, P.NEWTRUE]),
        ),
        # memo: store, fetch, and shared sub-lists that double at every level
        s.builds(lambda x, i: x + P.BINPUT + bytes([i]) + P.POP + P.BINGET + bytes([i]), inner, s.integers(0, 20)),
        s.builds(lambda x: x + P.MEMOIZE, inner),
        s.integers(1, 40).map(
            lambda depth: (
                P.EMPTY_LIST
                + P.BINPUT
                + b"\x00"
                + b"".join(
                    P.EMPTY_LIST + P.BINGET + b"\x00" + P.APPEND + P.BINGET + b"\x00" + P.APPEND + P.BINPUT + b"\x00"
                    for _ in range(depth)
                )
            )
        ),
        # self-reference: a list that holds itself
        s.just(P.EMPTY_LIST + P.BINPUT + b"\x01" + P.BINGET + b"\x01" + P.APPEND),
        s.builds(lambda x, n: b"".join([P.MARK] * n) + x + b"".join([P.TUPLE] * n), inner, s.integers(1, 2000)),
        s.builds(lambda x, n: x + b"".join([P.TUPLE1] * n), inner, s.integers(1, 5000)),
        s.builds(lambda x, n: x + P.DUP * n + P.MARK + P.POP_MARK, inner, s.integers(1, 50)),
    )


expression = s.recursive(scalar, _expressions, max_leaves=20)
STRAYS = [
    P.POP,
    P.DUP,
    P.MARK,
    P.POP_MARK,
    P.STOP,
    P.REDUCE,
    P.BUILD,
    P.APPEND,
    P.SETITEM,
    P.TUPLE,
    P.LIST,
    P.EXT1 + b"\x01",
    P.EXT2 + b"\x01\x00",
    P.FRAME + struct.pack("<Q", 2**40),
    P.PROTO + b"\x09",
    P.PERSID + b"0\n",
    P.GET + b"0\n",
    P.PUT + b"0\n",
    P.STRING + b"'abc'\n",
    P.BINSTRING + b"\xff\xff\xff\x7f",
    P.NEXT_BUFFER,
    P.READONLY_BUFFER,
    P.BINUNICODE + b"\xff\xff\xff\xff",
]
stream = s.builds(
    lambda proto, body, strays, at: _splice(P.PROTO + bytes([proto]) + body, strays, at) + P.STOP,
    s.sampled_from([2, 3, 4, 5]),
    expression,
    s.lists(s.sampled_from(STRAYS), max_size=2),
    s.integers(0, 10**6),
)


def _splice(data: bytes, strays: list[bytes], at: int) -> bytes:
    for stray in strays:
        i = at % (len(data) + 1)
        data = data[:i] + stray + data[i:]
    return data


STORAGE_BYTES = bytes(range(256)) * 2

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def as_zip(data: bytes, storages: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        for key in range(storages):
            archive.writestr(f"archive/data/{key}", STORAGE_BYTES[: 16 << key])
        archive.writestr("archive/version", "3\n")
    return buf.getvalue()


def as_legacy(data: bytes, storages: int) -> bytes:
    out = pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(LEGACY_PROTOCOL, protocol=2)
    out += pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
    out += data + pickle.dumps([str(k) for k in range(storages)], protocol=2)
    for key in range(storages):
        chunk = STORAGE_BYTES[: 16 << key]
        out += struct.pack("<q", len(chunk) // 4) + chunk
    return out


pickle_cases = s.tuples(s.sampled_from(["zip", "legacy", "bare"]), stream, s.integers(0, 3))


def write_pickle_case(case: tuple[str, bytes, int]) -> bytes:
    wrapper, data, storages = case
    if wrapper == "zip":
        return as_zip(data, storages)
    if wrapper == "legacy":
        return as_legacy(data, storages)
    return data


def describe(case: tuple[str, bytes, int]) -> str:
    """The stream disassembled (as far as it parses), for a finding's report."""
    out = io.StringIO()
    try:
        pickletools.dis(case[1], out=out)
    except Exception as exc:  # a malformed stream is the point
        out.write(f"<stops: {exc}>")
    return out.getvalue()
