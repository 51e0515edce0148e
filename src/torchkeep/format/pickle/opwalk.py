"""A static walk over one pickle's opcodes: every global it would import, without executing anything.

The walk reads the stream the way CPython's C unpickler does (one opcode, then its argument) and
keeps a model of the unpickler's stack, marks and memo, so that ``STACK_GLOBAL`` sees the same two
strings the unpickler would, however they got there (memo tricks, ``DUP``, ``POP``, marks). Where
the model cannot know a value, it says so and the global is reported as computed (dangerous).

Only failures the real unpickler shares stop a walk early: a byte that is no opcode, the end of
the data, a stack underflow or missing mark, a memo entry never stored, ``STACK_GLOBAL`` of a
non-string, a module name no import can resolve. Arguments Python parses more leniently than
:mod:`pickletools` (``I0x10``) never stop it. Memory is bounded: arguments are read into memory
only up to :data:`MAX_VALUE_BYTES`, lines up to :data:`MAX_LINE_BYTES`, and the stack, memo and
list of globals have caps (:class:`Limits`).
"""

from __future__ import annotations

import io
import pickletools
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal, cast

from torchkeep.format.pickle import allowlist

GlobalStatus = Literal["safe", "unknown", "dangerous"]
Status = Literal["safe", "unknown", "unreadable", "dangerous"]
Verdict = Literal["safe", "suspicious", "dangerous"]
RANK: dict[str, int] = {"safe": 0, "unknown": 1, "unreadable": 1, "dangerous": 2}


@dataclass
class Limits:
    """Caps that keep a walk's memory small on any input. Module-level :data:`LIMITS`; tests shrink it."""

    max_value_bytes: int = 1 << 20  # an argument read into memory (longer ones are skipped)
    max_line_bytes: int = 1 << 16  # a text argument (protocol 0) read into memory
    max_name_chars: int = 512  # longer strings are kept only as "some string"
    max_stack: int = 200_000
    max_memo: int = 200_000
    max_globals: int = 10_000
    max_read_bytes: int = 4 << 30  # bytes one walk may read (a compressed member can expand without end)


LIMITS = Limits()

DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "_subprocess", "sys", "shutil",
    "socket", "_socket", "runpy", "importlib", "_imp", "_frozen_importlib", "_frozen_importlib_external",
    "zipimport", "imp", "pkgutil", "pickle", "_pickle", "pickletools", "copyreg", "copy_reg", "marshal", "types",
    "ctypes", "_ctypes", "cffi", "pty", "commands", "code", "codeop", "multiprocessing", "_multiprocessing",
    "threading", "_thread", "concurrent", "asyncio", "webbrowser", "antigravity", "this", "http", "urllib",
    "urllib2", "requests", "httplib", "ftplib", "smtplib", "smtpd", "telnetlib", "imaplib", "poplib", "nntplib",
    "socketserver", "xmlrpc", "wsgiref", "mailcap", "pip", "ensurepip", "venv", "setuptools", "pkg_resources",
    "distutils", "_distutils_hack", "lib2to3", "idlelib", "tkinter", "_tkinter", "turtle", "turtledemo", "tempfile",
    "inspect", "operator", "_operator", "functools", "_functools", "signal", "glob", "platform", "io", "_io",
    "codecs", "builtins", "__builtin__", "__main__", "pydoc", "pydoc_data", "timeit", "trace", "pdb", "bdb",
    "cProfile", "profile", "_lsprof", "doctest", "unittest", "test", "dill", "cloudpickle", "joblib", "yaml",
    "jinja2", "nturl2path", "site", "sysconfig", "linecache", "gc", "weakref", "resource", "fcntl", "mmap",
    "select", "selectors", "logging", "shelve", "dbm", "sqlite3", "tarfile", "zipfile", "pathlib", "fileinput",
    "readline", "rlcompleter", "cgi", "cgitb", "uuid", "numpy.f2py", "numpy.distutils", "numpy.testing",
    "numpy.lib.format", "numpy.ctypeslib", "numpy.lib.npyio", "torch.hub", "torch.jit", "torch.package",
    "torch.serialization", "torch.utils", "torch.distributed", "torch.fx", "torch._dynamo", "torch._inductor",
    "torch.ops", "torch.library", "torch._ops", "torch.compiler", "torch.export", "torch._export", "torch.cuda",
    "torch.backends", "torch._C", "torch.onnx", "torch.testing", "torch._functorch", "torch.multiprocessing",
})  # fmt: skip
DANGEROUS_NAMES = frozenset({
    "system", "popen", "exec", "eval", "load", "loads", "load_inline", "spawn", "run", "call", "check_call",
    "check_output", "getoutput", "getstatusoutput", "Popen", "__import__", "getattr", "setattr", "delattr",
    "compile", "open", "execfile", "import_module", "attrgetter", "itemgetter", "methodcaller", "partial",
    "reduce", "apply", "main", "pipepager", "pager", "locate", "resolve_name", "runctx", "runcall", "runcode",
    "runsource", "interact", "run_path", "run_module", "timeit", "repeat", "findmatch", "from_file", "fromfile",
    "memmap", "execv", "execve", "spawnv", "remove", "unlink", "rmtree", "write", "write_text", "write_bytes",
})  # fmt: skip


