"""A restricted unpickler: it builds only what the allowlist allows, within a memory budget, as a bounded tree.

Python's C unpickler cannot be checked opcode by opcode, so this is a small interpreter of the
pickle opcodes of protocols 0-5 (like torch's own ``weights_only`` unpickler) in which each
opcode is checked:

- globals come from :mod:`allowlist` only; REDUCE calls only its replacements, NEWOBJ creates
  only our plain record classes, BUILD fills only what ``allowlist.build`` accepts, APPEND /
  SETITEM / ADDITEMS fill only plain lists, dicts and sets;
- every length is checked against the bytes left before it is read, and every object built is
  charged to a :class:`~rebuild.Budget`: at most ``BUDGET_RATIO`` bytes of objects per pickle
  byte read (or ``BUDGET_FLOOR``), allowed calls included;
- tuples nest at most ``MAX_DEPTH`` deep as they are built (Python hashes them recursively in
  C, without a recursion guard); dict and set keys cannot flood one hash;
- the result is walked once: no cycles, at most ``MAX_DEPTH`` deep, and at most ``max_elements``
  elements counted through shared references, so code that walks it as a tree stays bounded.

Every failure is an UnsafeCheckpointError (something that could run code) or a
CorruptCheckpointError (anything else), naming the file.
"""

from __future__ import annotations

import collections
import io
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format.pickle import allowlist, rebuild
from torchkeep.format.pickle.opcodes import ITEM, OBJ, OPS
from torchkeep.format.pickle.rebuild import BadData, Budget, LoadedStorage, RefusedData, StorageType, describe

# Objects one pickle may build: BUDGET_RATIO bytes per pickle byte read, and at least BUDGET_FLOOR.
# CPython objects take 4-35x their pickled size (measured: floats 4x, a vocabulary dict 12x, small dicts of
# lists and tuples 34x), hence 64: the bound is linear, with room for dense benign pickles.
BUDGET_FLOOR = 64 << 20
BUDGET_RATIO = 64
# Deepest nesting of containers; well under Python's recursion limit (1000), so that code walking
# the result recursively (printing it, comparing it, mapping tensors to a device) cannot overflow.
MAX_DEPTH = 200
# Elements of the result counted as a tree (a list shared twice counts twice): max(this, 2x the pickle bytes).
MAX_ELEMENTS = 1 << 22
# Longest line of a protocol-0 opcode (text ints, strings, global names).
MAX_LINE = 64 << 20

# persistent id -> storage; the reader decides where the bytes come from.
StorageLoader = Callable[[StorageType, str, str, int], LoadedStorage]
_LEAF = object()


