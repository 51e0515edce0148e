"""Modules with get_extra_state(): checkpoints keep it and give it back to set_extra_state; weights files
hold it when it is a tensor and refuse it, saying what to use, when it is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state


class WithExtra(nn.Module):
    def __init__(self, extra: Any = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(2, 2)
        self.extra = extra

    def get_extra_state(self) -> Any:
        return self.extra

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


class Outer(nn.Module):
    """Extra state one level down: its key is ``inner._extra_state``."""

    def __init__(self, extra: Any = None, seed: int = 0) -> None:
        super().__init__()
        self.inner = WithExtra(extra, seed)
        self.head = nn.Linear(2, 1)


VOCAB = {"vocab": {"a": 1, "b": [2, 3]}, "name": "tok", "ratio": 0.5, "none": None}


def test_a_checkpoint_keeps_a_modules_extra_state_and_restores_it(tmp_path: Path) -> None:
    model = Outer(VOCAB)
    torchkeep.save_checkpoint(tmp_path / "ck", model=model, rng=False)
    other = Outer({"vocab": {}}, seed=1)
    torchkeep.load_checkpoint(tmp_path / "ck", model=other, rng=False)
    assert other.inner.extra == VOCAB
    assert_same_state(dict(model.state_dict()), dict(other.state_dict()))


def test_a_manager_restores_a_modules_extra_state(tmp_path: Path) -> None:
    model = Outer(VOCAB)
    manager = torchkeep.CheckpointManager(tmp_path / "run")
    manager.save(1, model=model)
    other = Outer(None, seed=1)
    state = manager.restore(model=other)
    assert state["step"] == 1 and other.inner.extra == VOCAB
    assert_same_state(dict(model.state_dict()), dict(other.state_dict()))


def test_a_tensor_extra_state_comes_back_as_its_own_tensor(tmp_path: Path) -> None:
    extra = torch.arange(6, dtype=torch.int16).reshape(2, 3)
    torchkeep.save_checkpoint(tmp_path / "ck", model=WithExtra(extra), rng=False)
    torchkeep.save(WithExtra(extra), tmp_path / "w.safetensors")
    for source in (tmp_path / "ck", tmp_path / "w.safetensors"):
        other = WithExtra(torch.zeros(1), seed=1)
        if source.suffix:
            torchkeep.load_into(other, source)
        else:
            torchkeep.load_checkpoint(source, model=other, rng=False)
        assert other.extra.dtype == torch.int16 and torch.equal(other.extra, extra)
        other.extra.add_(1)  # a private copy: the file is not written through it
    assert torch.equal(torchkeep.load(tmp_path / "w.safetensors")["_extra_state"], extra)


@pytest.mark.parametrize("how", ["save", "save_model"])
def test_a_weights_file_refuses_extra_state_that_is_not_a_tensor(tmp_path: Path, how: str) -> None:
    model = Outer(VOCAB)
    target = tmp_path / ("w.safetensors" if how == "save" else "m")
    with pytest.raises(torchkeep.UnsupportedTensorError) as caught:
        if how == "save":
            torchkeep.save(model, target)
        else:
            torchkeep.save_model(model, target, config={})
    assert caught.value.key == "inner._extra_state"
    assert "a dict" in str(caught.value) and "torchkeep.save_checkpoint(path, model=model)" in str(caught.value)
    assert not target.exists()


def test_load_into_and_load_checkpoint_pass_a_torch_files_extra_state(tmp_path: Path) -> None:
    model = Outer(VOCAB)
    torch.save(model.state_dict(), tmp_path / "x.pth")
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ck.pth")
    for map_location in (None, "cpu", {"cpu": "cpu"}):  # an explicit map_location dropped the extra state
        other = Outer(None, seed=1)
        report = torchkeep.load_into(other, tmp_path / "x.pth", map_location=map_location)
        assert report.ok and "inner._extra_state" in report.loaded
        assert other.inner.extra == VOCAB
        assert_same_state(dict(model.state_dict()), dict(other.state_dict()))
    other = Outer(None, seed=1)
    assert torchkeep.load_checkpoint(tmp_path / "ck.pth", model=other, rng=False) == {"epoch": 3}
    assert other.inner.extra == VOCAB
    assert set(torchkeep.load(tmp_path / "x.pth")) == {"inner.lin.weight", "inner.lin.bias", "head.weight", "head.bias"}


def test_extra_state_the_model_lacks_or_the_file_lacks_is_reported(tmp_path: Path) -> None:
    torch.save(Outer(VOCAB).state_dict(), tmp_path / "x.pth")
    plain = nn.Module()
    plain.inner = nn.Module()
    plain.inner.lin = nn.Linear(2, 2)
    plain.head = nn.Linear(2, 1)
    with pytest.raises(torchkeep.LoadMismatchError, match=r"inner\._extra_state"):
        torchkeep.load_into(plain, tmp_path / "x.pth")
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    report = torchkeep.load_into(Outer(VOCAB), tmp_path / "plain.pth", strict=False)
    assert report.missing == ["inner._extra_state"]
