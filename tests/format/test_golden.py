"""Files of every released format version keep loading, and today's writer still makes them byte for byte."""

from __future__ import annotations

from pathlib import Path

import torchkeep
from tests.conftest import assert_same_tensors
from tests.format.golden_state import GOLDEN_METADATA, golden_state

GOLDEN = Path(__file__).parent / "golden"


def test_v1_golden_file_loads_exactly() -> None:
    loaded = torchkeep.load(GOLDEN / "v1.safetensors")
    assert_same_tensors(golden_state(), loaded)
    assert loaded["head.weight"] is loaded["embed.weight"]
    info = torchkeep.inspect(GOLDEN / "v1.safetensors")
    assert info.metadata == GOLDEN_METADATA and info.checksummed
    assert info.format == "torchkeep safetensors v1"


def test_writer_reproduces_the_v1_golden_bytes(tmp_path: Path) -> None:
    torchkeep.save(golden_state(), tmp_path / "again.safetensors", metadata=GOLDEN_METADATA)
    assert (tmp_path / "again.safetensors").read_bytes() == (GOLDEN / "v1.safetensors").read_bytes()