class RestrictedUnpickler:
    """Unpickles plain data, tensors and storages; any other global raises UnsafeCheckpointError.

    Args:
        source: the pickle bytes, or a binary file positioned at the pickle (it is read up to the
            STOP opcode and no further, so consecutive pickles can be read one after another).
        path: the file, for error messages.
        load_storage: builds a storage from a persistent id; None if the file holds none.
        extra: more allowed globals, for one format's own plain classes (DCP metadata).
        size: with a file, the most bytes the pickle may span (the bytes left in the file).
    """

    def __init__(
        self,
        source: bytes | bytearray | memoryview | BinaryIO,
        *,
        path: str,
        load_storage: StorageLoader | None = None,
        extra: Mapping[tuple[str, str], Any] | None = None,
        size: int | None = None,
    ) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._file: BinaryIO = io.BytesIO(source)
            self._size = len(source)
        else:
            if size is None:
                raise TypeError("size= is required with a file")
            self._file, self._size = source, size
        self._start = self._file.tell()
        self._left = self._size
        self.path = path
        self.extra = {allowlist.canonical(*key): value for key, value in (extra or {}).items()}
        self.load_storage = load_storage
        self.storages: dict[str, LoadedStorage] = {}
        self.budget = Budget(BUDGET_FLOOR, BUDGET_RATIO, self._consumed)
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self._callables: set[int] = set()  # ids of the replacements find_class handed out
        self._tuple_depth: dict[int, tuple[Any, int]] = {}  # id -> (tuple or frozenset, depth), kept alive
        self._key_hashes: dict[int, collections.Counter[int]] = {}
        self._stopped = False
        self._result: Any = None
        self._last_op = 0

    def _consumed(self) -> int:
        return self._size - self._left

    def load(self) -> Any:
        """The object the pickle holds, checked; typed errors only."""
        try:
            with rebuild.budget_in_force(self.budget):
                ops, read = OPS, self._read
                while not self._stopped:
                    code = self._last_op = read(1)[0]
                    op = ops.get(code)
                    if op is None:
                        raise BadData(f"unknown opcode {code:#04x} at pickle byte {self._consumed() - 1}")
                    op(self)
                check_structure(self._result, max(MAX_ELEMENTS, 2 * self._consumed()))
            return self._result
        except (UnsafeCheckpointError, CorruptCheckpointError):
            raise
        except RefusedData as exc:
            raise UnsafeCheckpointError(self.path, f"refused: {exc}") from exc
        except BadData as exc:
            raise CorruptCheckpointError(self.path, f"malformed pickle: {exc}") from exc
        except Exception as exc:  # whatever an untrusted pickle makes the code above raise is damage
            message = str(exc)[:300]
            raise CorruptCheckpointError(self.path, f"malformed pickle: {type(exc).__name__}: {message}") from exc

    # -- reading -------------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        if n > self._left:
            raise BadData(f"truncated: an opcode needs {n} bytes, {self._left} are left")
        data = self._file.read(n)
        if len(data) != n:
            raise BadData("truncated")
        self._left -= n
        return data

    def _readline(self) -> bytes:
        cap = min(self._left, MAX_LINE)
        line = self._file.readline(cap)
        self._left -= len(line)
        if not line.endswith(b"\n"):
            raise BadData(f"a text line longer than {MAX_LINE} bytes" if len(line) == MAX_LINE else "truncated")
        return line[:-1]

    # -- what the opcodes may do ---------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        found = self.extra.get(allowlist.canonical(module, name))
        if found is None:
            found = allowlist.lookup(module, name)
        if found is None:
            self._refuse(f"{module}.{name}")
        if callable(found):
            self._callables.add(id(found))
        return found

    def _refuse(self, name: str) -> None:
        refused = sorted({name, *self._every_refused_global()})
        raise UnsafeCheckpointError(
            self.path,
            f"the pickle imports {', '.join(refused)}, which can run code. torchkeep did not run it. "
            "If you trust this file, pass trusted=True (it is then loaded with full pickle); "
            "to keep the safety, convert it once with `torchkeep convert --trusted`",
            globals_=tuple(refused),
        )

    def _every_refused_global(self) -> list[str]:
        """Every global outside the allowlist in this pickle, for the error message (the scanner's walk)."""
        from torchkeep.format.pickle.scan import scan_pickle_bytes

        try:
            self._file.seek(self._start)
            blob = self._file.read(min(self._size, BUDGET_FLOOR))
            scan, _ = scan_pickle_bytes(blob, self.path, extra=frozenset(self.extra))
            return [str(g) for g in scan.globals if g.verdict != "safe"]
        except Exception:  # the message then names the first refused global only
            return []

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or not pid or pid[0] != "storage" or len(pid) < 5:
            raise UnsafeCheckpointError(self.path, f"refused persistent id {describe(pid)}")
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        if len(pid) > 5 and pid[5] is not None:
            raise CorruptCheckpointError(self.path, "legacy storage views are not supported")
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise CorruptCheckpointError(self.path, f"malformed storage reference {describe(pid)}")
        if not 0 <= numel <= rebuild.INT64_MAX or not isinstance(location, str) or len(key) > 256:
            raise CorruptCheckpointError(self.path, f"storage {describe(key)} has a bad size or location")
        if self.load_storage is None:
            raise CorruptCheckpointError(self.path, "pickle refers to storages but the file holds none")
        if key not in self.storages:
            self.storages[key] = self.load_storage(storage_type, key, location, numel)
        return self.storages[key]

    def _call(self, func: Any, args: Any) -> Any:
        if id(func) not in self._callables or not callable(func):
            raise RefusedData(f"call of {describe(func)}, which is not an allowed global")
        if type(args) is not tuple:
            raise BadData(f"call arguments are {describe(args)}, not a tuple")
        self.budget.charge(OBJ, "a call")
        result = func(*args)
        if type(result) is frozenset:
            self._note_depth(result, result)
        return result

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        # Pickles create instances only through copyreg.__newobj__: no arguments, state by BUILD.
        if not (isinstance(cls, type) and issubclass(cls, rebuild.SafeState) and id(cls) in self._callables):
            raise RefusedData(f"NEWOBJ of {describe(cls)}, which is not an allowed class")
        if args != () or kwargs not in (None, {}):
            raise BadData("NEWOBJ with arguments")
        self.budget.charge(OBJ, "an object")
        return cls.__new__(cls)

    def _note_depth(self, container: tuple[Any, ...] | frozenset[Any], items: Any) -> None:
        """Tuples and frozensets are hashed recursively: bound their depth as they are built."""
        depth = 1
        for item in items:
            if type(item) is tuple or type(item) is frozenset:
                entry = self._tuple_depth.get(id(item))
                d = entry[1] + 1 if entry is not None and entry[0] is item else 2
                if d > depth:
                    depth = d
        if depth > MAX_DEPTH:
            raise BadData(f"tuples nest more than {MAX_DEPTH} deep")
        if depth > 1:
            self._tuple_depth[id(container)] = (container, depth)

    def _tuple(self, items: list[Any]) -> tuple[Any, ...]:
        self.budget.charge(OBJ + ITEM * len(items), "a tuple")
        result = tuple(items)
        self._note_depth(result, items)
        return result

    def _keys(self, target: Any, keys: Any) -> None:
        """Count the unsalted hashes of keys going into ``target`` (str and bytes hashes are salted)."""
        counts = None
        for key in keys:
            if type(key) is not str and type(key) is not bytes:
                if counts is None:
                    counts = self._key_hashes.setdefault(id(target), collections.Counter())
                self.budget.charge(OBJ, "a key's hash count")
                h = hash(key)
                counts[h] += 1
                if counts[h] > rebuild.MAX_HASH_COLLISIONS:
                    raise BadData(f"more than {rebuild.MAX_HASH_COLLISIONS} keys of one dict or set share a hash "
                                  "(a hash-flooding attack)")  # fmt: skip

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _dict_target(self) -> dict[Any, Any]:
        target = self.stack[-1]
        if type(target) not in (dict, collections.OrderedDict) and not (
            isinstance(target, dict) and isinstance(target, rebuild.SafeState)
        ):
            raise RefusedData(f"SETITEM on {describe(target)}")
        return target  # type: ignore[no-any-return]


