"""Local filesystem storage with atomic, durable writes.

Every byte torchkeep writes to a local disk goes through :func:`atomic_write`: a sink that writes
all of what it is given (looping over short writes), fsyncs, renames into place, and turns every
OS failure (a full disk, a read-only filesystem, a removed folder) into
:class:`~torchkeep.errors.CheckpointWriteError` naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from torchkeep import _config
from torchkeep.errors import CheckpointNotFoundError, CheckpointWriteError
from torchkeep.storage.base import Sink

TEMP_MARKER = ".tmp-"


def reason(exc: OSError) -> str:
    """``no space left on device (ENOSPC)``: the OS's words and the error's name."""
    text = (exc.strerror or str(exc) or type(exc).__name__).rstrip(".")
    text = text[:1].lower() + text[1:]
    name = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    return f"{text} ({name})" if name else text


@contextlib.contextmanager
def write_errors(path: str | os.PathLike[str], action: str) -> Iterator[None]:
    """Turn an OSError inside the block into CheckpointWriteError(path, "<action> failed: <cause>")."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as exc:
        raise CheckpointWriteError(path, f"{action} failed: {reason(exc)}", cause=exc) from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    return TEMP_MARKER in Path(name).name


class FileSink:
    """An open file that takes every byte it is given, or raises CheckpointWriteError."""

    def __init__(self, raw: Any, path: Path) -> None:
        self._raw = raw
        self.path = path
        self.written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = view.nbytes
        with write_errors(self.path, "writing"):
            while view.nbytes:
                # Linux moves at most ~2 GiB per call; a short count (a filling disk) is retried,
                # and the retry then reports the real error.
                done = self._raw.write(view[: _config.MAX_IO_CHUNK])
                if not done:
                    raise OSError(errno.EIO, "the file accepted no bytes")
                view = view[done:]
        self.written += total
        return total

    def fileno(self) -> int:
        return int(self._raw.fileno())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Sink]:
    """Write ``path`` atomically: a temporary sibling, fsync, rename, fsync of the directory.

    A reader sees the old file or the complete new one. On any exception (a full disk included)
    the temporary file is removed and the old file is left as it was; OS failures are raised as
    CheckpointWriteError.
    """
    target = Path(path)
    temp = temporary_sibling(target)
    with write_errors(target, "creating a temporary file beside it"):
        raw = open(temp, "xb", buffering=0)  # noqa: SIM115 - closed below on every path
    try:
        yield FileSink(raw, target)
        with write_errors(target, "flushing it to disk"):
            os.fsync(raw.fileno())
            raw.close()
        with write_errors(target, "renaming it into place"):
            os.replace(temp, target)
    except BaseException:
        raw.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with write_errors(target, "syncing its folder (the new file is in place but may not be durable)"):
        fsync_dir(target.parent)


class LocalStorage:
    """Objects are files under ``root``; writes go through :func:`atomic_write`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"invalid storage name {name!r}: must be relative, without '..'")
        return self.root.joinpath(*parts)

    def open_write(self, name: str) -> contextlib.AbstractContextManager[Sink]:
        path = self._path(name)
        with write_errors(path.parent, "creating the folder"):
            path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path)

    def open_read(self, name: str) -> BinaryIO:
        path = self._path(name)
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(path) from exc
        except IsADirectoryError as exc:
            raise CheckpointNotFoundError(path, "is a directory, not a file") from exc

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        if recursive:
            found = [p for p in base.rglob("*") if p.is_file()]
        else:
            with os.scandir(base) as entries:
                found = [Path(e.path) for e in entries if e.is_file()]
        names = [p.relative_to(self.root).as_posix() for p in found]
        return sorted(n for n in names if not is_temporary(n))

    def delete(self, name: str) -> None:
        path = self._path(name)
        with write_errors(path, "deleting"):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            fsync_dir(path.parent)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with write_errors(self.root, "creating the folder"):
            self.root.mkdir(parents=True, exist_ok=True)
        with write_errors(self.root, "locking the folder"):
            fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            with write_errors(self.root, "locking the folder"):
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor is closed
            yield
        finally:
            os.close(fd)

    def local_path(self, name: str) -> str | None:
        return str(self._path(name))


def _renameat2(a: Path, b: Path, flags: int) -> bool | None:
    """Linux renameat2: True on success, False if the OS refused (errno set), None where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return None
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):  # the filesystem or kernel lacks the flag
        return None
    return False


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (RENAME_EXCHANGE); False where that cannot be done."""
    return bool(_renameat2(a, b, 2))


def _rename_new(temp: Path, target: Path) -> None:
    """Rename onto a name that must not exist: a folder that appears meanwhile is never replaced."""
    done = _renameat2(temp, target, 1)  # RENAME_NOREPLACE
    if done is None:
        os.rename(temp, target)  # replaces at most an empty folder
    elif not done:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _remove_replaced(path: Path) -> None:
    """Delete what a commit replaced: a folder of the save's own files, or a link (not what it points to)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), and ``root`` itself."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


# What temporary_sibling names: ".<name>.tmp-<12 hex digits>" (a long name cut, to fit NAME_MAX).
TEMPORARY = re.compile(r"^\.(?P<base>.+)" + re.escape(TEMP_MARKER) + r"[0-9a-f]{12}$")
_NAME_MAX = 255  # bytes: the limit of a name on every filesystem torchkeep writes to


