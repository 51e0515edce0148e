"""Where bytes live: a small, key-based storage interface and its implementations."""

from torchkeep.storage.base import Storage
from torchkeep.storage.local import LocalStorage
from torchkeep.storage.memory import MemoryStorage

__all__ = ["LocalStorage", "MemoryStorage", "Storage"]
