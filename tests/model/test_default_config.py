"""save_model of a class whose constructor needs no arguments (the tutorials' SimpleNet()): its config is {}
when its defaults build the same structure; saving moves no random stream and allocates no second model."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors


class SimpleNet(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        random.random()  # constructors may touch any generator: the probe must not move the caller's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_default_constructed_model_saves_and_loads_without_a_config(tmp_path: Path) -> None:
    model = SimpleNet()
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    torchkeep.save_model(model, tmp_path / "m")
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    loaded = torchkeep.load_model(tmp_path / "m", cls=SimpleNet)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), model(x))


def test_other_arguments_still_need_a_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"pass config=\.\.\. \(torchkeep convert: --config"):
        torchkeep.save_model(SimpleNet(hidden=8), tmp_path / "m")  # the defaults build hidden=16
    torchkeep.save_model(SimpleNet(hidden=8), tmp_path / "m", config={"hidden": 8})
    assert torchkeep.load_model(tmp_path / "m", cls=SimpleNet).fc1.out_features == 8
