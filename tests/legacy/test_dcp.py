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


def _same_structure(a: object, b: object, where: str = "") -> None:
    """Same nesting, container types and values (tensors bit for bit)."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), where
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _same_structure(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_structure(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


def test_optimizer_state_keeps_its_lists_and_restores_into_a_live_optimizer(tmp_path: Path) -> None:
    """Issue 13: param_groups came back as a dict keyed "0", "1", ..., and load_checkpoint failed."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 0.01}]
    optimizer = torch.optim.AdamW(groups, lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    dcp_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}, tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "reference.pt"))
        reference = torch.load(tmp_path / "reference.pt", weights_only=False)  # trusted: written by this test
    raw = torchkeep.load_raw(tmp_path / "ckpt")
    assert isinstance(raw["optimizer"]["param_groups"], list)
    _same_structure(reference, raw)

    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fresh_opt = torch.optim.AdamW(
        [{"params": fresh[0].parameters()}, {"params": fresh[1].parameters(), "lr": 0.01}], lr=0.1, betas=(0.8, 0.9)
    )
    extra = torchkeep.load_checkpoint(tmp_path / "ckpt", model=fresh, optimizer=fresh_opt, rng=False)
    assert extra == {"epoch": 2}
    assert fresh_opt.param_groups[1]["lr"] == 0.01 and fresh_opt.param_groups[0]["betas"] == (0.8, 0.9)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])
