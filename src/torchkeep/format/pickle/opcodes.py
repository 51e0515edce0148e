"""The pickle opcodes of protocols 0-5, one function each (names as in :mod:`pickletools`).

Each takes the :class:`~unpickler.RestrictedUnpickler` running it, charges what it builds to the
load's budget before building it, and fills only plain containers.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable
from struct import calcsize, unpack
from typing import TYPE_CHECKING, Any

from torchkeep.format.pickle import allowlist
from torchkeep.format.pickle.rebuild import BadData, RefusedData, describe

if TYPE_CHECKING:
    from torchkeep.format.pickle.unpickler import RestrictedUnpickler

# What CPython objects cost at worst, in bytes (measured, rounded up; the stack slot included):
# an object, a list or tuple item, a set item, a dict item, a memo entry.
OBJ, ITEM, ENTRY, PAIR, MEMO = 64, 8, 128, 48, 64


Op = Callable[["RestrictedUnpickler"], None]
OPS: dict[int, Op] = {}


def _op(*codes: bytes) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for code in codes:
            OPS[code[0]] = fn
        return fn

    return register


def _push(u: RestrictedUnpickler, value: Any, cost: int, what: str) -> None:
    u.budget.charge(cost, what)
    u.stack.append(value)


def _u8(u: RestrictedUnpickler) -> int:
    return u._read(1)[0]


def _fixed(fmt: str) -> Callable[[RestrictedUnpickler], Any]:
    width = calcsize(fmt)
    return lambda u: unpack(fmt, u._read(width))[0]


def _line_int(u: RestrictedUnpickler) -> int:
    return int(u._readline())


def _text_int(u: RestrictedUnpickler) -> Any:
    line = u._readline()  # protocol 0 writes booleans as INT 00 / 01
    return False if line == b"00" else True if line == b"01" else int(line, 0)


def _text_long(u: RestrictedUnpickler) -> int:
    line = u._readline()
    return int(line[:-1] if line.endswith(b"L") else line, 0)  # int() refuses over 4300 digits


def _long(width: str) -> Callable[[RestrictedUnpickler], int]:
    length = _u8 if width == "<B" else _fixed(width)

    def read(u: RestrictedUnpickler) -> int:
        n = length(u)
        if not 0 <= n <= u._left:
            raise BadData(f"truncated: an int of {n} bytes, {u._left} are left")
        u.budget.charge(n, "an int")
        return int.from_bytes(u._read(n), "little", signed=True)

    return read


# Opcodes that push one scalar: how to read it.
_SCALARS: dict[bytes, Callable[[RestrictedUnpickler], Any]] = {
    b"N": lambda u: None,
    b"\x88": lambda u: True,
    b"\x89": lambda u: False,
    b")": lambda u: (),
    b"K": _u8,
    b"J": _fixed("<i"),
    b"M": _fixed("<H"),
    b"G": _fixed(">d"),
    b"F": lambda u: float(u._readline()),
    b"I": _text_int,
    b"L": _text_long,
    b"\x8a": _long("<B"),
    b"\x8b": _long("<i"),
}
for _code, _reader in _SCALARS.items():

    def _scalar(u: RestrictedUnpickler, read: Callable[[RestrictedUnpickler], Any] = _reader) -> None:
        value = read(u)
        _push(u, value, sys.getsizeof(value) + ITEM, "a number")

    OPS[_code[0]] = _scalar


def _latin1(data: bytes) -> str:
    return data.decode("latin1")  # Python 2 str: torch's legacy files are read as latin-1


def _utf8(data: bytes) -> str:
    return str(data, "utf-8", "surrogatepass")


# Opcodes that push a length-prefixed string: the length's struct format, and what the bytes become.
_STRINGS: dict[bytes, tuple[str, Callable[[bytes], Any]]] = {
    b"T": ("<i", _latin1),
    b"U": ("<B", _latin1),
    b"X": ("<I", _utf8),
    b"\x8c": ("<B", _utf8),
    b"\x8d": ("<Q", _utf8),
    b"B": ("<I", bytes),
    b"C": ("<B", bytes),
    b"\x8e": ("<Q", bytes),
    b"\x96": ("<Q", bytearray),
}
for _code, (_width, _convert) in _STRINGS.items():
    _length = _fixed(_width)

    def _string(u: RestrictedUnpickler, length: Any = _length, convert: Any = _convert) -> None:
        n = length(u)
        if not 0 <= n <= u._left:
            raise BadData(f"truncated: a string of {n} bytes, {u._left} are left")
        u.budget.charge(n, "a string")  # before the bytes are read
        value = convert(u._read(n))
        _push(u, value, sys.getsizeof(value) + ITEM, "a string")

    OPS[_code[0]] = _string


@_op(b"S")
def _quoted_string(u: RestrictedUnpickler) -> None:
    line = u._readline()
    if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
        raise BadData("the STRING opcode argument must be quoted")
    value = _latin1(codecs.escape_decode(line[1:-1])[0])
    _push(u, value, sys.getsizeof(value) + ITEM, "a string")


@_op(b"V")
def _unicode(u: RestrictedUnpickler) -> None:
    value = str(u._readline(), "raw-unicode-escape")
    _push(u, value, sys.getsizeof(value) + ITEM, "a string")


@_op(b"\x80")
def _proto(u: RestrictedUnpickler) -> None:
    if _u8(u) > 5:
        raise BadData("pickle protocol newer than 5")


@_op(b"\x95")
def _frame(u: RestrictedUnpickler) -> None:
    (n,) = unpack("<Q", u._read(8))
    if n > u._left:
        raise BadData(f"truncated: a frame of {n} bytes, {u._left} are left")


@_op(b".")
def _stop(u: RestrictedUnpickler) -> None:
    u._result = u.stack.pop()
    u._stopped = True


@_op(b"(")
def _mark(u: RestrictedUnpickler) -> None:
    u.budget.charge(OBJ, "a mark")
    u.metastack.append(u.stack)
    u.stack = []


@_op(b"0")
def _pop(u: RestrictedUnpickler) -> None:
    if u.stack:
        u.stack.pop()
    else:
        u.pop_mark()


@_op(b"1")
def _pop_mark(u: RestrictedUnpickler) -> None:
    u.pop_mark()


@_op(b"2")
def _dup(u: RestrictedUnpickler) -> None:
    _push(u, u.stack[-1], ITEM, "DUP")


@_op(b"]")
def _empty_list(u: RestrictedUnpickler) -> None:
    _push(u, [], OBJ, "a list")


@_op(b"}")
def _empty_dict(u: RestrictedUnpickler) -> None:
    _push(u, {}, OBJ, "a dict")


@_op(b"\x8f")
def _empty_set(u: RestrictedUnpickler) -> None:
    _push(u, set(), 4 * OBJ, "a set")


@_op(b"l")
def _list(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()
    _push(u, items, OBJ + ITEM * len(items), "a list")


@_op(b"t")
def _tuple(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()  # before u.stack is looked up: pop_mark replaces it
    u.stack.append(u._tuple(items))


@_op(b"\x85", b"\x86", b"\x87")
def _tuple_n(u: RestrictedUnpickler) -> None:
    n = u._last_op - 0x84  # TUPLE1..TUPLE3
    if len(u.stack) < n:
        raise BadData("TUPLE of an empty stack")
    u.stack[-n:] = [u._tuple(u.stack[-n:])]


@_op(b"d")
def _dict(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()
    u.budget.charge(OBJ + PAIR * (len(items) // 2), "a dict")
    result: dict[Any, Any] = {}
    u._keys(result, items[0::2])
    result.update(zip(items[0::2], items[1::2], strict=False))
    u.stack.append(result)


@_op(b"\x91")
def _frozenset(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()
    u.budget.charge(4 * OBJ + ENTRY * len(items), "a frozenset")
    u._keys(items, items)
    result = frozenset(items)
    u._note_depth(result, items)
    u.stack.append(result)


@_op(b"a")
def _append(u: RestrictedUnpickler) -> None:
    value = u.stack.pop()
    target = u.stack[-1]
    if type(target) is not list:
        raise RefusedData(f"APPEND to {describe(target)}")
    u.budget.charge(ITEM, "a list item")
    target.append(value)


@_op(b"e")
def _appends(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()
    target = u.stack[-1]
    if type(target) is not list:
        raise RefusedData(f"APPENDS to {describe(target)}")
    u.budget.charge(ITEM * len(items), "list items")
    target.extend(items)


@_op(b"s")
def _setitem(u: RestrictedUnpickler) -> None:
    value = u.stack.pop()
    key = u.stack.pop()
    target = u._dict_target()
    u.budget.charge(PAIR, "a dict item")
    u._keys(target, (key,))
    target[key] = value


@_op(b"u")
def _setitems(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()
    target = u._dict_target()
    u.budget.charge(PAIR * (len(items) // 2), "dict items")
    u._keys(target, items[0::2])
    for i in range(0, len(items) - 1, 2):
        target[items[i]] = items[i + 1]


@_op(b"\x90")
def _additems(u: RestrictedUnpickler) -> None:
    items = u.pop_mark()
    target = u.stack[-1]
    if type(target) is not set:
        raise RefusedData(f"ADDITEMS to {describe(target)}")
    u.budget.charge(ENTRY * len(items), "set items")
    u._keys(target, items)
    target.update(items)


# Memo writes and reads: how each opcode gives its index.
_PUTS: dict[bytes, Callable[[RestrictedUnpickler], int]] = {
    b"p": _line_int,
    b"q": _u8,
    b"r": _fixed("<I"),
    b"\x94": lambda u: len(u.memo),
}
_GETS: dict[bytes, Callable[[RestrictedUnpickler], int]] = {b"g": _line_int, b"h": _u8, b"j": _fixed("<I")}
for _code, _index in _PUTS.items():

    def _put(u: RestrictedUnpickler, index: Callable[[RestrictedUnpickler], int] = _index) -> None:
        i = index(u)
        if i < 0:
            raise BadData("negative memo index")
        u.budget.charge(MEMO, "a memo entry")
        u.memo[i] = u.stack[-1]

    OPS[_code[0]] = _put
for _code, _index in _GETS.items():

    def _get(u: RestrictedUnpickler, index: Callable[[RestrictedUnpickler], int] = _index) -> None:
        i = index(u)
        if i not in u.memo:
            raise BadData(f"memo entry {i} is read before it is written")
        _push(u, u.memo[i], ITEM, "a memo reference")

    OPS[_code[0]] = _get


@_op(b"c")
def _global(u: RestrictedUnpickler) -> None:
    module = u._readline().decode("utf-8")
    name = u._readline().decode("utf-8")
    _push(u, u.find_class(module, name), ITEM, "a global")


@_op(b"\x93")
def _stack_global(u: RestrictedUnpickler) -> None:
    name = u.stack.pop()
    module = u.stack.pop()
    if type(module) is not str or type(name) is not str:
        raise BadData("STACK_GLOBAL names that are not strings")
    _push(u, u.find_class(module, name), ITEM, "a global")


@_op(b"R")
def _reduce(u: RestrictedUnpickler) -> None:
    args = u.stack.pop()
    u.stack[-1] = u._call(u.stack[-1], args)


@_op(b"i")
def _inst(u: RestrictedUnpickler) -> None:
    module = u._readline().decode("utf-8")
    name = u._readline().decode("utf-8")
    cls = u.find_class(module, name)
    args = tuple(u.pop_mark())
    u.stack.append(u._call(cls, args))


@_op(b"o")
def _obj(u: RestrictedUnpickler) -> None:
    args = u.pop_mark()
    if not args:
        raise BadData("OBJ without a class")
    u.stack.append(u._call(args[0], tuple(args[1:])))


@_op(b"\x81")
def _newobj(u: RestrictedUnpickler) -> None:
    args = u.stack.pop()
    cls = u.stack.pop()
    u.stack.append(u._new(cls, args, None))


@_op(b"\x92")
def _newobj_ex(u: RestrictedUnpickler) -> None:
    kwargs = u.stack.pop()
    args = u.stack.pop()
    cls = u.stack.pop()
    u.stack.append(u._new(cls, args, kwargs))


@_op(b"b")
def _build(u: RestrictedUnpickler) -> None:
    state = u.stack.pop()
    u.budget.charge(OBJ, "BUILD")
    allowlist.build(u.stack[-1], state)


@_op(b"P")
def _persid(u: RestrictedUnpickler) -> None:
    u.stack.append(u.persistent_load(u._readline().decode("ascii")))


@_op(b"Q")
def _binpersid(u: RestrictedUnpickler) -> None:
    u.stack[-1] = u.persistent_load(u.stack[-1])


@_op(b"\x82", b"\x83", b"\x84", b"\x97", b"\x98")
def _refused(u: RestrictedUnpickler) -> None:
    # EXT1-4 name globals by number through copyreg's registry; NEXT_BUFFER / READONLY_BUFFER want
    # out-of-band buffers from the caller. No torch file uses either.
    raise RefusedData(f"opcode {u._last_op:#04x} (extension registry or out-of-band buffer) is not supported")