def _is_dangerous(module: str, name: str) -> bool:
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(
        prefixes & DANGEROUS_MODULES
        or (module == "torch" and not name[:1].isupper())  # torch.load, torch.save, torch.from_file, ...
        or (module in ("numpy", "np") and not name[:1].isupper() and name not in ("dtype", "ndarray"))
        or set(name.split(".")) & DANGEROUS_NAMES
        or any(part.startswith("__") for part in name.split("."))
    )


def classify(module: str, name: str, extra: frozenset[tuple[str, str]] = frozenset()) -> GlobalStatus:
    """safe: on the allowlist. dangerous: can run code or touch the system. unknown: anything else."""
    if allowlist.is_allowed(module, name) or (module, name) in extra:
        return "safe"
    if _is_dangerous(module, name) or _is_dangerous(*allowlist.canonical(module, name)):
        return "dangerous"
    return "unknown"


@dataclass(frozen=True)
class GlobalRef:
    """One global a pickle imports. ``status`` is safe, unknown or dangerous."""

    module: str
    name: str
    status: GlobalStatus

    @property
    def verdict(self) -> Verdict:
        """The coarse verdict of earlier versions: unknown is "suspicious"."""
        return "suspicious" if self.status == "unknown" else self.status

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class PickleScan:
    """One pickle: where it is, what it imports, and whether it was read to its STOP.

    Attributes:
        location: the file (and member, and ``#pickleN`` for a later pickle in the same stream).
        globals: every distinct global the pickle imports, in order.
        complete: the walk reached STOP; otherwise ``error`` says where and why it stopped.
        error: why the walk stopped early, or None.
        imported: the walk reached an opcode that imports (even if it stopped after it).
        value: the pickle's value when it is a plain int (the legacy torch header), else None.
        truncated: the walk stopped because the data ended before STOP.
        started_with_proto: the first opcode was PROTO (what protocols 2-5 write first).
        limited: the walk stopped at a cap of :class:`Limits` (skipped for size).
    """

    location: str
    globals: list[GlobalRef] = field(default_factory=list)
    complete: bool = False
    error: str | None = None
    imported: bool = False
    value: int | None = None
    truncated: bool = False
    started_with_proto: bool = False
    limited: bool = False

    @property
    def status(self) -> Status:
        statuses = {g.status for g in self.globals}
        if "dangerous" in statuses:
            return "dangerous"
        if not self.complete:
            return "unreadable"
        return "unknown" if "unknown" in statuses else "safe"

    @property
    def verdict(self) -> Verdict:
        status = self.status
        return "suspicious" if status in ("unknown", "unreadable") else cast(Verdict, status)


class PickleEnded(Exception):
    """The real unpickler fails here too: nothing after this point would run."""


class Truncated(PickleEnded):
    """The data ends before the pickle's STOP."""


class WalkLimit(Exception):
    """The walk gave up (a cap of :class:`Limits`); the rest of the pickle is unverified."""


class _Mark:
    __slots__ = ()