def temporary_sibling(target: Path) -> Path:
    """A fresh hidden name beside ``target`` (``.<name>.tmp-<hex>``), never longer than a name may be."""
    if not target.name or target.name == "..":
        target = Path(os.path.abspath(target))  # "." and "..": the folder they name
    name = target.name
    room = _NAME_MAX - len(f".{TEMP_MARKER}") - 12
    while len(name.encode(errors="surrogateescape")) > room:  # a name near the limit: its start is enough
        name = name[:-1]
    return target.with_name(f".{name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}")


def remove_stale_temporaries(folder: Path, belongs: Callable[[str], bool]) -> None:
    """Remove what killed saves left in ``folder``: temporaries of names ``belongs`` accepts, untouched
    (they and, for a folder, every entry in it) for ``STALE_TEMPORARY_S``. Best effort: a failure here
    never fails the save that just committed."""
    cutoff = time.time() - _config.STALE_TEMPORARY_S
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        stale = [
            Path(entry.path)
            for entry in entries
            if (match := TEMPORARY.match(entry.name)) is not None
            and belongs(match["base"])
            and _last_touched(Path(entry.path)) < cutoff
        ]
    for path in stale:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _last_touched(path: Path) -> float:
    """The latest modification time of ``path`` and, for a folder, of what is directly in it."""
    latest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as entries:
            for entry in entries:
                latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
    return latest


def refuse_foreign(target: Path, owned: Callable[[str], bool]) -> None:
    """Raise unless ``target`` is absent, a link, or a folder holding only files ``owned`` names (what this
    kind of save writes, and their temporaries): a save never replaces, and so deletes, anything else.

    Raises:
        CheckpointWriteError: ``target`` is a file, or a folder holding other files; nothing was touched.
    """
    with write_errors(target, "checking what the folder holds"):
        if target.is_symlink() or not target.exists():
            return  # nothing, or a link (replacing a link leaves what it points to alone)
        if not target.is_dir():
            raise CheckpointWriteError(
                target, "exists and is a file, not a folder this save wrote: pass another path, or remove it"
            )
        with os.scandir(target) as entries:
            foreign = sorted(
                entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")
                for entry in entries
                if not (entry.is_file(follow_symlinks=False) and _owned_or_temporary(entry.name, owned))
            )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CheckpointWriteError(
            target,
            f"is a folder that also holds {shown}, which this save does not write; it was left as it is "
            "(replacing it would delete them): save to another path, or move them out",
        )


@contextlib.contextmanager
def folder_errors(temp: Path, target: Path) -> Iterator[None]:
    """Name ``target`` in a write error from inside its temporary folder ``temp`` (which is gone by the time
    anyone reads the message): ``ck: writing tensors.safetensors failed: no space left on device``."""
    try:
        yield
    except CheckpointWriteError as exc:
        inside = Path(exc.path)
        if inside != temp and temp not in inside.parents:
            raise
        where = inside.relative_to(temp).as_posix()
        problem = exc.problem if where == "." else f"{where}: {exc.problem}"
        error = CheckpointWriteError(target, problem)
        if getattr(exc, "errno", None) is not None:
            error.errno = exc.errno
        raise error from exc


def _owned_or_temporary(name: str, owned: Callable[[str], bool]) -> bool:
    match = TEMPORARY.match(name)
    return owned(name) or (match is not None and owned(match["base"]))


@contextlib.contextmanager
def new_folder(target: Path, owned: Callable[[str], bool], what: str) -> Iterator[Path]:
    """A folder written whole, then moved into place as ``target`` (:func:`commit_dir`), or not at all.

    Yields the temporary folder to write into. ``target`` is checked first (:func:`refuse_foreign`: only a
    folder of files ``owned`` names is replaced); a write error inside names ``target``; on any error the
    temporary folder is removed and ``target`` is as it was. ``what`` names the folder in messages.
    """
    target = Path(os.path.abspath(target))  # "." and "..": a name to put a temporary beside
    refuse_foreign(target, owned)  # before anything is written
    temp = temporary_sibling(target)
    with write_errors(target, f"creating the {what}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        temp.mkdir()
    try:
        with folder_errors(temp, target):
            yield temp
        with write_errors(target, f"syncing the {what}"):
            fsync_dir(temp)
        commit_dir(temp, target, owned=owned)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def commit_dir(temp: Path, target: Path, *, owned: Callable[[str], bool]) -> None:
    """Move a fully written (and fsynced) directory into place atomically.

    A new target is one rename. An existing one (only a folder of files ``owned`` names:
    :func:`refuse_foreign`) is swapped in one step where the OS can (renameat2); elsewhere it is
    moved aside first, so a crash in between leaves it under a temporary name, never half-replaced.
    """
    refuse_foreign(target, owned)
    with write_errors(target, "moving the new folder into place"):
        if not target.exists() and not target.is_symlink():
            _rename_new(temp, target)
        elif _rename_exchange(temp, target):
            _remove_replaced(temp)  # now holds the old contents
        else:
            old = temporary_sibling(target)
            os.rename(target, old)
            try:
                os.rename(temp, target)
            except OSError:
                os.rename(old, target)  # put the old one back: nothing is lost
                raise
            _remove_replaced(old)
    remove_stale_temporaries(target.parent, lambda base: base == target.name)
    with write_errors(target, "syncing its folder (the new folder is in place but may not be durable)"):
        fsync_dir(target.parent)