# -- the result ------------------------------------------------------------------------------------


def _children(obj: Any) -> Iterator[Any] | None:
    """What a walk over the result descends into; None for a leaf (scalars, strings, tensors, arrays)."""
    kind = type(obj)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        elements: Iterator[Any] = iter(obj)
        return elements
    attributes: dict[str, Any] | None = getattr(obj, "__dict__", None) if isinstance(obj, dict) else None
    if isinstance(obj, dict):
        items: Iterator[Any] = itertools.chain.from_iterable(obj.items())
        return itertools.chain(items, attributes.values()) if attributes else items
    if isinstance(obj, rebuild.SafeState):
        attributes = vars(obj)
        return iter(attributes.values())
    return None


def check_structure(root: Any, max_elements: int) -> None:
    """Refuse a result that cycles, nests deeper than MAX_DEPTH, or counts more than ``max_elements`` as a tree.

    One iterative pass; a container reached twice is counted twice (with its size from the first
    visit), since that is what code walking the result as a tree will do.

    Raises:
        BadData: naming which limit the structure breaks.
    """
    first = _children(root)
    if first is None:
        return
    done: dict[int, int] = {}  # id -> elements under it, as a tree
    on_path = {id(root)}
    path: list[list[Any]] = [[root, first, 1]]  # container, its children, its size so far
    while path:
        frame = path[-1]
        child = next(frame[1], _LEAF)
        if child is _LEAF:
            path.pop()
            on_path.discard(id(frame[0]))
            done[id(frame[0])] = size = frame[2]
            if not path:
                return
            frame = path[-1]
        elif (known := done.get(id(child))) is not None:
            size = known
        elif id(child) in on_path:
            raise BadData(f"the pickle holds a {type(child).__name__} that contains itself; torchkeep returns trees")
        elif (children := _children(child)) is None:
            size = 1
        elif len(path) >= MAX_DEPTH:
            raise BadData(f"containers nest more than {MAX_DEPTH} deep")
        else:
            on_path.add(id(child))
            path.append([child, children, 1])
            continue
        frame[2] += size
        if frame[2] > max_elements:
            raise BadData(f"more than {max_elements} elements counted through shared references (a memo bomb)")


def restricted_loads(
    data: bytes,
    *,
    path: str,
    load_storage: StorageLoader | None = None,
    extra: Mapping[tuple[str, str], Any] | None = None,
) -> Any:
    """Unpickle ``data`` with the allowlist (plus ``extra``, for one format's own plain classes).

    Damage is CorruptCheckpointError; a global that could run code is UnsafeCheckpointError.
    """
    return RestrictedUnpickler(data, path=path, load_storage=load_storage, extra=extra).load()
