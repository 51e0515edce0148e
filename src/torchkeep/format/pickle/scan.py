"""Static analysis of every pickle under a path, without executing anything, failing closed.

Files are read by content, never by name, and streamed (memory stays small on any input). Each
file is read the ways a loader could read it:

- a zip archive (``torch.save``, ``.npz``, or a zip with anything in front of it): every member,
  by content, whatever its name or compression;
- any other file: the pickles from byte 0 on, in sequence (``torch.load`` of a non-zip file and
  Python's unpickler, and NumPy's loader with pickles allowed, start there; the legacy torch format holds five);
- a tar archive (the pre-0.4 torch format, which ``torch.load`` still opens): every member;
- ``.npy`` (the pickle after an object array's header) and safetensors (the header is checked).

The result is a :class:`ScanReport` whose :attr:`~ScanReport.exit_code` is the contract of
``torchkeep scan``: 0 only when every pickle was read to its end and imports only allowlisted
globals; 1 when anything is dangerous; 2 when anything is unknown, unreadable, truncated,
encrypted, compressed in a way Python cannot read, or skipped for size, and for TorchScript and
ExportedProgram (.pt2) archives, whose loaders run the code they hold (1 if what they hold is
plainly dangerous: a shape expression that reaches Python builtins, a graph target outside torch's
operators such as ``torch.os.system``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from torchkeep.format import zipdir
from torchkeep.format.layout import ByteRange
from torchkeep.format.names import special_file
from torchkeep.format.pickle.opwalk import (
    LIMITS,
    RANK,
    GlobalRef,
    Limits,
    PickleScan,
    Status,
    Verdict,
    classify,
    scan_pickle_bytes,
    walk_pickle,
)

__all__ = [
    "LIMITS",
    "GlobalRef",
    "Limits",
    "PickleScan",
    "Problem",
    "ScanReport",
    "classify",
    "scan",
    "scan_pickle_bytes",
]

EXIT_CODES: dict[str, int] = {"safe": 0, "unknown": 2, "unreadable": 2, "dangerous": 1}
MAX_PICKLES_PER_STREAM = 1000  # a stream of more pickles is reported unverified past this
MAX_MEMBERS = 100_000  # members of one archive
MAX_DEPTH = 3  # archives inside archives
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# A serialized ExportedProgram larger than this is not checked (it stays unverified: 2).
MAX_PROGRAM_JSON = 256 << 20
TORCHSCRIPT_REASON = (
    "a TorchScript archive: torch.jit.load (and torch.load, which hands such files to it) compiles and runs the "
    "TorchScript code in its code/ folder, which no scan verifies; torchkeep.load reads only its weights "
    "(parameters and buffers) without running it"
)
EXPORTED_PROGRAM_REASON = (
    "an ExportedProgram archive (.pt2): torch.export.load evaluates its symbolic shape expressions with sympy "
    "(Python's eval) and unpickles its constants, and running the program calls whatever its graph names; the "
    "scan checks those expressions, guards and targets but cannot verify the program; torchkeep.load reads only "
    "its weights, without running or evaluating any of it"
)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"7z\xbc\xaf\x27\x1c": "7z",
}


@dataclass(frozen=True)
class Problem:
    """Something the scan could not verify (status unreadable or unknown): exit 2 unless worse."""

    location: str
    reason: str
    status: Status = "unreadable"

    def __str__(self) -> str:
        return f"{self.location}: {self.status}: {self.reason}"


@dataclass
class ScanReport:
    """Every pickle found under a path, every problem, and what each file turned out to contain.

    ``status`` is the worst of everything: ``safe`` < ``unknown`` = ``unreadable`` < ``dangerous``;
    ``exit_code`` maps it to 0, 2, 2, 1. ``verdict`` is the coarse view of earlier versions
    (unknown and unreadable are "suspicious").
    """

    path: str
    pickles: list[PickleScan] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # file (or member) -> what its content is
    files_scanned: int = 0

    @property
    def status(self) -> Status:
        worst: Status = "safe"
        for status in [*(p.status for p in self.pickles), *(p.status for p in self.problems)]:
            if RANK[status] > RANK[worst]:
                worst = status
        return worst

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def verdict(self) -> Verdict:
        status = self.status
        return "suspicious" if status in ("unknown", "unreadable") else cast(Verdict, status)

    @property
    def dangerous(self) -> list[GlobalRef]:
        return [g for p in self.pickles for g in p.globals if g.status == "dangerous"]

    def refused(self) -> list[str]:
        """Every global outside the allowlist, once each."""
        return sorted({str(g) for p in self.pickles for g in p.globals if g.status != "safe"})

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
            "files_scanned": self.files_scanned,
            "files": [{"path": k, "content": v} for k, v in self.files.items()],
            "pickles": [
                {"location": p.location, "status": p.status, "verdict": p.verdict, "complete": p.complete,
                 "error": p.error, "globals": [{"global": str(g), "status": g.status} for g in p.globals]}
                for p in self.pickles
            ],
            "problems": [{"location": p.location, "status": p.status, "reason": p.reason} for p in self.problems],
        }  # fmt: skip

    def __str__(self) -> str:
        lines = [
            f"{self.path}: {self.status.upper()} (exit {self.exit_code}): {len(self.pickles)} pickle(s) "
            f"in {self.files_scanned} file(s)"
        ]
        for p in self.pickles:
            detail = "" if p.complete else f" (incomplete: {p.error})"
            lines.append(f"  {p.location}: {p.status}{detail}")
            lines += [f"    {g.status:<10} {g}" for g in p.globals if g.status != "safe"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


class _Scanner:
    def __init__(self, report: ScanReport, limits: Limits) -> None:
        self.report, self.limits = report, limits

    def problem(self, location: str, reason: str, status: Status = "unreadable") -> None:
        self.report.problems.append(Problem(location, reason, status))

    def stream(self, f: BinaryIO, size: int, location: str, depth: int, extra: frozenset[tuple[str, str]]) -> None:
        """One file or archive member, by content."""
        head = f.read(512)
        f.seek(0)
        if head.startswith(b"PK\x03\x04"):  # torch.load and np.load take the zip path; a plain unpickler fails at once
            self.report.files[location] = "zip"
            self.archive(f, location, depth)
            return
        kinds = []
        if head.startswith(b"\x93NUMPY"):
            # Not the end of it: the same bytes can be a tar archive too, which torch.load opens (and unpickles
            # its 'storages' member) before anything else; so the other readings below are made as well.
            kinds.append(self.npy(f, size, location))
            f.seek(0)
        if self.pickles(f, size, location, extra):
            kinds.append("pickle")
        for magic, kind in _COMPRESSED.items():
            if head.startswith(magic):
                kinds.append(kind)
                self.problem(location, f"{kind}-compressed data is not opened: decompress it and scan the result",
                             "unknown")  # fmt: skip
        if self.safetensors(f, size, head, location):
            kinds.append("safetensors")
        if self.tar(f, location, depth):
            kinds.append("tar")
        f.seek(0)
        if _has_zip_directory(f):  # a zip with data in front (even "PK\x07\x08"): zipfile opens it
            kinds.append("zip (after a prefix)")
            self.archive(f, location, depth)
        self.report.files[location] = " + ".join(kinds) or "no pickle"

    def pickles(self, f: BinaryIO, size: int, location: str, extra: frozenset[tuple[str, str]]) -> bool:
        """The pickles from the stream's start, in sequence, until the data is not a pickle any more."""
        found: list[PickleScan] = []
        position = 0
        f.seek(0)
        while position < size:
            if len(found) == MAX_PICKLES_PER_STREAM:
                self.problem(location, f"more than {MAX_PICKLES_PER_STREAM} pickles in sequence; the rest is not "
                             "scanned (skipped for size)")  # fmt: skip
                break
            where = f"{location}#pickle{len(found)}" if found else location
            scan, read = walk_pickle(f, where, size=size - position, extra=extra, limits=self.limits)
            if not (scan.complete or scan.imported or scan.limited or (scan.truncated and scan.started_with_proto)):
                # Not a pickle (or not one any more): the unpickler fails here before importing anything.
                # A stream that starts like a protocol 2-5 pickle and runs out of data is a truncated one.
                break
            found.append(scan)
            position += read
            if not scan.complete:
                break
            if len(found) == 5 and [p.value for p in found[:2]] == [LEGACY_MAGIC, LEGACY_PROTOCOL]:
                break  # the legacy torch format: raw storage bytes follow, which torch never unpickles
        self.report.pickles.extend(found)
        return bool(found)

    def npy(self, f: BinaryIO, size: int, location: str) -> str:
        """An .npy file: an object array's data is a pickle (NumPy runs it when pickles are allowed).
        Returns what the file is, as an .npy."""
        try:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (
                np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
            )
        except Exception as exc:  # numpy raises ValueError, SyntaxError, ... on a damaged header
            self.problem(location, f"unreadable .npy header: {type(exc).__name__}: {exc}")
            return "npy (damaged)"
        if not dtype.hasobject:
            return f"npy ({dtype}, shape {shape})"
        offset = f.tell()
        scan, _ = walk_pickle(f, f"{location}[object array]", size=size - offset, limits=self.limits)
        self.report.pickles.append(scan)
        return "npy (object array: a pickle)"

    def safetensors(self, f: BinaryIO, size: int, head: bytes, location: str) -> bool:
        """A safetensors header (no pickle in such a file); a damaged one is a problem."""
        if len(head) < 9 or head[8:9] != b"{":
            return False
        (length,) = struct.unpack("<Q", head[:8])
        if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, size - 8):
            return False
        f.seek(8)
        try:
            header = json.loads(f.read(length))
            data_size = size - 8 - length
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            for name, entry in header.items():
                if name == "__metadata__":
                    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                        raise ValueError("__metadata__ is not a map of strings")
                    continue
                start, end = entry["data_offsets"]
                if not (isinstance(entry["dtype"], str) and all(type(d) is int and d >= 0 for d in entry["shape"])
                        and type(start) is int and type(end) is int and 0 <= start <= end <= data_size):  # fmt: skip
                    raise ValueError(f"tensor {name!r} has a bad dtype, shape or offsets")
        except Exception as exc:  # JSON, key and type errors alike: the header is damaged
            self.problem(location, f"looks like safetensors but the header is damaged: {type(exc).__name__}: {exc}")
        return True

    def tar(self, f: BinaryIO, location: str, depth: int) -> bool:
        """A tar archive: torch.load opens one as its pre-0.4 format and unpickles members of it."""
        f.seek(0)
        try:
            archive = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - closed by the `with` below
        except Exception:  # not a tar archive (tarfile raises ReadError, and others on damage)
            return False
        try:
            with archive:
                names = []
                for count, member in enumerate(archive):
                    if count == MAX_MEMBERS:
                        self.problem(location, f"more than {MAX_MEMBERS} members; the rest is not scanned")
                        break
                    names.append(member.name)
                    inner = f"{location}:{member.name}"
                    if member.isfile():
                        member_file = archive.extractfile(member)
                        if member_file is not None:
                            self.member(cast(BinaryIO, member_file), member.size, inner, depth)
                if {"storages", "tensors", "pickle"} & set(names):
                    self.problem(location, "the pre-0.4 torch tar format: torch.load unpickles its 'storages' "
                                 "member between raw data, which is not verified")  # fmt: skip
        except Exception as exc:  # a damaged tar
            self.problem(location, f"unreadable tar archive: {type(exc).__name__}: {exc}")
        return True

    def archive(self, f: BinaryIO, location: str, depth: int) -> None:
        """Every member of a zip archive, by content."""
        try:
            archive = zipfile.ZipFile(f)
        except Exception as exc:  # zipfile raises BadZipFile, OSError, ValueError, ... on damage
            self.problem(location, f"unreadable zip archive: {type(exc).__name__}: {exc}")
            return
        with archive:
            self.members(archive, f, location, depth)
        declared = zipdir.declared_directory(f)
        if declared is None:
            return
        f.seek(0)
        if f.read(4) == b"PK\x03\x04":  # torch's reader takes it (a prefixed zip differs by design)
            self.problem(location, f"{declared.describe()}; both were scanned", "unknown")
        view = zipdir.declared_view(f, declared, _size(f))
        if view is None:
            return
        try:
            other = zipfile.ZipFile(view)
        except Exception:  # no reader finds members there: nothing more to scan
            return
        with other:
            self.members(other, view, f"{location}[directory at {declared.offset}]", depth)

    def members(self, archive: zipfile.ZipFile, f: BinaryIO, location: str, depth: int) -> None:
        """Every member of an open zip archive (of the stream ``f``), by content."""
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            self.problem(location, f"more than {MAX_MEMBERS} members; the rest is not scanned")
        self.deployment(archive, infos[:MAX_MEMBERS], location)
        names: dict[str, int] = {}
        for info in infos[:MAX_MEMBERS]:
            names[info.filename] = names.get(info.filename, 0) + 1
            inner = f"{location}:{info.filename}" + (f"#{names[info.filename]}" if names[info.filename] > 1 else "")
            if info.filename.endswith("/"):  # a folder entry (is_dir() fails on an empty name)
                continue
            if info.compress_type not in _ZIP_METHODS:
                self.problem(inner, f"compression method {info.compress_type} cannot be read here, so it was "
                             "not scanned")  # fmt: skip
                continue
            if info.flag_bits & 0x1:
                self.problem(inner, "encrypted (zip flag bit 0): not verified")
                info = copy.copy(info)  # torch ignores the flag: read what is there as if it were plain
                info.flag_bits &= ~0x1
            try:
                with archive.open(info) as member:  # opening checks the member's local header
                    # torch does not check CRCs: read what is there (a wrong CRC hides nothing from us)
                    member._expected_crc = None  # type: ignore[attr-defined]
                    if info.compress_type == zipfile.ZIP_STORED:
                        with _stored_member(f, info) as stored:
                            self.member(stored, info.file_size, inner, depth)
                    else:
                        self.member(cast(BinaryIO, member), info.file_size, inner, depth)
            except Exception as exc:  # a damaged member: bad local header, CRC, compressed data
                self.problem(inner, f"unreadable zip member: {type(exc).__name__}: {exc}")

    def deployment(self, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], location: str) -> None:
        """TorchScript and ExportedProgram archives hold code their loaders run: never verified (2, or 1)."""
        from torchkeep.format import deploy
        from torchkeep.format.deploy import pt2_audit

        names = [info.filename for info in infos]
        kind = deploy.zip_kind(names)
        if kind == "torchscript" or any(name.endswith("constants.pkl") for name in names):
            self.report.files[location] = "zip (TorchScript archive)"
            self.problem(location, TORCHSCRIPT_REASON, "unknown")
        elif kind == "exported_program":
            self.report.files[location] = "zip (ExportedProgram archive, .pt2)"
            self.problem(location, EXPORTED_PROGRAM_REASON, "unknown")
            for info in infos:
                parts = info.filename.split("/")
                if len(parts) >= 2 and parts[-2] == "models" and parts[-1].endswith(".json"):
                    self.exported_program(archive, info, f"{location}:{info.filename}", pt2_audit.audit)

    def exported_program(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, location: str, audit: Any) -> None:
        """A serialized program: the expressions, guards and targets torch.export.load would evaluate or call."""
        if info.file_size > MAX_PROGRAM_JSON:
            self.problem(location, f"a program of {info.file_size:,} bytes is not checked (skipped for size)")
            return
        try:
            with archive.open(info) as member:
                document = json.loads(member.read(MAX_PROGRAM_JSON + 1))
        except Exception as exc:  # damaged member, not JSON, nesting too deep for the parser
            self.problem(location, f"unreadable program: {type(exc).__name__}: {str(exc)[:200]}")
            return
        for where, status, reason in audit(document):
            self.problem(f"{location}:{where}", reason, cast(Status, status))

    def member(self, f: BinaryIO, size: int, location: str, depth: int) -> None:
        if depth + 1 > MAX_DEPTH:
            self.problem(location, f"an archive nested more than {MAX_DEPTH} deep is not scanned")
            return
        self.stream(f, size, location, depth + 1, frozenset())


