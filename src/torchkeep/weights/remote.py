"""Weights at a URL (``s3://``, ``gs://``, ``memory://``...): read and written through the storage layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep import _config
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.format.io import read_tensors
from torchkeep.format.layout import Header, read_header
from torchkeep.format.sharding import parse_index
from torchkeep.storage.remote import RemoteStorage, split_url
from torchkeep.weights.files import INDEX_SUFFIX, SAFETENSORS_SUFFIX
from torchkeep.weights.load import add_file


def _files(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[RemoteStorage, list[str], dict[str, str] | None]:
    """The storage, the files to read and the index's weight map (if any) for a file, index or folder URL."""
    if url.endswith(SAFETENSORS_SUFFIX):
        folder, name = split_url(url)
        return RemoteStorage(folder, storage_options), [name], None
    if url.endswith(INDEX_SUFFIX):
        folder, index = split_url(url)
        storage = RemoteStorage(folder, storage_options)
    else:
        storage, index = RemoteStorage(url, storage_options), _config.INDEX_FILE_NAME
        if not storage.exists(index):
            if storage.exists(_config.SINGLE_FILE_NAME):
                return storage, [_config.SINGLE_FILE_NAME], None
            raise CheckpointNotFoundError(url, f"holds neither {_config.SINGLE_FILE_NAME} nor {index}")
    where = f"{storage.url}/{index}"
    if storage.size(index) > _config.MAX_JSON_BYTES:
        raise CorruptCheckpointError(where, f"index is over the limit of {_config.MAX_JSON_BYTES} bytes")
    with storage.open_read(index) as f:
        weight_map = parse_index(f.read(), where)
    return storage, list(dict.fromkeys(weight_map.values())), weight_map


def read_header_at(storage: RemoteStorage, name: str) -> Header:
    with storage.open_read(name) as f:
        return read_header(f, f"{storage.url}/{name}", storage.size(name))


def load_url(url: str, *, storage_options: Mapping[str, Any] | None, verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the weights at ``url``, read into memory (ranged reads), checksums verified."""
    storage, files, expected = _files(url, storage_options)
    out: dict[str, torch.Tensor] = {}
    for name in files:
        where = f"{storage.url}/{name}"
        with storage.open_read(name) as f:
            header = read_header(f, where, storage.size(name))
            tensors = read_tensors(f, header, where, verify=verify)
        add_file(out, tensors, dict(header.aliases), expected, name, where)
    return out
