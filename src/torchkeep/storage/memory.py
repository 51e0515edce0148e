"""In-memory storage: the reference backend for tests, with the same atomic-write contract."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from typing import BinaryIO

from torchkeep.errors import CheckpointNotFoundError
from torchkeep.storage.base import Sink


class MemoryStorage:
    """Objects are ``bytes`` in a dict; a write becomes visible only when its block exits cleanly."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.guard = threading.RLock()

    @contextlib.contextmanager
    def _writer(self, name: str) -> Iterator[BinaryIO]:
        sink = io.BytesIO()
        yield sink
        self.objects[name] = sink.getvalue()

    def open_write(self, name: str) -> contextlib.AbstractContextManager[Sink]:
        return self._writer(name)

    def open_read(self, name: str) -> BinaryIO:
        if name not in self.objects:
            raise CheckpointNotFoundError(f"memory://{name}")
        return io.BytesIO(self.objects[name])

    def size(self, name: str) -> int:
        if name not in self.objects:
            raise CheckpointNotFoundError(f"memory://{name}")
        return len(self.objects[name])

    def exists(self, name: str) -> bool:
        return name in self.objects

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        return sorted(
            n for n in self.objects if n.startswith(prefix) and (recursive or "/" not in n[len(prefix) :].lstrip("/"))
        )

    def delete(self, name: str) -> None:
        self.objects.pop(name, None)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self.guard:
            yield

    def local_path(self, name: str) -> str | None:
        return None
