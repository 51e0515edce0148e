"""A sharded folder's shards are read by a few threads and verified by one pool of hashing threads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep import _config
from torchkeep.errors import CorruptCheckpointError


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"layer{i}.weight": torch.randn(64, 64) for i in range(6)} | {"head.bias": torch.randn(5)}


@pytest.fixture(autouse=True)
def pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "PARALLEL_HASH_BYTES", 1)  # the pool path, even for test-sized shards


@pytest.mark.parametrize("mmap", [None, True, False])
def test_every_shard_comes_back_exactly(tmp_path: Path, mmap: bool | None) -> None:
    torchkeep.save(state(), tmp_path / "w", max_shard_size=40_000)
    assert len(list((tmp_path / "w").glob("*.safetensors"))) >= 3
    loaded = torchkeep.load(tmp_path / "w", mmap=mmap)
    assert list(loaded) == list(torchkeep.load(tmp_path / "w", verify=False))
    for key, tensor in state().items():
        assert torch.equal(loaded[key], tensor), key


def test_damage_in_any_shard_names_that_shard_and_tensor(tmp_path: Path) -> None:
    torchkeep.save(state(), tmp_path / "w", max_shard_size=40_000)
    index = json.loads((tmp_path / "w" / "model.safetensors.index.json").read_text())["weight_map"]
    last = sorted(set(index.values()))[-1]
    in_last = {k for k, v in index.items() if v == last}
    raw = bytearray((tmp_path / "w" / last).read_bytes())
    raw[-10] ^= 0x01  # inside the last tensor's bytes
    (tmp_path / "w" / last).write_bytes(bytes(raw))
    for mmap in (None, False):  # the default (mapped, verified) and reading into memory
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as caught:
            torchkeep.load(tmp_path / "w", mmap=mmap)
        assert last in str(caught.value) and caught.value.key in in_last
    fresh = torch.nn.Linear(64, 64)
    before = fresh.weight.clone()
    with pytest.raises(CorruptCheckpointError):
        torchkeep.load_into(fresh, tmp_path / "w", strict=False)
    assert torch.equal(fresh.weight, before)
