"""File names read from a manifest, an index or metadata: plain names that stay inside their folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from torchkeep.errors import CorruptCheckpointError


def is_plain_name(name: object) -> bool:
    """A single path component: not empty, not ``.``/``..``, no separators, no NUL."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not os.path.isabs(name)
    )


def _hf_cache_blob(folder: Path, real: Path) -> bool:
    """Hugging Face's cache keeps ``<repo>/snapshots/<rev>/<file>`` as links to ``<repo>/blobs/<hash>``."""
    return folder.parent.name == "snapshots" and real.parent == folder.parent.parent / "blobs"


def member(folder: str | os.PathLike[str], name: object, source: str | os.PathLike[str], *, what: str) -> Path:
    """The path of the file ``name`` inside ``folder``, as named by the document ``source``.

    Raises:
        CorruptCheckpointError: ``name`` is not a plain file name, it is a link that leaves the folder
            (other than the Hugging Face cache's links to its blobs), or a FIFO or a device (reading one
            could block forever).
    """
    if not is_plain_name(name):
        raise CorruptCheckpointError(source, f"{what} {name!r} is not a plain file name inside its folder")
    root = Path(folder)
    path = root / str(name)
    if path.is_symlink():
        real_root = root.resolve()
        real = path.resolve()
        if real_root not in real.parents and not _hf_cache_blob(real_root, real):
            raise CorruptCheckpointError(
                source, f"{what} {name!r} is a link that leaves its folder (to {real}); refused"
            )
    refuse_special(path)
    return path


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder (a FIFO, a device, a socket), else None.

    Opening a FIFO blocks until something writes to it, and a device such as ``/dev/zero`` never ends: a
    folder from elsewhere (an archive unpacked without a filter) may hold either under a weight file's name.
    """
    try:
        mode = os.stat(path).st_mode  # through links: a link to /dev/zero is a device
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def refuse_special(path: str | os.PathLike[str]) -> None:
    """CorruptCheckpointError naming ``path`` when it is a FIFO, a device or a socket (see :func:`special_file`)."""
    kind = special_file(path)
    if kind is not None:
        raise CorruptCheckpointError(path, f"is {kind}, not a regular file: reading it could block or never end")
