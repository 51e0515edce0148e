"""A pickle.Unpickler that only builds what the allowlist allows, with storages read from the file."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format.pickle import allowlist
from torchkeep.format.pickle.rebuild import LoadedStorage, RefusedData, StorageType

# persistent id -> storage; the reader decides where the bytes come from.
StorageLoader = Callable[[StorageType, str, str, int], LoadedStorage]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data, tensors and storages; any other global raises UnsafeCheckpointError."""

    def __init__(
        self,
        data: bytes,
        *,
        path: str,
        load_storage: StorageLoader | None = None,
        extra: Mapping[tuple[str, str], Any] | None = None,
    ) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.path = path
        self.extra = dict(extra or {})
        self.load_storage = load_storage
        self.storages: dict[str, LoadedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = self.extra.get((module, name)) or allowlist.lookup(module, name)
        if found is None:
            raise UnsafeCheckpointError(
                self.path,
                f"refused to import {module}.{name}: a pickle naming it can run code. If you trust this file, "
                "pass trusted=True",
                globals_=(f"{module}.{name}",),
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise UnsafeCheckpointError(self.path, f"refused persistent id {pid!r:.80}")
        storage_type, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        if len(pid) > 5 and pid[5] is not None:
            raise CorruptCheckpointError(self.path, "legacy storage views are not supported")
        if not isinstance(storage_type, StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CorruptCheckpointError(self.path, f"malformed storage reference {pid!r:.80}")
        if self.load_storage is None:
            raise CorruptCheckpointError(self.path, "pickle refers to storages but the file holds none")
        if key not in self.storages:
            self.storages[key] = self.load_storage(storage_type, key, str(location), numel)
        return self.storages[key]


def restricted_loads(
    data: bytes,
    *,
    path: str,
    load_storage: StorageLoader | None = None,
    extra: Mapping[tuple[str, str], Any] | None = None,
) -> Any:
    """Unpickle ``data`` with the allowlist (plus ``extra``, for one format's own plain classes).

    Damage is CorruptCheckpointError; a global that could run code is UnsafeCheckpointError.
    """
    unpickler = RestrictedUnpickler(data, path=path, load_storage=load_storage, extra=extra)
    try:
        return unpickler.load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except RefusedData as exc:
        raise UnsafeCheckpointError(path, f"refused: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, OverflowError, MemoryError, RecursionError, UnicodeDecodeError) as exc:  # fmt: skip
        raise CorruptCheckpointError(path, f"malformed pickle: {type(exc).__name__}: {exc}") from exc
