"""File names read from a manifest, an index or metadata: plain names that stay inside their folder."""

from __future__ import annotations

import os
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
        CorruptCheckpointError: ``name`` is not a plain file name, or it is a link that leaves the
            folder (other than the Hugging Face cache's links to its blobs).
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
    return path