MARK = _Mark()
ANY: Any = object()  # a value the model cannot know: it may be a string
OTHER: Any = object()  # a value that is certainly not a string
_LINE, _ARG1, _ARG4, _ARG4U, _ARG8U = (
    pickletools.UP_TO_NEWLINE,
    pickletools.TAKEN_FROM_ARGUMENT1,
    pickletools.TAKEN_FROM_ARGUMENT4,
    pickletools.TAKEN_FROM_ARGUMENT4U,
    pickletools.TAKEN_FROM_ARGUMENT8U,
)
_PREFIX = {_ARG1: ("<B", 1), _ARG4: ("<i", 4), _ARG4U: ("<I", 4), _ARG8U: ("<Q", 8)}
_OPS: list[pickletools.OpcodeInfo | None] = [None] * 256
for _op in pickletools.opcodes:
    _OPS[ord(_op.code)] = _op
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
# Results that may be any object (so possibly a string): what calls, imports and lookups return.
_MAY_BE_STR = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "GLOBAL", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


class Source:
    """A binary stream read forward, with a count of bytes read and an optional known size."""

    def __init__(self, stream: BinaryIO, *, size: int | None = None, limits: Limits | None = None) -> None:
        self.stream, self.size, self.limits = stream, size, limits or LIMITS
        self.pos = 0

    def _count(self, n: int) -> None:
        self.pos += n
        if self.pos > self.limits.max_read_bytes:
            raise WalkLimit(f"stopped after reading {self.limits.max_read_bytes:,} bytes (skipped for size)")

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        self._count(len(data))
        if len(data) != n:
            raise Truncated(f"the data ends at offset {self.pos} before the pickle's STOP (truncated)")
        return data

    def skip(self, n: int) -> None:
        """Step over ``n`` bytes without keeping them."""
        if self.size is not None and self.pos + n > self.size:
            raise Truncated(f"an argument of {n:,} bytes at offset {self.pos} runs past the end (truncated)")
        while n:
            chunk = self.read(min(n, 1 << 20))
            n -= len(chunk)

    def line(self, limit: int) -> bytes | None:
        """One line without its newline, or None when it is longer than ``limit`` (then skipped)."""
        data = self.stream.readline(limit + 1)
        self._count(len(data))
        if data.endswith(b"\n"):
            return data[:-1]
        if len(data) <= limit:
            raise Truncated(f"the data ends at offset {self.pos} inside a text argument (truncated)")
        while True:
            more = self.stream.readline(1 << 20)
            self._count(len(more))
            if not more:
                raise Truncated(f"the data ends at offset {self.pos} inside a text argument (truncated)")
            if more.endswith(b"\n"):
                return None


def _importable(module: str) -> bool:
    """Whether the name is a dotted Python identifier, the only kind of name a module is installed under.

    (A file of another name, e.g. ``my hook.py``, beside the script could still be imported: that
    is code shipped next to the model, which a pickle scanner does not judge.) Random bytes that
    happen to start with ``c`` fail here, as the import would.
    """
    return all(part.isidentifier() for part in module.split("."))


