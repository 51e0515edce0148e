"""Damaged pickle-based files: CorruptCheckpointError, quickly, in bounded memory."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import torchkeep


def zip_claiming_huge_sizes(path: Path) -> None:
    """A torch-like archive whose deflated data.pkl declares 10 GB uncompressed (a zip bomb's shape)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    data = bytearray(buf.getvalue())
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        data[at + size_offset : at + size_offset + 4] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(data))


def stored_storage_claiming_more_than_the_file(path: Path) -> None:
    """A valid-looking archive whose tensor storage claims 10^12 elements."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    with zipfile.ZipFile(buf) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    members[name] = members[name].replace(b"K\x04t", b"\x8a\x05\x00\x10\xa5\xd4\xe8t", 1)  # numel 4 -> 10**12
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for member, data in members.items():
            dst.writestr(member, data)


@pytest.fixture
def damaged(tmp_path: Path) -> dict[str, Path]:
    files = {
        name: tmp_path / name
        for name in ("bomb.pt", "huge_storage.pt", "bad_pickle.pkl", "random.pt", "truncated_zip.pt", "empty.pt")
    }
    zip_claiming_huge_sizes(files["bomb.pt"])
    stored_storage_claiming_more_than_the_file(files["huge_storage.pt"])
    files["bad_pickle.pkl"].write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01w\x94K")
    files["random.pt"].write_bytes(bytes(range(256)) * 16)
    buf = io.BytesIO()
    torch.save({"w": torch.randn(100)}, buf)
    files["truncated_zip.pt"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["empty.pt"].write_bytes(b"")
    return files


def test_damaged_files_are_corrupt_errors(damaged: dict[str, Path]) -> None:
    for name, path in damaged.items():
        with pytest.raises(torchkeep.CorruptCheckpointError) as info:
            torchkeep.load_raw(path)
        assert str(path) in str(info.value), name


def test_damaged_files_fail_within_a_small_memory_limit(damaged: dict[str, Path]) -> None:
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import torchkeep
        for path in {[str(p) for p in damaged.values()]!r}:
            try:
                torchkeep.load_raw(path)
            except torchkeep.CorruptCheckpointError:
                continue
            sys.exit("loaded " + path)
        print("all refused")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "all refused" in done.stdout, done.stderr
