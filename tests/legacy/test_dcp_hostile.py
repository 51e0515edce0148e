"""DCP folders whose metadata lies: chunks that do not cover a tensor, data outside the folder, impossible shapes."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

import torchkeep
from tests.legacy.test_dcp import dcp_save


def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    dcp_save({"w": torch.randn(4, 3), "b": torch.randn(4, 3), "step": 5}, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_metadata(folder: Path, edit: Callable[[Any], None]) -> None:
    """Rewrite ``.metadata`` (our own test file, so plain pickle may read it) after ``edit``."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    edit(metadata)
    path.write_bytes(pickle.dumps(metadata))


def storage_key(metadata: Any, fqn: str) -> MetadataIndex:
    return next(index for index in metadata.storage_data if index.fqn == fqn)


def split_in_two_chunks(folder: Path, rows: tuple[tuple[int, int], tuple[int, int]]) -> torch.Tensor:
    """Re-store ``w`` (4 x 3) as two chunks of the given row ranges, appended to the data file."""
    full = torch.arange(12.0).reshape(4, 3)
    data_file = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    infos = []
    for start, stop in rows:
        buf = io.BytesIO()
        torch.save(full[start:stop].clone(), buf)
        offset = data_file.stat().st_size
        with open(data_file, "ab") as f:
            f.write(buf.getvalue())
        infos.append((start, stop, _StorageInfo(data_file.name, offset, len(buf.getvalue()))))

    def edit(metadata: Any) -> None:
        entry = metadata.state_dict_metadata["w"]
        del metadata.storage_data[storage_key(metadata, "w")]
        entry.chunks = []
        for start, stop, info in infos:
            offsets, sizes = torch.Size([start, 0]), torch.Size([stop - start, 3])
            entry.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
            metadata.storage_data[MetadataIndex("w", offsets)] = info

    edit_metadata(folder, edit)
    return full


def assert_corrupt(folder: Path, match: str) -> None:
    readers: list[Callable[[Path], Any]] = [
        torchkeep.load,
        torchkeep.load_raw,
        lambda p: torchkeep.load_checkpoint(p, model=torch.nn.Linear(1, 1)),
    ]
    for load in readers:
        with pytest.raises(torchkeep.CorruptCheckpointError, match=match):
            load(folder)


def test_a_tensor_in_two_chunks_loads_exactly(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    full = split_in_two_chunks(folder, ((0, 1), (1, 4)))
    assert torch.equal(torchkeep.load(folder)["w"], full)


def test_a_missing_chunk_is_corrupt_naming_the_tensor(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    edit_metadata(folder, lambda m: m.state_dict_metadata["w"].chunks.clear())
    assert_corrupt(folder, r"tensor 'w'.*do not cover its shape \[4, 3\]")


def test_a_chunk_covering_part_of_its_tensor_is_corrupt(tmp_path: Path) -> None:
    folder = saved(tmp_path)

    def shrink(metadata: Any) -> None:
        metadata.state_dict_metadata["w"].chunks[0] = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3]))

    edit_metadata(folder, shrink)
    assert_corrupt(folder, r"tensor 'w'.*do not cover")


def test_overlapping_chunks_that_add_up_are_corrupt(tmp_path: Path) -> None:
    """Rows 0-1 and 1-2 of 4: as many elements as the tensor, yet row 3 is never written."""
    folder = saved(tmp_path)
    split_in_two_chunks(folder, ((0, 2), (1, 3)))
    assert_corrupt(folder, r"tensor 'w'.*exactly once")


def test_a_missing_storage_entry_is_corrupt(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    edit_metadata(folder, lambda m: m.storage_data.pop(storage_key(m, "w")))
    assert_corrupt(folder, r"tensor 'w'.*no storage_data entry")


@pytest.mark.parametrize("name", ["../outside.distcp", "/etc/hostname", "sub/x.distcp", "..", ""])
def test_data_files_outside_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    folder = saved(tmp_path)
    (tmp_path / "outside.distcp").write_bytes(next(folder.glob("*.distcp")).read_bytes())

    def move(metadata: Any) -> None:
        key = storage_key(metadata, "w")
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], relative_path=name)

    edit_metadata(folder, move)
    assert_corrupt(folder, "not a plain file name")