class Walk:
    """The state of one walk: the modelled stack, marks and memo, and what was found."""

    def __init__(self, source: Source, location: str, extra: frozenset[tuple[str, str]]) -> None:
        self.source, self.extra, self.limits = source, extra, source.limits
        self.result = PickleScan(location)
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.memo_lost = False  # past the memo cap: a missing entry is unknown, not an error
        self.seen: set[tuple[str, str]] = set()
        self.started_with_proto = False

    # The stack, as the C unpickler checks it: nothing is popped across a mark.
    def pop(self) -> Any:
        if not self.stack or self.stack[-1] is MARK:
            raise PickleEnded("unpickling stack underflow: the real unpickler fails here")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is MARK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise PickleEnded("could not find MARK: the real unpickler fails here")

    def push(self, value: Any) -> None:
        if len(self.stack) >= self.limits.max_stack:
            raise WalkLimit(f"stack deeper than {self.limits.max_stack:,} items")
        self.stack.append(value)

    def top(self) -> Any:
        if not self.stack or self.stack[-1] is MARK:
            raise PickleEnded("unpickling stack underflow: the real unpickler fails here")
        return self.stack[-1]

    def add(self, module: str, name: str, status: GlobalStatus | None = None) -> None:
        self.result.imported = True
        if (module, name) in self.seen:
            return
        if len(self.seen) >= self.limits.max_globals:
            raise WalkLimit(f"more than {self.limits.max_globals:,} distinct globals")
        self.seen.add((module, name))
        self.result.globals.append(GlobalRef(module, name, status or classify(module, name, self.extra)))

    def import_(self, module: str, name: str) -> None:
        if not _importable(module):
            raise PickleEnded(f"imports {module!r}, which no import can resolve: the real unpickler fails here")
        self.add(module, name)

    def memo_put(self, key: int, value: Any) -> None:
        if key in self.memo or len(self.memo) < self.limits.max_memo:
            self.memo[key] = value
        else:
            self.memo_lost = True

    def memo_get(self, key: int) -> Any:
        if key in self.memo:
            return self.memo[key]
        if self.memo_lost:
            return ANY
        raise PickleEnded(f"memo entry {key} was never stored: the real unpickler fails here")

    def argument(self, op: pickletools.OpcodeInfo) -> Any:
        """The opcode's argument, parsed as pickletools parses it; ANY where that fails or it is too long."""
        arg = op.arg
        assert arg is not None
        if arg is pickletools.stringnl_noescape_pair:  # GLOBAL, INST: decoded as the C unpickler does
            names: list[Any] = []
            for _ in range(2):
                text = self.source.line(self.limits.max_line_bytes)
                try:
                    # An over-long name is not an error to the unpickler: under protocol 4 a dotted name of any
                    # length is resolved (``os.path.os.path....os.system``), so it is kept as unknown (ANY).
                    names.append(text.decode("utf-8") if text is not None else ANY)
                except UnicodeDecodeError:
                    names.append(None)
            return names
        if arg.n >= 0:
            raw = self.source.read(arg.n)
        elif arg.n == _LINE:
            text = self.source.line(self.limits.max_line_bytes)
            if text is None:
                return ANY
            raw = text + b"\n"
        else:
            fmt, width = _PREFIX[arg.n]
            prefix = self.source.read(width)
            (length,) = struct.unpack(fmt, prefix)
            if length < 0:
                raise PickleEnded(f"negative length {length} at offset {self.source.pos}")
            if length > self.limits.max_value_bytes:
                self.source.skip(length)
                return ANY
            raw = prefix + self.source.read(length)
        try:
            return arg.reader(io.BytesIO(raw))
        except Exception:  # pickle may read what pickletools refuses (int("0x10")): not a stop
            return ANY

    def name_value(self, value: Any) -> Any:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, str):
            return value if len(value) <= self.limits.max_name_chars else ANY
        return ANY

    def step(self, op: pickletools.OpcodeInfo) -> bool:
        """Apply one opcode to the model; True at STOP."""
        name = op.name
        arg = self.argument(op) if op.arg is not None else None
        if name in _STRINGS:
            self.push(self.name_value(arg))
        elif name in _INTS:
            self.push(arg if type(arg) is int and arg.bit_length() <= 128 else OTHER)
        elif name == "MARK":
            self.push(MARK)
        elif name == "POP":
            if not self.stack:
                raise PickleEnded("unpickling stack underflow: the real unpickler fails here")
            self.stack.pop()  # pops a mark too, as CPython does
        elif name == "DUP":
            self.push(self.top())
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            value = self.top()
            if isinstance(arg, int):  # pickletools reads PUT "01" as True: the unpickler stores key 1
                self.memo_put(int(arg), value)
            else:  # a key pickletools cannot parse but the unpickler might: later lookups are unknown
                self.memo_lost = True
        elif name == "MEMOIZE":
            self.memo_put(len(self.memo), self.top())
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            self.push(self.memo_get(int(arg)) if isinstance(arg, int) else ANY)
        elif name in ("GLOBAL", "INST"):
            if name == "INST":
                self.pop_mark()  # CPython finds the mark before it imports
            module, attr = cast("list[Any]", arg)
            if module is None or attr is None:
                raise PickleEnded(f"{name} names a module that is not UTF-8: the real unpickler fails here")
            if isinstance(module, str) and isinstance(attr, str):
                self.import_(module, attr)
            else:
                if isinstance(module, str) and not _importable(module):
                    raise PickleEnded(f"imports {module!r}, which no import can resolve: the real unpickler fails here")
                shown = (
                    module if isinstance(module, str) else f"<a module name over {self.limits.max_line_bytes:,} bytes>"
                )
                self.add(shown, f"<a name over {self.limits.max_line_bytes:,} bytes, not read>", "dangerous")
            self.push(ANY)
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if module is OTHER or attr is OTHER:
                raise PickleEnded("STACK_GLOBAL of a non-string: the real unpickler fails here")
            if isinstance(module, str) and isinstance(attr, str):
                self.import_(module, attr)
            else:
                self.add("<computed>", "STACK_GLOBAL of names the file computes", "dangerous")
            self.push(ANY)
        elif name in ("EXT1", "EXT2", "EXT4"):
            # CPython and torch register no extension codes, so the unpickler fails here; a process that
            # registered some would import whatever they name. Reported as computed in anything that starts
            # like a pickle (raw tensor bytes starting with 0x82 are not one).
            if not self.started_with_proto:
                raise PickleEnded(f"extension code {arg} is not registered: the real unpickler fails here")
            self.add("copyreg._extension_registry", f"code {arg}", "dangerous")
            self.push(ANY)
        elif name in ("APPEND", "SETITEM"):
            for _ in range(1 if name == "APPEND" else 2):
                self.pop()
            self.top()
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            self.pop_mark()
            if not any(item is not MARK for item in self.stack):
                raise PickleEnded("unpickling stack underflow: the real unpickler fails here")
        elif name == "BUILD":
            self.pop()
            self.top()
        elif name == "PROTO":
            if type(arg) is int and arg > 5:
                raise PickleEnded(f"unsupported pickle protocol {arg}")
        elif name == "STOP":
            value = self.pop()
            self.result.value = value if type(value) is int else None
            return True
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                items = self.pop_mark()
                needed = sum(1 for s in before[before.index(pickletools.markobject) + 1 :]
                             if s is not pickletools.stackslice)  # fmt: skip
                if len(items) < needed:
                    raise PickleEnded("unpickling stack underflow: the real unpickler fails here")
            else:
                for _ in before:
                    self.pop()
            for _ in op.stack_after:
                self.push(ANY if name in _MAY_BE_STR else OTHER)
        return False

    def run(self) -> PickleScan:
        result = self.result
        try:
            while True:
                code = self.source.read(1)
                op = _OPS[code[0]]
                if op is None:
                    raise PickleEnded(f"byte {code!r} at offset {self.source.pos - 1} is not a pickle opcode")
                if self.source.pos == 1:
                    self.started_with_proto = result.started_with_proto = op.name == "PROTO"
                if self.step(op):
                    result.complete = True
                    break
        except (PickleEnded, WalkLimit) as exc:
            result.error = str(exc)
            result.truncated = isinstance(exc, Truncated)
            result.limited = isinstance(exc, WalkLimit)
        except Exception as exc:  # a stream that fails underneath (a damaged compressed member)
            result.error = f"unreadable: {type(exc).__name__}: {exc}"
        return result


def walk_pickle(
    stream: BinaryIO,
    location: str,
    *,
    size: int | None = None,
    extra: frozenset[tuple[str, str]] = frozenset(),
    limits: Limits | None = None,
) -> tuple[PickleScan, int]:
    """Walk one pickle from the stream's position; returns the scan and how many bytes it read."""
    source = Source(stream, size=size, limits=limits)
    scan = Walk(source, location, extra).run()
    return scan, source.pos


def scan_pickle_bytes(
    data: bytes, location: str, *, start: int = 0, extra: frozenset[tuple[str, str]] = frozenset()
) -> tuple[PickleScan, int]:
    """Walk one pickle's opcodes from ``start``; returns the scan and where the pickle ended."""
    stream = io.BytesIO(data)
    stream.seek(start)
    scan, read = walk_pickle(stream, location, size=max(len(data) - start, 0), extra=extra)
    return scan, start + read
