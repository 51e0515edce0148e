"""save_model of a class whose constructor takes no arguments (the tutorials' SimpleNet()): its config is {}
when it builds the same structure; saving moves no random stream and allocates no second model."""

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
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 3)
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


class Tempered(nn.Module):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = temperature  # in neither repr nor the state dict


def test_a_constructor_argument_with_a_default_still_needs_a_config(tmp_path: Path) -> None:
    """Its value may live where no probe sees it: Tempered(5.0) saved as {} came back as Tempered(1.0)."""
    with pytest.raises(ValueError, match="pass config="):
        torchkeep.save_model(Tempered(5.0), tmp_path / "m")