def test_a_data_file_linking_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    data_file = next(folder.glob("*.distcp"))
    outside = tmp_path / "elsewhere.distcp"
    data_file.rename(outside)
    os.symlink(outside, data_file)
    assert_corrupt(folder, "link that leaves its folder")


def test_a_metadata_file_linking_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    (folder / ".metadata").rename(tmp_path / "real_metadata")
    os.symlink(tmp_path / "real_metadata", folder / ".metadata")
    assert_corrupt(folder, "link that leaves its folder")


@pytest.mark.parametrize(
    ("size", "match"),
    [
        (torch.Size([-1, 3]), "non-negative"),
        (torch.Size([2**40, 2**40]), r"2\*\*63"),
        (torch.Size([2**62, 4]), r"2\*\*63"),
    ],
)
def test_impossible_shapes_are_typed_errors(tmp_path: Path, size: torch.Size, match: str) -> None:
    folder = saved(tmp_path)
    edit_metadata(folder, lambda m: setattr(m.state_dict_metadata["w"], "size", size))
    assert_corrupt(folder, match)


def test_a_dtype_that_is_not_a_dtype_is_a_typed_error(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    edit_metadata(folder, lambda m: setattr(m.state_dict_metadata["w"].properties, "dtype", "float32"))
    assert_corrupt(folder, r"tensor 'w'.*not a tensor dtype")


def test_an_item_past_the_end_of_its_file_is_corrupt(tmp_path: Path) -> None:
    folder = saved(tmp_path)

    def stretch(metadata: Any) -> None:
        key = storage_key(metadata, "w")
        metadata.storage_data[key] = dataclasses.replace(metadata.storage_data[key], length=1 << 40)

    edit_metadata(folder, stretch)
    assert_corrupt(folder, "runs past the file")


def test_two_tensors_reading_the_same_bytes_are_corrupt(tmp_path: Path) -> None:
    """Otherwise a small file could fill many large tensors from one item."""
    folder = saved(tmp_path)
    edit_metadata(folder, lambda m: m.storage_data.update({storage_key(m, "b"): m.storage_data[storage_key(m, "w")]}))
    assert_corrupt(folder, "overlap in the file")


def test_items_are_read_by_their_byte_range_not_whole_files(tmp_path: Path) -> None:
    folder = saved(tmp_path)
    data_file = next(folder.glob("*.distcp"))
    with open(data_file, "ab") as f:
        f.write(bytes(48 << 20))  # unreferenced bytes after the items
    tracemalloc.start()
    try:
        state = torchkeep.load(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert state["w"].shape == (4, 3) and peak < 8 << 20, peak


@pytest.mark.parametrize(
    ("size", "boxes", "exact"),
    [
        ((8, 4), [((0, 0), (4, 4)), ((4, 0), (4, 4))], True),  # FSDP: rows
        ((8, 4), [((4, 0), (4, 4)), ((0, 0), (4, 4))], True),  # in any order
        ((8, 4), [((0, 0), (4, 4)), ((5, 0), (4, 4))], False),  # a gap and a chunk past the end
        ((8, 4), [((0, 0), (8, 2)), ((0, 2), (8, 2))], True),  # tensor parallel: columns
        ((4, 4), [((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2)), ((2, 2), (2, 2))], True),  # a 2-D grid
        ((4, 4), [((0, 0), (2, 2)), ((0, 1), (2, 2)), ((2, 0), (2, 2)), ((2, 2), (2, 2))], False),  # overlap + gap
        ((6,), [((0,), (2,))] * 3, False),  # the same chunk three times: the volume adds up
    ],
)
def test_chunk_coverage_is_exact(size: tuple[int, ...], boxes: list[Any], exact: bool) -> None:
    from torchkeep.format.pickle.dcp import Chunk, cover_exactly

    chunks = [Chunk(tuple(offsets), tuple(sizes), None) for offsets, sizes in boxes]  # type: ignore[arg-type]
    assert cover_exactly(torch.Size(size), chunks) is exact
