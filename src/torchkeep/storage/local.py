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
import os
import shutil
import uuid
from collections.abc import Iterator
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

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        names = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(n for n in names if not is_temporary(n))

    def delete(self, name: str) -> None:
        path = self._path(name)
        with write_errors(path, "deleting"):
            path.unlink()
            fsync_dir(path.parent)

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


def temporary_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}")


def commit_dir(temp: Path, target: Path) -> None:
    """Move a fully written (and fsynced) directory into place atomically.

    A new target is one rename. An existing one is swapped in one step where the OS can
    (renameat2); elsewhere it is moved aside first, so a crash in between leaves it under a
    temporary name, never half-replaced.
    """
    with write_errors(target, "moving the new folder into place"):
        if not target.exists():
            _rename_new(temp, target)
        elif _rename_exchange(temp, target):
            shutil.rmtree(temp, ignore_errors=True)  # now holds the old contents
        else:
            old = temporary_sibling(target)
            os.rename(target, old)
            try:
                os.rename(temp, target)
            except OSError:
                os.rename(old, target)  # put the old one back: nothing is lost
                raise
            shutil.rmtree(old, ignore_errors=True)
    with write_errors(target, "syncing its folder (the new folder is in place but may not be durable)"):
        fsync_dir(target.parent)
