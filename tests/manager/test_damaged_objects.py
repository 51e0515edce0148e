"""An incremental save reuses a stored object only once its bytes match its key: a damaged one (a flipped
bit, a truncation) is rewritten from the tensor being saved, with a warning naming it, so the new
checkpoint (and the older ones using that object) load."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors, bytes_of
from torchkeep.checkpoint import objects


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(256, 256)  # a 256 KiB weight: a shared object


def flip_a_bit(path: Path, at: int = 1000) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))


def the_object(run: Path) -> Path:
    (key,) = objects.referenced_by_folder(run / "step-00000001")
    return run / objects.OBJECTS_DIR / key


def loads(folder: Path, expected: nn.Module) -> None:
    fresh = nn.Linear(256, 256)
    torchkeep.load_checkpoint(folder, model=fresh)
    assert_same_tensors(fresh.state_dict(), expected.state_dict())


@pytest.mark.parametrize("async_save", [False, True])
def test_a_flipped_bit_in_a_reused_object_is_rewritten_from_the_tensor(tmp_path: Path, async_save: bool) -> None:
    run = tmp_path / "run"
    weights = model()
    with torchkeep.CheckpointManager(run, keep_last=3, incremental=True, async_save=async_save) as mgr:
        mgr.save(1, model=weights)
        mgr.wait()
        stored = the_object(run)
        flip_a_bit(stored)
        with pytest.raises(torchkeep.CorruptCheckpointError, match="checksum mismatch"):
            loads(run / "step-00000001", weights)
        with pytest.warns(torchkeep.TorchkeepWarning, match=f"{stored.name}.*damaged.*checksum") as caught:
            mgr.save(2, model=weights)
            mgr.wait()
        assert str(stored) in str(caught[0].message)
        mgr.save(3, model=weights)  # sound again: reused without a word (warnings are errors in the tests)
        mgr.wait()
    assert stored.read_bytes() == bytes_of(weights.weight)
    for step in (1, 2, 3):  # step 1 uses the same object: it loads again too
        loads(run / f"step-{step:08d}", weights)
    restored = nn.Linear(256, 256)
    assert torchkeep.CheckpointManager(run, read_only=True).restore(model=restored)["step"] == 3
    assert_same_tensors(restored.state_dict(), weights.state_dict())
    assert not [n for n in os.listdir(run / objects.OBJECTS_DIR) if ".tmp-" in n]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: os.truncate(p, 1000), "holds 1000 bytes, not 262144"),
        (lambda p: (p.unlink(), p.symlink_to(p.with_name("elsewhere"))), "not a plain file"),
    ],
    ids=["truncated", "a link"],
)
def test_a_truncated_or_replaced_object_is_rewritten(
    tmp_path: Path, damage: Callable[[Path], object], why: str
) -> None:
    run = tmp_path / "run"
    weights = model()
    with torchkeep.CheckpointManager(run, incremental=True) as mgr:
        mgr.save(1, model=weights)
        stored = the_object(run)
        damage(stored)
        with pytest.warns(torchkeep.TorchkeepWarning, match=why):
            mgr.save(2, model=weights)
    assert not stored.is_symlink() and stored.read_bytes() == bytes_of(weights.weight)
    loads(run / "step-00000002", weights)


def test_objects_of_gpu_tensors_are_checked_and_rewritten_through_the_staging_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host tensors taken as GPU ones (as in test_incremental): the damaged object is found by hashing the
    file, and rewritten piece by piece through the staging buffers."""
    from torchkeep import _config
    from torchkeep.format import staging

    run = tmp_path / "run"
    weights = model()
    with torchkeep.CheckpointManager(run, incremental=True) as mgr:
        mgr.save(1, model=weights)
    flip_a_bit(the_object(run))
    monkeypatch.setattr(_config, "STAGING_PIECE_BYTES", 64 * 1024)
    monkeypatch.setattr(objects, "is_staged", lambda tensor: True)
    monkeypatch.setattr(staging, "is_staged", lambda tensor: True)
    written: list[int] = []
    original = staging.host_pieces

    def counted(tensors: list[torch.Tensor]) -> Iterator[tuple[int, memoryview]]:
        for index, view in original(tensors):
            written.append(view.nbytes)
            yield index, view

    monkeypatch.setattr(objects, "host_pieces", counted)
    with torchkeep.CheckpointManager(run, incremental=True) as mgr, pytest.warns(torchkeep.TorchkeepWarning):
        mgr.save(2, model=weights)
    assert written == [64 * 1024] * 4  # the 256 KiB weight, in pieces
    assert the_object(run).read_bytes() == bytes_of(weights.weight)
    loads(run / "step-00000001", weights)
    loads(run / "step-00000002", weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_damaged_object_is_rewritten_from_device_memory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    weights = model().cuda()
    with torchkeep.CheckpointManager(run, incremental=True) as mgr:
        mgr.save(1, model=weights)
        flip_a_bit(the_object(run))
        with pytest.warns(torchkeep.TorchkeepWarning, match="damaged"):
            mgr.save(2, model=weights)
    assert the_object(run).read_bytes() == bytes_of(weights.weight)
    loads(run / "step-00000001", weights.cpu())
