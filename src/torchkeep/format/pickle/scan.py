"""Static analysis of pickles: which globals they import, without executing anything."""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from torchkeep.format.pickle import allowlist

Verdict = Literal["safe", "suspicious", "dangerous"]
_RANK = {"safe": 0, "suspicious": 1, "dangerous": 2}

DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "runpy", "importlib", "pickle", "_pickle",
    "marshal", "types", "ctypes", "pty", "commands", "code", "codeop", "multiprocessing", "threading", "asyncio",
    "webbrowser", "http", "urllib", "urllib2", "requests", "httplib", "ftplib", "smtplib", "telnetlib", "pip",
    "setuptools", "distutils", "tempfile", "zipimport", "imp", "inspect", "operator", "functools", "signal",
    "glob", "platform", "io", "_io", "codecs", "builtins", "__builtin__", "pydoc", "timeit", "trace", "pdb",
    "bdb", "cProfile", "profile", "dill", "cloudpickle", "joblib", "yaml", "jinja2", "numpy.testing", "nturl2path",
    "site", "sysconfig", "linecache", "gc", "weakref", "resource", "fcntl", "mmap", "select", "selectors",
})  # fmt: skip
DANGEROUS_TORCH = (
    "torch._C",
    "torch.hub",
    "torch.jit",
    "torch.package",
    "torch.serialization",
    "torch.utils",
    "torch.distributed",
    "torch.fx",
    "torch._dynamo",
    "torch._inductor",
    "torch.ops",
    "torch.library",
    "torch._ops",
    "torch.compiler",
    "torch.export",
    "torch._export",
    "torch.cuda",
    "torch.backends",
)
DANGEROUS_NAMES = frozenset(
    {
        "system",
        "popen",
        "exec",
        "eval",
        "load",
        "loads",
        "spawn",
        "run",
        "call",
        "check_output",
        "Popen",
        "__import__",
        "getattr",
        "setattr",
        "compile",
        "open",
        "execfile",
        "import_module",
        "attrgetter",
        "methodcaller",
        "partial",
        "apply",
    }
)


def classify(module: str, name: str, extra: frozenset[tuple[str, str]] = frozenset()) -> Verdict:
    """safe: on the allowlist. dangerous: can run code or touch the system. suspicious: anything else."""
    if allowlist.is_allowed(module, name) or (module, name) in extra:
        return "safe"
    root = module.split(".")[0]
    if (
        root in DANGEROUS_MODULES
        or module in DANGEROUS_MODULES
        or module.startswith(DANGEROUS_TORCH)
        or (module == "torch" and not name[:1].isupper())  # torch.load, torch.save, torch.from_file, ...
        or name in DANGEROUS_NAMES
        or name.startswith("__")
    ):
        return "dangerous"
    return "suspicious"


@dataclass(frozen=True)
class GlobalRef:
    module: str
    name: str
    verdict: Verdict

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class PickleScan:
    """One pickle inside a file: where it is and what it imports."""

    location: str
    globals: list[GlobalRef] = field(default_factory=list)
    error: str | None = None

    @property
    def verdict(self) -> Verdict:
        worst: Verdict = "suspicious" if self.error else "safe"
        for ref in self.globals:
            if _RANK[ref.verdict] > _RANK[worst]:
                worst = ref.verdict
        return worst


@dataclass
class ScanReport:
    """Every pickle found under a path, and the overall verdict (the worst of them)."""

    path: str
    pickles: list[PickleScan] = field(default_factory=list)
    files_scanned: int = 0

    @property
    def verdict(self) -> Verdict:
        worst: Verdict = "safe"
        for scan in self.pickles:
            if _RANK[scan.verdict] > _RANK[worst]:
                worst = scan.verdict
        return worst

    @property
    def dangerous(self) -> list[GlobalRef]:
        return [g for p in self.pickles for g in p.globals if g.verdict == "dangerous"]

    def refused(self) -> list[str]:
        """Every global outside the allowlist, once each."""
        return sorted({str(g) for p in self.pickles for g in p.globals if g.verdict != "safe"})

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "verdict": self.verdict,
            "files_scanned": self.files_scanned,
            "pickles": [
                {"location": p.location, "verdict": p.verdict, "error": p.error,
                 "globals": [{"global": str(g), "verdict": g.verdict} for g in p.globals]}
                for p in self.pickles
            ],
        }  # fmt: skip

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.verdict.upper()} ({len(self.pickles)} pickle(s) in {self.files_scanned} file(s))"]
        for p in self.pickles:
            flagged = [g for g in p.globals if g.verdict != "safe"]
            lines.append(f"  {p.location}: {p.verdict}" + (f" ({p.error})" if p.error else ""))
            lines += [f"    {g.verdict:<10} {g}" for g in flagged]
        return "\n".join(lines)


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".p", ".joblib", ".dat")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}  # fmt: skip


