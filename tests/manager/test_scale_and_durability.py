"""list() is linear; retention waits until the new checkpoint reads back; the preflight counts every byte."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import torchkeep
import torchkeep.manager.manager as manager_module
from tests.manager.helpers import fake_run
from torchkeep import CheckpointManager
from torchkeep.cli.main import main


def test_list_ranks_once_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(tmp_path, range(1, 51), lambda step: abs(step - 20) / 10)
    mgr = CheckpointManager(tmp_path, monitor="loss", read_only=True)
    calls = []
    real = CheckpointManager._best_step
    monkeypatch.setattr(CheckpointManager, "_best_step", lambda self: calls.append(1) or real(self))
    listed = mgr.list()
    assert len(calls) == 1
    assert [i.step for i in listed if i.is_best] == [20] and [i.step for i in listed if i.is_latest] == [50]


@pytest.mark.slow
def test_ten_thousand_checkpoints_list_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_run(tmp_path, range(1, 10_001), lambda step: (step * 7919 % 10_007) / 10_007)
    mgr = CheckpointManager(tmp_path, monitor="loss", read_only=True)
    started = time.perf_counter()
    listed = mgr.list()
    took = time.perf_counter() - started
    assert len(listed) == 10_000 and sum(i.is_best for i in listed) == 1 and listed[-1].is_latest
    assert took < 5.0  # a generous guard: about 0.05 s here; the quadratic version took minutes
    assert main(["ls", str(tmp_path), "--monitor", "loss"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 10_001


def test_retention_waits_for_a_new_checkpoint_that_reads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = manager_module.write_checkpoint_dir

    def lying_disk(target: Path, plan: object) -> int:
        """Writes, syncs, commits, and then the bytes on disk are not what was written."""
        size = real_write(target, plan)  # type: ignore[arg-type]
        manifest = target / "manifest.json"
        manifest.write_bytes(manifest.read_bytes().replace(b'"step": 3', b'"step": 4'))
        return size

    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, rng=False, tag="one")
        mgr.save(2, rng=False, tag="two")
        monkeypatch.setattr(manager_module, "write_checkpoint_dir", lying_disk)
        with pytest.raises(torchkeep.CheckpointWriteError, match=r"step-00000003.*does not read back.*nothing older"):
            mgr.save(3, rng=False, tag="three")
        assert [i.step for i in mgr.list()] == [2]
        with pytest.warns(torchkeep.TorchkeepWarning, match="skipped .*step-00000003"):
            assert mgr.restore(rng=False)["tag"] == "two"
    assert (tmp_path / "latest").read_text() == "step-00000002\n"
    assert (tmp_path / "step-00000002").is_dir()


def test_a_truncated_tensor_file_after_commit_stops_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = manager_module.write_checkpoint_dir

    def losing_disk(target: Path, plan: object) -> int:
        size = real_write(target, plan)  # type: ignore[arg-type]
        tensors = target / "tensors.safetensors"
        tensors.write_bytes(tensors.read_bytes()[:-8])
        return size

    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, rng=False, w=torch.ones(100))
        monkeypatch.setattr(manager_module, "write_checkpoint_dir", losing_disk)
        with pytest.raises(torchkeep.CheckpointWriteError, match="size"):
            mgr.save(2, rng=False, w=torch.ones(100))
        assert [i.step for i in mgr.list()] == [1]
    assert (tmp_path / "step-00000001").is_dir()


def test_the_preflight_counts_the_manifest_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history = [i / 3 for i in range(400_000)]  # ~8 MB of JSON beside a few bytes of tensors
    manifest_size = len(json.dumps(history))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, rng=False, w=torch.ones(4))
        # Leave the tensors and the margin room, but not the manifest. The free space is pinned: other
        # processes writing to the same disk meanwhile must not decide the outcome.
        free = shutil.disk_usage(tmp_path).free
        usage = shutil.disk_usage(tmp_path)._replace(free=free)
        monkeypatch.setattr(manager_module.shutil, "disk_usage", lambda _path: usage)
        monkeypatch.setattr(manager_module, "SPACE_MARGIN_BYTES", free - manifest_size // 2)
        with pytest.raises(torchkeep.CheckpointWriteError, match="free; nothing was written"):
            mgr.save(2, rng=False, w=torch.ones(4), history=history)
        assert [i.step for i in mgr.list()] == [1]
        monkeypatch.setattr(manager_module, "SPACE_MARGIN_BYTES", free - manifest_size * 3)
        mgr.save(2, rng=False, w=torch.ones(4), history=history)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
