"""torch.distributed.checkpoint directories, read in one process, without running their pickles."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors


def dcp_save(state: dict, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path))


def test_dcp_directory_loads_with_nesting_and_plain_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    dcp_save({"model": model.state_dict(), "step": 5, "extra": {"lr": 0.1, "name": "run"}}, tmp_path / "ckpt")
    assert_same_tensors(model.state_dict(), torchkeep.load(tmp_path / "ckpt"))
    raw = torchkeep.load_raw(tmp_path / "ckpt")
    assert raw["step"] == 5 and raw["extra"] == {"lr": 0.1, "name": "run"}
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert torchkeep.load_into(fresh, tmp_path / "ckpt").ok
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    state = torchkeep.load_checkpoint(tmp_path / "ckpt", model=other)
    assert state == {"step": 5, "extra": {"lr": 0.1, "name": "run"}}
    assert_same_tensors(model.state_dict(), other.state_dict())
    assert torchkeep.scan(tmp_path / "ckpt").verdict == "safe"


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch /nonexistent-torchkeep-marker",))


def test_malicious_dcp_metadata_is_refused(tmp_path: Path) -> None:
    dcp_save({"w": torch.ones(2)}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(torchkeep.UnsafeCheckpointError, match=r"os\.system|posix\.system"):
        torchkeep.load(tmp_path / "ckpt")
    assert torchkeep.scan(tmp_path / "ckpt").verdict == "dangerous"


def test_damaged_dcp_data(tmp_path: Path) -> None:
    dcp_save({"w": torch.randn(8)}, tmp_path / "ckpt")
    data_file = next(p for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:20])
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load(tmp_path / "ckpt")
    data_file.unlink()
    with pytest.raises(torchkeep.CorruptCheckpointError, match="missing"):
        torchkeep.load(tmp_path / "ckpt")
