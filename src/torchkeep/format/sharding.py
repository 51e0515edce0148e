"""Splitting tensors into shards, and the Hugging Face index file. Pure: sizes in, names out."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.jsondoc import parse_json
from torchkeep.format.names import is_plain_name

T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
# Shards of a save that replaces a sharded folder get a tag (model-00001-of-00004-r3fa9c1.safetensors) so
# that no file the live index names is overwritten before the new index is committed.
SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})(-r[0-9a-f]{6})?\.safetensors$")


def is_weights_file(name: str) -> bool:
    """Whether saving weights into a folder writes (or replaces) a file of this name: the single file, the
    index, or a shard."""
    return name in (_config.SINGLE_FILE_NAME, _config.INDEX_FILE_NAME) or SHARD_NAME.match(name) is not None


def parse_size(size: int | str) -> int:
    """``"500MB"`` -> 500_000_000, ``"2GiB"`` -> 2**31; ints pass through. Must be positive."""
    if isinstance(size, bool):
        raise TypeError("max_shard_size must be an int or a string like '500MB'")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if not match:
            raise ValueError(f"cannot read size {size!r}: use bytes or a unit, e.g. '500MB', '2GB', '1GiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def split_shards(items: Sequence[T], size_of: Callable[[T], int], max_size: int) -> list[list[T]]:
    """Greedy split in order; an item larger than ``max_size`` gets a shard of its own."""
    shards: list[list[T]] = []
    current: list[T] = []
    current_size = 0
    for item in items:
        size = size_of(item)
        if current and current_size + size > max_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [_config.SINGLE_FILE_NAME]
    return [_config.SHARD_TEMPLATE.format(index=i + 1, count=count) for i in range(count)]


def index_document(weight_map: Mapping[str, str], total_size: int) -> bytes:
    """The ``model.safetensors.index.json`` text, as Hugging Face writes it (sorted, indented)."""
    doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def parse_index(raw: bytes, path: str) -> dict[str, str]:
    """The weight map of an index file, validated: names map to plain file names in its folder."""
    doc: Any = parse_json(raw, path, "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(path, "index has no weight_map of tensor name -> file name")
    if not weight_map:
        raise CorruptCheckpointError(path, "index lists no tensors (its weight_map is empty)")
    for name, file in weight_map.items():
        if not is_plain_name(file):
            raise CorruptCheckpointError(path, f"index maps {name!r} to {file!r}, not a file in the same folder")
    return weight_map
