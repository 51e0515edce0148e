"""Optimizer state keyed by parameter names (DCP's get_state_dict, FSDP), from other people's files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

import torchkeep


def trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.1}])
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    return model, opt


def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    return model, torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}])


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, slots in sa["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, sb["state"][key][slot]), (key, slot)


def test_a_dcp_folder_of_get_state_dict_restores_model_and_optimizer(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    model, opt = trained()
    msd, osd = get_state_dict(model, opt)
    assert isinstance(next(iter(osd["state"])), str)  # keyed by names
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": msd, "optimizer": osd, "epoch": 3}, checkpoint_id=str(tmp_path / "dcp"))
    model2, opt2 = fresh()
    state = torchkeep.load_checkpoint(tmp_path / "dcp", model=model2, optimizer=opt2, trusted=False, rng=False)
    assert state["epoch"] == 3
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True)
    )
    assert_same_optimizer(opt, opt2)


def test_a_torch_save_of_name_keyed_state_from_a_ddp_model(tmp_path: Path) -> None:
    model, opt = trained()
    msd, osd = get_state_dict(model, opt)
    osd = {  # as a DDP-wrapped model names them
        "state": {f"module.{k}": v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [f"module.{p}" for p in g["params"]]} for g in osd["param_groups"]],
    }
    torch.save({"model_state_dict": msd, "optimizer_state_dict": osd}, tmp_path / "ckpt.pth")
    model2, opt2 = fresh()
    torchkeep.load_checkpoint(tmp_path / "ckpt.pth", model=model2, optimizer=opt2, rng=False)
    assert_same_optimizer(opt, opt2)

    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.Linear(2, 2))
    opt3 = torch.optim.AdamW([{"params": other[0].parameters()}, {"params": other[3].parameters()}])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(torchkeep.StateMismatchError, match="does not hold"):
        torchkeep.load_checkpoint(tmp_path / "ckpt.pth", model=other, optimizer=opt3, strict=False, rng=False)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
