"""Storage at any fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``...).

An object store has no rename, but it does publish an object whole: a PUT, or a multipart upload
when it completes. So a write streams to the object's own key and is published when the block
exits; on an error the upload is aborted (``discard``) and the previous object, if any, stays.
What that does not give (a folder of several objects appearing at once) is the caller's job: a
sharded folder writes its index last, and readers go by the index.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from torchkeep.errors import CheckpointNotFoundError, CheckpointWriteError
from torchkeep.storage.base import Sink
from torchkeep.storage.local import TEMP_MARKER, is_temporary

FSSPEC_EXTRA = "pip install fsspec and the filesystem's package (s3fs, gcsfs, adlfs...)"


# Filesystems whose writes are transactional per object (fsspec's autocommit=False is honoured).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return set(protocol) if isinstance(protocol, (tuple, list)) else {protocol}


def is_url(path: object) -> bool:
    """``scheme://...`` other than ``file://`` (local paths stay on the local, rename-based backend)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/dir/model.safetensors`` -> (``s3://bucket/dir``, ``model.safetensors``)."""
    head, _, name = url.rstrip("/").rpartition("/")
    return head, name


class _Sink:
    def __init__(self, f: Any, url: str) -> None:
        self._f = f
        self._url = url

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            self._f.write(view)
        except Exception as exc:
            raise CheckpointWriteError(self._url, f"writing failed: {type(exc).__name__}: {exc}") from exc
        return view.nbytes


class RemoteStorage:
    """Objects under an fsspec URL; ``storage_options`` go to the filesystem (credentials, endpoint...)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec comes with torch's dependencies here
            raise ImportError(f"{url}: {FSSPEC_EXTRA}") from exc
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise ImportError(f"{url}: no filesystem for this URL ({exc}); {FSSPEC_EXTRA}") from exc
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")

    def key_path(self, name: str) -> str:
        """The filesystem path of ``name`` (validated: relative, no '..')."""
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage name {name!r}: must be relative, without '..'")
        return posixpath.join(self.root, name)

    def _where(self, name: str) -> str:
        return f"{self.url}/{name}"

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[Sink]:
        path = self.key_path(name)
        transactional = bool(_protocols(self.fs) & OBJECT_STORES)
        # Object stores publish on commit() (autocommit=False: nothing is visible before it); other
        # filesystems get the bytes under a temporary name, moved over the real one at the end.
        base = posixpath.basename(path)
        temp = (
            path
            if transactional
            else posixpath.join(posixpath.dirname(path), f".{base}{TEMP_MARKER}{uuid.uuid4().hex[:12]}")
        )
        try:
            f = self.fs.open(temp, "wb", autocommit=not transactional)
        except Exception as exc:
            raise CheckpointWriteError(self._where(name), f"cannot be written: {type(exc).__name__}: {exc}") from exc
        try:
            yield _Sink(f, self._where(name))
        except BaseException:
            self._abandon(f, None if transactional else temp)
            raise
        try:
            f.close()
            if transactional:
                f.commit()  # publishes the object whole (a PUT, or a multipart upload completed)
            else:
                self.fs.mv(temp, path)
        except Exception as exc:
            self._abandon(f, None if transactional else temp)
            raise CheckpointWriteError(self._where(name), f"publishing failed: {type(exc).__name__}: {exc}") from exc

    def _abandon(self, f: Any, temp: str | None) -> None:
        with contextlib.suppress(Exception):
            f.discard()
        if temp is not None:
            with contextlib.suppress(Exception):
                self.fs.rm(temp)

    def open_read(self, name: str) -> BinaryIO:
        try:
            return self.fs.open(self.key_path(name), "rb")  # type: ignore[no-any-return]
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(self._where(name)) from exc
        except Exception as exc:
            raise CheckpointNotFoundError(self._where(name), f"cannot be read: {type(exc).__name__}: {exc}") from exc

    def size(self, name: str) -> int:
        try:
            return int(self.fs.size(self.key_path(name)))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(self._where(name)) from exc

    def exists(self, name: str) -> bool:
        return bool(self.fs.exists(self.key_path(name)))

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        base = self.key_path(prefix) if prefix else self.root
        try:
            found = self.fs.find(base) if recursive else self.fs.find(base, maxdepth=1)
        except FileNotFoundError:
            return []
        strip = self.root + "/"
        names = (p[len(strip) :] if p.startswith(strip) else p for p in found)
        return sorted(n for n in names if not is_temporary(n))

    def create_new(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist; False if it does. Atomic where the store has
        conditional writes (S3's ``If-None-Match``, fsspec's ``"xb"`` mode); elsewhere a check, then a
        write: best-effort, two writers at the same instant may both succeed."""
        path = self.key_path(name)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):
            pass  # no exclusive mode on this filesystem
        except Exception as exc:
            if "precondition" in str(exc).lower():
                return False
            raise CheckpointWriteError(self._where(name), f"cannot be written: {type(exc).__name__}: {exc}") from exc
        if self.exists(name):
            return False
        with self.open_write(name) as sink:
            sink.write(data)
        return True

    def delete(self, name: str) -> None:
        try:
            self.fs.rm(self.key_path(name))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise CheckpointWriteError(self._where(name), f"deleting failed: {type(exc).__name__}: {exc}") from exc

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # object stores have no locks (see Storage.exclusive)

    def local_path(self, name: str) -> str | None:
        return None
