"""Local filesystem storage with atomic, durable writes."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError

TEMP_MARKER = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    return TEMP_MARKER in Path(name).name


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path`` atomically: a temporary sibling, fsync, rename, fsync of the directory.

    A reader sees the old file or the complete new one. On any exception (a full disk included)
    the temporary file is removed and the old file is left as it was.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}")
    sink = open(temp, "xb", buffering=0)  # noqa: SIM115 - closed below on every path
    try:
        yield sink
        os.fsync(sink.fileno())
        sink.close()
        os.replace(temp, target)
    except BaseException:
        sink.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
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

    def open_write(self, name: str) -> contextlib.AbstractContextManager[BinaryIO]:
        path = self._path(name)
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
        path.unlink()
        fsync_dir(path.parent)

    def local_path(self, name: str) -> str | None:
        return str(self._path(name))
