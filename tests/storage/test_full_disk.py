"""Full and read-only disks, for real: a small tmpfs mounted by the test (skipped where mounting is not allowed).

Every write either completes or raises CheckpointWriteError naming the path and the cause, and what
was saved before is still there and loads bit for bit.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep.manager.manager import SPACE_MARGIN_BYTES

DISK_BYTES = 40 * 1024 * 1024


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs of our own (the manager keeps a 16 MB margin free)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not _run("mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        yield mount
    finally:
        _run("umount", "-l", str(mount))


def fill(disk: Path, leave: int) -> None:
    """Take all free space but about ``leave`` bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(free - leave, 0))
        f.flush()
        os.fsync(f.fileno())


def debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


def test_manifest_that_does_not_fit_fails_and_keeps_the_old_checkpoint(disk: Path) -> None:
    # The reported bug: the tensor file fits, the manifest is cut short by the full disk and
    # was committed truncated. Now the short write is retried, the retry reports ENOSPC.
    model = nn.Linear(4, 2)
    path = disk / "ckpt"
    torchkeep.save_checkpoint(path, model=model, epoch=1, history=[0.5])
    before = torchkeep.load(path / "tensors.safetensors")
    fill(disk, leave=256 * 1024)
    long_history = [float(i) / 3 for i in range(100_000)]  # ~2 MB of JSON, a few KB of tensors
    with pytest.raises(torchkeep.CheckpointWriteError) as caught:
        torchkeep.save_checkpoint(path, model=nn.Linear(4, 2), epoch=2, history=long_history)
    assert caught.value.errno == errno.ENOSPC
    assert "ckpt" in str(caught.value) and "no space left" in str(caught.value).lower()
    assert caught.value.path == str(path)  # the path asked for, not its temporary (gone by now)
    restored = nn.Linear(4, 2)
    assert torchkeep.load_checkpoint(path, model=restored)["epoch"] == 1
    assert_same_tensors(before, torchkeep.load(path / "tensors.safetensors"))
    assert debris(disk) == []


def test_manager_on_a_full_disk_loses_nothing(disk: Path) -> None:
    run = disk / "run"
    model = nn.Linear(16, 16)
    with torchkeep.CheckpointManager(run, keep_last=1) as mgr:
        mgr.save(1, model=model, history=[1.0])
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        # Room for the tensors and the manager's margin, not for the manifest: refused up front
        # (the preflight counts the manifest) or cut short by the disk; either way nothing is lost.
        fill(disk, leave=SPACE_MARGIN_BYTES + 256 * 1024)
        with torch.no_grad():
            model.weight.add_(1)
        with pytest.raises(torchkeep.CheckpointWriteError):
            mgr.save(2, model=model, history=[i / 3 for i in range(1_200_000)])  # ~22 MB of JSON
        mgr.wait()
    fresh = nn.Linear(16, 16)
    reader = torchkeep.CheckpointManager(run, read_only=True)
    assert [c.step for c in reader.list()] == [1]
    assert reader.restore(model=fresh)["step"] == 1
    assert_same_tensors(saved, dict(fresh.state_dict()))
    assert debris(disk) == []


def test_weights_save_on_a_full_disk(disk: Path) -> None:
    path = disk / "model.safetensors"
    small = {"w": torch.arange(10.0)}
    torchkeep.save(small, path)
    fill(disk, leave=64 * 1024)
    with pytest.raises(torchkeep.CheckpointWriteError) as caught:
        torchkeep.save({"w": torch.randn(1024, 1024)}, path)
    assert caught.value.errno == errno.ENOSPC and str(path) in str(caught.value)
    assert_same_tensors(small, torchkeep.load(path))
    # Sharded folders and save_model: the same write path.
    with pytest.raises(torchkeep.CheckpointWriteError):
        torchkeep.save(
            {"a": torch.randn(256, 1024), "b": torch.randn(256, 1024)}, disk / "sharded", max_shard_size="1MB"
        )
    with pytest.raises(torchkeep.CheckpointWriteError):
        torchkeep.save_model(nn.Sequential(nn.Linear(1024, 512)), disk / "net")
    assert not (disk / "net").exists()
    assert debris(disk) == []


def test_read_only_filesystem(disk: Path) -> None:
    torchkeep.save_checkpoint(disk / "ckpt", model=nn.Linear(2, 2), epoch=1)
    if not _run("mount", "-o", "remount,ro", str(disk)):
        pytest.skip("cannot remount read-only")
    for attempt in (
        lambda: torchkeep.save_checkpoint(disk / "ckpt", model=nn.Linear(2, 2), epoch=2),
        lambda: torchkeep.save({"w": torch.ones(2)}, disk / "w.safetensors"),
        lambda: torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), disk / "net"),
    ):
        with pytest.raises(torchkeep.CheckpointWriteError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS
        assert "read-only" in str(caught.value)
    assert torchkeep.load_checkpoint(disk / "ckpt", model=nn.Linear(2, 2))["epoch"] == 1


def test_a_sharded_save_that_runs_out_of_space_leaves_no_shard_behind(disk: Path) -> None:
    folder = disk / "sharded"
    old = {"w": torch.arange(10.0)}
    torchkeep.save(old, folder)
    fill(disk, leave=3 * 1024 * 1024)  # room for a few 1 MiB shards, not for eight
    new = {f"layer{i}": torch.randn(256, 1024) for i in range(8)}
    with pytest.raises(torchkeep.CheckpointWriteError) as caught:
        torchkeep.save(new, folder, max_shard_size="1MiB")
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]  # the old save alone
    assert_same_tensors(old, torchkeep.load(folder))
    assert debris(disk) == []
