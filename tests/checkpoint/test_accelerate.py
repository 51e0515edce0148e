"""A real Accelerate save_state folder resumes through load_checkpoint, as Accelerator.load_state would."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    accelerate = pytest.importorskip("accelerate")


def _objects(seed: int) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)


def test_save_state_folder_restores_objects_step_and_generators(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accelerator = accelerate.Accelerator(cpu=True)
        model, opt, sched = accelerator.prepare(*_objects(0))
        for _ in range(3):
            model(torch.randn(5, 4)).pow(2).sum().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            accelerator.step += 1
        accelerator.save_state(str(tmp_path / "state"))
    after_save = (torch.rand(3), np.random.rand(2), random.random())
    assert torchkeep.scan(tmp_path / "state").verdict == "safe"
    layouts = {
        name: torchkeep.inspect(tmp_path / "state" / name).contents
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")
    }
    assert {name: c.layout for name, c in layouts.items() if c is not None} == {
        "optimizer.bin": "optimizer state",
        "scheduler.bin": "scheduler state",
        "random_states_0.pkl": "RNG state",
    }

    fresh_model, fresh_opt, fresh_sched = _objects(1)
    values = torchkeep.load_checkpoint(
        tmp_path / "state", model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched
    )
    assert values["step"] == 3
    again = (torch.rand(3), np.random.rand(2), random.random())  # generators restored: the same draws
    assert torch.equal(again[0], after_save[0]) and np.array_equal(again[1], after_save[1])
    assert again[2] == after_save[2]
    assert_same_tensors(dict(model.state_dict()), dict(fresh_model.state_dict()))
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for saved, restored in zip(
        opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True
    ):
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
    with pytest.raises(torchkeep.LoadMismatchError):
        torchkeep.load_checkpoint(tmp_path / "state", model=nn.Linear(4, 2))


def test_numbered_objects_are_read_in_one_pass_up_to_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model, model_1...: each kind numbered without gaps, read until an index has no file of any kind; at
    most MAX_PREPARED indices. The model's safetensors file is preferred to pytorch_model.bin."""
    from torchkeep.checkpoint import accelerate as reader

    folder = tmp_path / "state"
    folder.mkdir()
    models = [nn.Linear(2, 2) for _ in range(3)]
    torchkeep.save(models[0], folder / "model.safetensors")
    torch.save({"weight": torch.zeros(1)}, folder / "pytorch_model.bin")  # not read: safetensors wins
    torch.save(models[1].state_dict(), folder / "pytorch_model_1.bin")
    torchkeep.save(models[2], folder / "model_3.safetensors")  # index 2 holds nothing: not read
    for index, suffix in enumerate(("", "_1")):
        opt = torch.optim.SGD(models[0].parameters(), lr=0.1 * (index + 1))
        torch.save(opt.state_dict(), folder / f"optimizer{suffix}.bin")
    torch.save(torch.optim.lr_scheduler.StepLR(opt, 1).state_dict(), folder / "scheduler.bin")

    objects, _, _ = reader.read_accelerate_state(folder, rank=0, trusted=False)
    assert list(objects) == ["model", "optimizer", "scheduler", "components.model_1", "components.optimizer_1"]
    assert_same_tensors(objects["model"], dict(models[0].state_dict()))
    assert_same_tensors(objects["components.model_1"], dict(models[1].state_dict()))
    assert objects["components.optimizer_1"]["param_groups"][0]["lr"] == pytest.approx(0.2)

    monkeypatch.setattr(reader, "MAX_PREPARED", 1)
    objects, _, _ = reader.read_accelerate_state(folder, rank=0, trusted=False)
    assert list(objects) == ["model", "optimizer", "scheduler"]
