"""load_checkpoint semantics: all-or-nothing, RNG, missing objects, damage, devices."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from tests.checkpoint.helpers import assert_same_state
from tests.conftest import requires_cuda


def model_and_opt(out: int = 3, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_rng_states_are_restored(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torchkeep.save_checkpoint(tmp_path / "c")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    torchkeep.load_checkpoint(tmp_path / "c")
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_rng_false_leaves_generators_alone(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "c")
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    torchkeep.load_checkpoint(tmp_path / "c", rng=False)
    assert torch.equal(torch.rand(2), expected)


def test_strict_mismatch_leaves_every_object_unchanged(tmp_path: Path) -> None:
    model, opt = model_and_opt(out=10)
    torchkeep.save_checkpoint(tmp_path / "c", model=model, optimizer=opt, epoch=1)
    target, target_opt = model_and_opt(out=5, seed=1)
    before_model = copy.deepcopy(target.state_dict())
    before_opt = copy.deepcopy(target_opt.state_dict())
    before_rng = torch.get_rng_state()
    with pytest.raises(torchkeep.LoadMismatchError) as info:
        torchkeep.load_checkpoint(tmp_path / "c", model=target, optimizer=target_opt)
    assert {m.key for m in info.value.report.mismatched} == {"2.weight", "2.bias"}
    assert_same_state(before_model, target.state_dict())
    assert_same_state(before_opt, target_opt.state_dict())
    assert torch.equal(before_rng, torch.get_rng_state())


def test_optimizer_with_other_groups_is_refused_before_anything_changes(tmp_path: Path) -> None:
    model, opt = model_and_opt()
    torchkeep.save_checkpoint(tmp_path / "c", model=model, optimizer=opt)
    target, _ = model_and_opt(seed=2)
    before = copy.deepcopy(target.state_dict())
    other = torch.optim.SGD([{"params": target[0].parameters()}, {"params": target[2].parameters()}], lr=0.1)
    with pytest.raises(torchkeep.StateMismatchError, match="parameter groups") as caught:
        torchkeep.load_checkpoint(tmp_path / "c", model=target, optimizer=other)
    assert isinstance(caught.value, ValueError)  # what callers caught before
    assert_same_state(before, target.state_dict())


def test_objects_missing_from_the_checkpoint(tmp_path: Path) -> None:
    model, _ = model_and_opt()
    torchkeep.save_checkpoint(tmp_path / "c", model=model)
    _, opt = model_and_opt()
    with pytest.raises(torchkeep.LoadMismatchError, match="optimizer"):
        torchkeep.load_checkpoint(tmp_path / "c", optimizer=opt)
    with pytest.warns(torchkeep.TorchkeepWarning, match="optimizer"):
        torchkeep.load_checkpoint(tmp_path / "c", optimizer=opt, strict=False)


def test_dataparallel_and_compiled_models_resume_into_bare_ones(tmp_path: Path) -> None:
    model, opt = model_and_opt()
    torchkeep.save_checkpoint(tmp_path / "c", model=nn.DataParallel(model), optimizer=opt)
    target, target_opt = model_and_opt(seed=4)
    torchkeep.load_checkpoint(tmp_path / "c", model=torch.compile(target), optimizer=target_opt)
    assert_same_state(model.state_dict(), target.state_dict())


@pytest.mark.parametrize("victim", ["manifest.json", "tensors.safetensors"])
def test_damaged_files_raise_corrupt_checkpoint(tmp_path: Path, victim: str) -> None:
    model, opt = model_and_opt()
    torchkeep.save_checkpoint(tmp_path / "c", model=model, optimizer=opt, epoch=3)
    path = tmp_path / "c" / victim
    data = path.read_bytes()
    for i in range(0, len(data), max(1, len(data) // 97)):
        flipped = bytearray(data)
        flipped[i] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(torchkeep.CorruptCheckpointError):
            torchkeep.load_checkpoint(tmp_path / "c", model=model_and_opt()[0])
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load_checkpoint(tmp_path / "c")
    path.unlink()
    with pytest.raises(torchkeep.CorruptCheckpointError, match=r"missing|no manifest"):
        torchkeep.load_checkpoint(tmp_path / "c")


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        torchkeep.load_checkpoint(tmp_path / "nope")


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "c", rng=False, epoch=1, extra=torch.ones(3))
    torchkeep.save_checkpoint(tmp_path / "c", rng=False, epoch=2)
    assert torchkeep.load_checkpoint(tmp_path / "c", rng=False) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_map_location_for_returned_tensors(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "c", rng=False, loss=torch.tensor(1.0))
    seen: list[str] = []

    def hook(storage: torch.UntypedStorage, location: str) -> None:
        seen.append(location)

    torchkeep.load_checkpoint(tmp_path / "c", rng=False, map_location=hook)
    assert seen == ["cpu"]


@requires_cuda
def test_cuda_tensors_and_generators(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(7)
    model, _ = model_and_opt()
    model.cuda()
    torchkeep.save_checkpoint(tmp_path / "c", model=model, loss=torch.tensor(2.0, device="cuda"))
    expected = torch.rand(2, device="cuda")
    state = torchkeep.load_checkpoint(tmp_path / "c", map_location=None)
    assert state["loss"].is_cuda
    assert torch.equal(torch.rand(2, device="cuda"), expected)
    state = torchkeep.load_checkpoint(tmp_path / "c", rng=False)
    assert not state["loss"].is_cuda
