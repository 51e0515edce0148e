"""Weights at a URL (``s3://``, ``gs://``, ``memory://``...): read and written through the storage layer."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep import _config
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.format.dtypes import CODE_TO_DTYPE
from torchkeep.format.io import read_tensors
from torchkeep.format.layout import Header, TensorEntry, byte_view, digest, read_header
from torchkeep.format.sharding import parse_index
from torchkeep.storage.remote import RemoteStorage, split_url
from torchkeep.weights.files import INDEX_SUFFIX, SAFETENSORS_SUFFIX
from torchkeep.weights.load import add_file

# Objects up to this size are fetched with one GET (held twice in memory while parsed, as torch.load of
# a downloaded file is); larger ones by ranged GETs of spans of neighbouring tensors, a few at once.
WHOLE_OBJECT_BYTES = 512 * 1024 * 1024
FETCH_SPAN_BYTES = 64 * 1024 * 1024
FETCH_CONCURRENT = 4


def _get(storage: RemoteStorage, name: str, where: str) -> bytes:
    with storage.open_read(name) as f:  # a file's read() of the whole object: one GET, measured faster than cat_file
        try:
            return bytes(f.read())
        except Exception as exc:
            raise CorruptCheckpointError(where, f"reading failed: {type(exc).__name__}: {exc}") from exc


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


def remote_headers(url: str, storage_options: Mapping[str, Any] | None) -> tuple[list[tuple[str, Header, int]], bool]:
    """Each file's name, header and size at ``url`` (headers only: ranged reads), and whether an index lists them."""
    storage, files, expected = _files(url, storage_options)
    out = []
    for name in files:
        size = storage.size(name)
        with storage.open_read(name) as f:
            out.append((name, read_header(f, f"{storage.url}/{name}", size), size))
    return out, expected is not None


def load_url(url: str, *, storage_options: Mapping[str, Any] | None, verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the weights at ``url``, read into memory (ranged reads), checksums verified."""
    storage, files, expected = _files(url, storage_options)
    out: dict[str, torch.Tensor] = {}
    for name in files:
        where = f"{storage.url}/{name}"
        size = storage.size(name)
        if size <= WHOLE_OBJECT_BYTES:  # one GET beats many ranged ones for all but large objects
            buffer = io.BytesIO(_get(storage, name, where))
            header = read_header(buffer, where, size)
            tensors = read_tensors(buffer, header, where, verify=verify)
        else:
            with storage.open_read(name) as f:
                header = read_header(f, where, size)
            tensors = _fetch(storage, name, header, where, verify=verify)
        add_file(out, tensors, dict(header.aliases), expected, name, where)
    return out


def _fetch(storage: RemoteStorage, name: str, header: Header, where: str, *, verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor's bytes by ranged GETs of whole spans of neighbouring tensors (each up to FETCH_SPAN_BYTES,
    FETCH_CONCURRENT of them at once): a few large requests, not one per tensor. Checked, copied in."""
    path = storage.key_path(name)
    spans: list[list[TensorEntry]] = []
    for entry in header.by_offset():
        if spans and entry.end - spans[-1][0].start <= FETCH_SPAN_BYTES:
            spans[-1].append(entry)
        else:
            spans.append([entry])
    out: dict[str, torch.Tensor] = {}
    for first in range(0, len(spans), FETCH_CONCURRENT):
        group = spans[first : first + FETCH_CONCURRENT]
        starts = [header.data_start + span[0].start for span in group]
        ends = [header.data_start + span[-1].end for span in group]
        try:
            blobs = storage.fs.cat_ranges([path] * len(group), starts, ends)
        except Exception as exc:
            raise CorruptCheckpointError(where, f"reading tensor data failed: {type(exc).__name__}: {exc}") from exc
        for span, blob in zip(group, blobs, strict=True):
            if isinstance(blob, Exception) or len(blob) != span[-1].end - span[0].start:
                raise CorruptCheckpointError(where, "the object ended before the tensor's data", key=span[-1].name)
            data = memoryview(blob)
            for entry in span:
                piece = data[entry.start - span[0].start : entry.end - span[0].start]
                if verify and header.checksums is not None and digest(piece) != header.checksums[entry.name]:
                    raise CorruptCheckpointError(
                        where, "checksum mismatch: the tensor's bytes are damaged", key=entry.name
                    )
                tensor = torch.empty(entry.shape, dtype=CODE_TO_DTYPE[entry.code])
                if entry.nbytes:
                    byte_view(tensor)[:] = piece
                out[entry.name] = tensor
    return {e.name: out[e.name] for e in header.entries}
