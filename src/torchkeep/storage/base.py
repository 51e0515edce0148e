"""The storage interface every backend implements.

Names are ``/``-separated relative keys. The call order for a write is::

    with storage.open_write("a/b.safetensors") as sink:   # nothing visible yet
        sink.write(...)
    # on a clean exit the object is durable and visible under its name, atomically;
    # on an exception nothing is left behind and any previous object is untouched.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Protocol, runtime_checkable


class Sink(Protocol):
    """Where a write's bytes go: ``write`` takes all of ``data`` (or raises) and returns its length.

    It must not keep a reference to ``data``: the caller may reuse that memory at once (staging buffers).
    """

    def write(self, data: Any, /) -> int: ...


@runtime_checkable
class Storage(Protocol):
    """A place to keep named byte objects, with atomic, durable writes."""

    def open_write(self, name: str) -> AbstractContextManager[Sink]:
        """A sink whose bytes become visible under ``name`` atomically when the block exits."""
        ...

    def open_read(self, name: str) -> BinaryIO:
        """A seekable reader; raises CheckpointNotFoundError when ``name`` does not exist."""
        ...

    def size(self, name: str) -> int: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        """Names under ``prefix``, sorted; never temporary objects of unfinished writes. ``recursive=False``:
        only those directly under it (no ``/`` after the prefix)."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name``; one already gone is not an error (another writer may have removed it)."""
        ...

    def exclusive(self) -> AbstractContextManager[None]:
        """Held while a writer changes several objects that belong together (shards and their index):
        other torchkeep writers of this store wait. Local folders: an advisory lock on the folder;
        object stores have none (their writers are last-one-wins; readers still never see a mix)."""
        ...

    def local_path(self, name: str) -> str | None:
        """A filesystem path for memory mapping, or None if the backend has none."""
        ...