def scan_pickle_bytes(
    data: bytes, location: str, *, start: int = 0, extra: frozenset[tuple[str, str]] = frozenset()
) -> tuple[PickleScan, int]:
    """Walk one pickle's opcodes from ``start``; returns the scan and where the pickle ended."""
    result = PickleScan(location)
    seen: set[tuple[str, str]] = set()
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed, as far as a static walk can know them
    end = start

    def add(module: str, name: str) -> None:
        if (module, name) not in seen:
            seen.add((module, name))
            result.globals.append(GlobalRef(module, name, classify(module, name, extra)))

    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        for op, arg, _ in pickletools.genops(stream):
            end = stream.tell()
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                add(module, attr)
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                    add(recent[-2], recent[-1])
                else:
                    add("<dynamic>", "STACK_GLOBAL with computed names")
                recent.append(None)
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin1") if isinstance(arg, bytes) else arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(cast(Any, arg))] = recent[-1] if recent else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(cast(Any, arg))))
            elif name == "STOP":
                break
            else:
                recent.append(None)
            del recent[:-16]
    except Exception as exc:  # a malformed pickle is reported, not raised: the scan goes on
        result.error = f"unreadable pickle: {type(exc).__name__}: {exc}"
    return result, end


def _looks_like_pickle(head: bytes) -> bool:
    return head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5 if len(head) >= 2 else False


def _scan_stream_of_pickles(data: bytes, location: str, report: ScanReport, limit: int = 8) -> None:
    """Legacy torch files and plain pickle files: consecutive pickles until data stops being one."""
    position = 0
    for index in range(limit):
        if position >= len(data) or (index and not _looks_like_pickle(data[position : position + 2])):
            break
        scan, end = scan_pickle_bytes(data, f"{location}#pickle{index}" if index else location, start=position)
        if scan.error and index:
            break  # past the pickles: the raw storage bytes of a legacy file
        report.pickles.append(scan)
        if scan.error or end <= position:
            break
        position = end


def scan_file(path: Path, report: ScanReport) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    report.files_scanned += 1
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if info.file_size > 1 << 30:
                        continue
                    member_head = archive.open(info).read(8)
                    if info.filename.endswith((".pkl", ".pickle")) or _looks_like_pickle(member_head):
                        _scan_stream_of_pickles(archive.read(info), f"{path}:{info.filename}", report, limit=1)
                    elif member_head.startswith(b"\x93NUMPY"):
                        _scan_npy(archive.read(info), f"{path}:{info.filename}", report)
        except Exception as exc:  # any damage is reported (as suspicious), never raised
            report.pickles.append(PickleScan(str(path), error=f"unreadable zip: {type(exc).__name__}: {exc}"))
        return
    if head.startswith(b"\x93NUMPY"):
        _scan_npy(path.read_bytes(), str(path), report)
        return
    data = path.read_bytes()
    if path.name == ".metadata":  # a torch.distributed.checkpoint directory: its plain dataclasses are data
        from torchkeep.format.pickle.dcp import EXTRA

        scan, _ = scan_pickle_bytes(data, str(path), extra=frozenset(EXTRA))
        report.pickles.append(scan)
        return
    if _looks_like_pickle(data[:2]) or path.suffix in PICKLE_SUFFIXES:
        _scan_stream_of_pickles(data, str(path), report)


def _scan_npy(data: bytes, location: str, report: ScanReport) -> None:
    """An .npy of object dtype carries a pickle after its header."""
    try:
        major = data[6]
        header_len = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
        offset = (10 if major == 1 else 12) + header_len
        header = data[:offset].decode("latin1")
    except (IndexError, ValueError) as exc:
        report.pickles.append(PickleScan(location, error=f"unreadable .npy header: {exc}"))
        return
    if "'O'" in header or "|O" in header:
        _scan_stream_of_pickles(data[offset:], f"{location}[object array]", report, limit=1)


def walk(path: Path) -> Iterator[Path]:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                yield child
    else:
        yield path


def scan(path: str | Path) -> ScanReport:
    """Statically scan every pickle in a file or directory tree (inside zip archives too).

    Nothing is unpickled: opcodes are walked and the globals each pickle would import are
    classified as safe (torchkeep's allowlist), dangerous (can run code or touch the system) or
    suspicious (anything else, e.g. a pickled model class).
    """
    from torchkeep.errors import CheckpointNotFoundError

    root = Path(path)
    if not root.exists():
        raise CheckpointNotFoundError(root)
    report = ScanReport(str(root))
    for file in walk(root):
        scan_file(file, report)
    return report