def _stored_member(f: BinaryIO, info: zipfile.ZipInfo) -> BinaryIO:
    """A stored member of the zip archive in ``f`` as a seekable, buffered file (its local header checked)."""
    f.seek(info.header_offset)
    local = f.read(30)
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    # In place: zipfile's member file re-reads from the start to go back, and the scan looks at a member's
    # end (for a zip directory), which read a tensor's storage three times.
    raw = ByteRange(f, start, min(info.file_size, info.compress_size))
    return cast(BinaryIO, io.BufferedReader(raw))


def _size(f: BinaryIO) -> int:
    return f.seek(0, io.SEEK_END)


def _has_zip_directory(f: BinaryIO) -> bool:
    try:
        return zipfile.is_zipfile(f)
    except Exception:  # an unreadable end of file: no directory
        return False


def _dcp_extra(path: Path) -> frozenset[tuple[str, str]]:
    """The plain records a torch.distributed.checkpoint ``.metadata`` file names (read as data)."""
    if path.name != ".metadata":
        return frozenset()
    from torchkeep.format.pickle.dcp import EXTRA

    return frozenset(EXTRA)


def scan_file(path: Path, report: ScanReport, limits: Limits | None = None) -> None:
    scanner = _Scanner(report, limits or LIMITS)
    report.files_scanned += 1
    special = special_file(path)
    if special is not None:  # opening a FIFO blocks; a device never ends
        report.files[str(path)] = special
        scanner.problem(str(path), f"is {special}, not a regular file: not read")
        return
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            scanner.stream(f, size, str(path), 0, _dcp_extra(path))
    except OSError as exc:
        report.files[str(path)] = "unreadable"
        scanner.problem(str(path), f"cannot be read: {exc.strerror or exc}")
    except Exception as exc:  # a parser failing on damage we did not foresee: not verified, never raised
        scanner.problem(str(path), f"could not be scanned to the end: {type(exc).__name__}: {exc}")


def walk(path: Path) -> Iterator[Path]:
    """Every file under ``path`` (itself, if it is a file); links are followed to files only."""
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                yield child
    else:
        yield path


def scan(path: str | Path, *, limits: Limits | None = None) -> ScanReport:
    """Statically scan every pickle in a file or directory tree, by content, failing closed.

    Nothing is unpickled. Every global a pickle would import is classified as safe (torchkeep's
    allowlist), dangerous (can run code or touch the system) or unknown (anything else, e.g. a
    pickled model class); anything that cannot be read to its end is unreadable.

    Args:
        path: a file or a directory (walked recursively).
        limits: caps on what one walk may read and hold (default :data:`LIMITS`).

    Returns:
        The report; ``report.exit_code`` is 0 (all verified safe), 1 (dangerous) or 2 (anything
        else not verified).

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
    """
    from torchkeep.errors import CheckpointNotFoundError

    root = Path(path)
    if not root.exists():
        raise CheckpointNotFoundError(root)
    report = ScanReport(str(root))
    for file in walk(root):
        scan_file(file, report, limits)
    return report
