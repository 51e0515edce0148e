"""DCP's ``read_data`` for files torchkeep has verified: each chunk read straight into its destination.

DCP's own reader ``torch.load``s every chunk into a new tensor (allocated, and its pages faulted in),
then copies it into the tensor the planner resolves. Once every file's checksum has been checked against
the manifest, the same bytes can go straight into that tensor with one ``readinto``: the chunk's archive
is read for its geometry only (directory and pickle, no data), and where the stored chunk is the
destination exactly (same dtype and shape, both contiguous, a CPU destination) its bytes land there
directly. Anything else (a resharded slice, a cast, a transform, a non-tensor item) takes DCP's own path.
The zip CRC is not recomputed: the file's checksum already covered those bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.layout import ByteRange, byte_view, fill_from
from torchkeep.format.pickle.torchfile import locate_tensor


def read_data_direct(
    reader: Any, plan: LoadPlan, planner: LoadPlanner, fallback: Callable[[LoadPlan, LoadPlanner], Future[None]]
) -> Future[None]:
    """``reader``'s (a DCP FileSystemReader or FsspecReader) requests, file by file in offset order;
    what cannot be read directly goes to ``fallback`` (DCP's own ``read_data``) in one batch."""
    per_file: dict[str, list[tuple[int, ReadItem]]] = {}
    for item in plan.items:
        info = reader.storage_data[item.storage_index]
        per_file.setdefault(info.relative_path, []).append((info.offset, item))
    others: list[ReadItem] = []
    for relative, items in per_file.items():
        path = reader.fs.concat_path(reader.path, relative)
        with reader.fs.create_stream(path, "rb") as stream:
            for _, item in sorted(items, key=lambda pair: pair[0]):
                info = reader.storage_data[item.storage_index]
                if item.type == LoadItemType.BYTE_IO or getattr(info, "transform_descriptors", None):
                    others.append(item)
                    continue
                window = ByteRange(stream, info.offset, info.length)
                if not _read_into_destination(window, str(path), item, planner):
                    others.append(item)
    if others:
        return fallback(LoadPlan(others, plan.storage_data, plan.planner_data), planner)
    done: Future[None] = Future()
    done.set_result(None)
    return done


def _read_into_destination(window: ByteRange, label: str, item: ReadItem, planner: LoadPlanner) -> bool:
    """True when ``item``'s chunk went straight into its destination; False to leave it to DCP."""
    located = locate_tensor(window, label, window.length)
    if located is None:
        return False
    stored = located.geometry
    target = planner.resolve_tensor(item).detach()
    whole = all(offset == 0 for offset in item.storage_offsets) and tuple(item.lengths) == tuple(stored.shape)
    if not (
        whole
        and target.device.type == "cpu"
        and target.dtype == stored.dtype
        and tuple(target.shape) == tuple(stored.shape)
        and target.is_contiguous()
        and stored.is_contiguous()
        and stored.storage_offset() == 0
        and located.nbytes == math.prod(stored.shape) * stored.element_size()
    ):
        return False
    window.seek(located.start)
    try:
        complete = fill_from(window, byte_view(target))
    except EOFError:
        complete = False
    if not complete:
        raise CorruptCheckpointError(label, f"chunk of {item.dest_index.fqn!r} is truncated")
    planner.commit_tensor(item, target)
    return True


class _Checked:
    """DCP's reader, given the metadata torchkeep read and checked instead of unpickling it; for files (or
    objects) already verified against the manifest, which it reads straight into the destinations."""

    _checked: Any
    load_id: Any

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        self._checked.storage_meta = StorageMeta(load_id=self.load_id)
        return self._checked

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        return read_data_direct(self, plan, planner, super().read_data)  # type: ignore[misc]


class CheckedReader(_Checked, FileSystemReader):
    """A folder's DCP files."""

    def __init__(self, path: Path, metadata: Any) -> None:
        super().__init__(path)
        self._checked = metadata


class CheckedFsspecReader(_Checked, FsspecReader):
    """DCP files on object storage."""

    def __init__(self, path: str, metadata: Any, **storage_options: Any) -> None:
        super().__init__(path, **storage_options)
        self._checked = metadata
