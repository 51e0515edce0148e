"""A zip archive zipfile cannot read (a newer version, an unknown method) is a typed error on every path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep.errors import CorruptCheckpointError


def needs_version(path: Path, version: int) -> None:
    """Set 'version needed to extract' of every central directory entry (zipfile refuses versions past 6.3)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    assert at > 0
    while at >= 0:
        raw[at + 6 : at + 8] = version.to_bytes(2, "little")
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))


def test_a_torch_zip_of_an_unsupported_version_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path)
    needs_version(path, 255)
    for call in (torchkeep.load, torchkeep.inspect, torchkeep.load_raw):
        with pytest.raises(CorruptCheckpointError, match="zip") as caught:
            call(path)
        assert str(path) in str(caught.value)
