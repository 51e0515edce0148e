"""Moving a planned file's bytes to a sink, and a validated file's bytes into tensors."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.dtypes import CODE_TO_DTYPE, ITEMSIZE
from torchkeep.format.layout import FilePlan, Header, TensorEntry, byte_view, digest, fill_from
from torchkeep.format.staging import host_pieces, is_staged


def write_all(sink: Any, buffer: Any) -> None:
    """Write every byte of ``buffer``, looping over short writes and capping each call."""
    view = memoryview(buffer).cast("B")
    while view.nbytes:
        written = sink.write(view[: _config.MAX_IO_CHUNK])
        if written is None:  # a non-blocking sink said "try again": ours never are.
            raise OSError("write would block")
        view = view[written:]


def write_plan(plan: FilePlan, sink: Any) -> None:
    """Write a planned file: header, then tensors; small tensors go out in batches."""
    write_all(sink, plan.header)
    batch = bytearray()
    items, index = plan.items, 0
    while index < len(items):
        item = items[index]
        index += 1
        if is_staged(item.tensor):  # on a GPU: this and the following tensors of its device, through staging
            run = [item]
            while (
                index < len(items)
                and is_staged(items[index].tensor)
                and items[index].tensor.device == item.tensor.device
            ):
                run.append(items[index])
                index += 1
            if batch:
                write_all(sink, batch)
                batch.clear()
            for _, view in host_pieces([i.tensor for i in run]):
                write_all(sink, view)
            continue
        data = item.data
        if item.nbytes < _config.SMALL_TENSOR_BYTES:
            batch += data
            if len(batch) >= _config.SMALL_BATCH_BYTES:
                write_all(sink, batch)
                batch.clear()
            continue
        if batch:
            write_all(sink, batch)
            batch.clear()
        write_all(sink, data)
    if batch:
        write_all(sink, batch)


def _readinto_exact(f: Any, view: memoryview, path: str, entry: TensorEntry) -> None:
    if not fill_from(f, view, _config.MAX_IO_CHUNK):
        raise CorruptCheckpointError(path, "file ended before the tensor's data (truncated?)", key=entry.name)


def _check(header: Header, entry: TensorEntry, buffer: Any, path: str) -> None:
    if header.checksums is not None and digest(buffer) != header.checksums[entry.name]:
        raise CorruptCheckpointError(path, "checksum mismatch: the tensor's bytes are damaged", key=entry.name)


def read_tensors(f: Any, header: Header, path: str, *, verify: bool) -> dict[str, torch.Tensor]:
    """Read every tensor into memory, each with its own storage, verifying checksums if asked.

    Large tensors are read straight into their own storage (no copy); runs of small tensors are
    read with one call into a scratch buffer and copied out, since a read call per tensor costs
    more than the copy.
    """
    verify = verify and header.checksums is not None
    small_limit = _config.SMALL_TENSOR_BYTES
    batch_limit = _config.SMALL_BATCH_BYTES
    out: dict[str, torch.Tensor] = {}
    entries = header.by_offset()
    f.seek(header.data_start)
    scratch: bytearray | None = None
    i = 0
    while i < len(entries):
        entry = entries[i]
        if entry.nbytes >= small_limit:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
            view = byte_view(tensor)
            _readinto_exact(f, view, path, entry)
            if verify:
                _check(header, entry, view, path)
            out[entry.name] = tensor
            i += 1
            continue
        # A run of small tensors that fits in the scratch buffer: one read, then a copy each.
        j, run_bytes = i, 0
        while j < len(entries) and entries[j].nbytes < small_limit and run_bytes + entries[j].nbytes <= batch_limit:
            run_bytes += entries[j].nbytes
            j += 1
        if scratch is None:
            scratch = bytearray(batch_limit)
        scratch_view = memoryview(scratch)
        _readinto_exact(f, scratch_view[:run_bytes], path, entry)
        base_address = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
        base = entry.start
        checksums = header.checksums if verify else None
        for name, code, shape, start, end in entries[i:j]:
            tensor = torch.empty(shape, dtype=CODE_TO_DTYPE[code])
            if end > start:
                lo = start - base
                if checksums is not None and digest(scratch_view[lo : lo + end - start]) != checksums[name]:
                    raise CorruptCheckpointError(path, "checksum mismatch: the tensor's bytes are damaged", key=name)
                ctypes.memmove(tensor.data_ptr(), base_address + lo, end - start)
            out[name] = tensor
        i = j
    return {entry.name: out[entry.name] for entry in header.entries}


def map_tensors(path: str, header: Header) -> dict[str, torch.Tensor]:
    """Tensors backed by a private (copy-on-write) memory map of the file: nothing is read yet.

    Checksums are not checked here: that would read the whole file, which is what mmap avoids.
    """
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if header.data_size else None
    out: dict[str, torch.Tensor] = {}
    for name, code, shape, start, end in header.entries:
        dtype = CODE_TO_DTYPE[code]
        if end == start or mapped is None:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = header.data_start + start
        itemsize = ITEMSIZE[code]
        if offset % itemsize == 0:
            flat = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // itemsize, offset=offset)
        else:  # misaligned (another writer's layout): copy this one tensor
            flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=offset).clone().view(dtype)
        out[name] = flat if len(shape) == 1 else flat.reshape(shape)
    return out


def verify_mapped(header: Header, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Check mapped tensors against their checksums by hashing the mapped pages (page cache, no copy)."""
    verify_mapped_files([(header, tensors, path)])


def verify_mapped_files(files: list[tuple[Header, dict[str, torch.Tensor], str]]) -> None:
    """Check the mapped tensors of several files (a sharded folder's) with one pool of hashing threads.

    The work is split into runs of about equal bytes across all files; xxh3 releases the GIL, so the runs
    (and the page faults that read a cold file) proceed in parallel.
    """
    work = [
        (entry, tensors, path, header.checksums)
        for header, tensors, path in files
        if header.checksums is not None
        for entry in header.by_offset()
        if entry.nbytes
    ]

    def check(part: list[tuple[TensorEntry, dict[str, torch.Tensor], str, Any]]) -> None:
        for entry, tensors, path, checksums in part:
            if digest(byte_view(tensors[entry.name])) != checksums[entry.name]:
                raise CorruptCheckpointError(path, "checksum mismatch: the tensor's bytes are damaged", key=entry.name)

    total = sum(item[0].nbytes for item in work)
    threads = _config.HASH_THREADS
    if threads < 2 or total < _config.PARALLEL_HASH_BYTES:
        check(work)
        return
    parts: list[list[tuple[TensorEntry, dict[str, torch.Tensor], str, Any]]] = [[] for _ in range(threads)]
    share, done = total / threads, 0
    for item in work:
        parts[min(int(done / share), threads - 1)].append(item)
        done += item[0].nbytes
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="torchkeep-hash") as pool:
        for future in [pool.submit(check, part) for part in parts]:
            future.result()


def verify_tensors(f: Any, header: Header, path: str, checked: Callable[[int], None] | None = None) -> int:
    """Check every tensor's checksum by streaming the file; returns the number checked. ``checked(nbytes)``
    is called after each tensor."""
    if header.checksums is None:
        return 0
    entries = header.by_offset()
    buffer = memoryview(bytearray(max((e.nbytes for e in entries), default=0)))  # one buffer, reused
    f.seek(header.data_start)
    for entry in entries:
        view = buffer[: entry.nbytes]
        _readinto_exact(f, view, path, entry)
        _check(header, entry, view, path)
        if checked is not None:
            checked(entry.nbytes)
    return len(entries)
