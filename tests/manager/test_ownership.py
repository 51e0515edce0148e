"""The manager deletes only what it wrote, refuses steps that would go back in time, and types its write errors."""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import torchkeep
from torchkeep import CheckpointManager
from torchkeep.checkpoint.io import write_checkpoint_dir
from torchkeep.checkpoint.layout import SaveRequest, plan_checkpoint
from torchkeep.cli.main import main


def steps_on_disk(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))


def test_a_user_folder_named_like_a_step_is_never_replaced_or_deleted(tmp_path: Path) -> None:
    mine = tmp_path / "step-00000100"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert "step-00000100" in mgr.damaged
        mgr.save(50, rng=False)
        with pytest.raises(torchkeep.CheckpointWriteError, match=r"step-00000100.*not a checkpoint this manager"):
            mgr.save(100, rng=False)
        mgr.save(200, rng=False)
        mgr.save(300, rng=False)
        assert [i.step for i in mgr.list()] == [300]
    assert (mine / "notes.txt").read_text() == "my notes"
    assert steps_on_disk(tmp_path) == ["step-00000100", "step-00000300"]


def test_a_folder_with_a_damaged_manifest_is_never_deleted(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, rng=False, w=torch.ones(3))
        mgr.save(2, rng=False, w=torch.ones(3))
    manifest = tmp_path / "step-00000001" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-20])
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert "step-00000001" in mgr.damaged
        mgr.save(3, rng=False)
        mgr.save(4, rng=False)
    assert steps_on_disk(tmp_path) == ["step-00000001", "step-00000004"]


def test_checkpoints_not_written_by_a_manager_are_never_deleted(tmp_path: Path) -> None:
    # Written by torchkeep, but not by a manager: save_checkpoint, and a manifest without "manager": 1.
    torchkeep.save_checkpoint(tmp_path / "step-00000001", rng=False, epoch=1)
    write_checkpoint_dir(tmp_path / "step-00000002", plan_checkpoint(SaveRequest(rng=False), info={"step": 2}))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, rng=False)
    # A copy under another step's name: its manifest says step 5.
    shutil.copytree(tmp_path / "step-00000005", tmp_path / "step-00000003")
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        assert [i.step for i in mgr.list()] == [5]
        for step in (6, 7, 8):
            mgr.save(step, rng=False)
    assert steps_on_disk(tmp_path) == ["step-00000001", "step-00000002", "step-00000003", "step-00000008"]
    assert torchkeep.load_checkpoint(tmp_path / "step-00000001", rng=False) == {"epoch": 1}


def test_a_user_file_inside_a_checkpoint_keeps_the_folder_and_warns_once(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, rng=False, tag="one")
        (tmp_path / "step-00000001" / "eval.csv").write_text("acc,0.9\n")
        with pytest.warns(torchkeep.TorchkeepWarning, match=r"step-00000001.*eval\.csv") as caught:
            mgr.save(2, rng=False)
        assert len(caught) == 1
        mgr.save(3, rng=False)  # warned once: a second warning here would be an error
        assert [i.step for i in mgr.list()] == [1, 3]
        assert mgr.restore(1, rng=False)["tag"] == "one"  # still a whole checkpoint
        (tmp_path / "step-00000001" / "eval.csv").unlink()
        mgr.save(4, rng=False)
        assert [i.step for i in mgr.list()] == [4]
    assert steps_on_disk(tmp_path) == ["step-00000004"]


def test_start_up_removes_only_temporaries_that_are_provably_ours(tmp_path: Path) -> None:
    ours_partial = tmp_path / ".step-00000003.tmp-0123456789ab"
    ours_partial.mkdir()
    (ours_partial / "tensors.safetensors").write_bytes(b"partial")
    (ours_partial / ".manifest.json.tmp-abcdefabcdef").write_bytes(b"{")
    ours_empty = tmp_path / ".step-00000004.tmp-0123456789ab"
    ours_empty.mkdir()
    latest_temp = tmp_path / ".latest.tmp-0123456789ab"
    latest_temp.write_text("step-00000003\n")
    with_user_file = tmp_path / ".step-00000005.tmp-0123456789ab"
    with_user_file.mkdir()
    (with_user_file / "tensors.safetensors").write_bytes(b"partial")
    (with_user_file / "thesis.tex").write_text("years of work")
    with_subfolder = tmp_path / ".step-00000006.tmp-0123456789ab"
    (with_subfolder / "data").mkdir(parents=True)
    not_hex = tmp_path / ".step-00000007.tmp-mine"
    not_hex.mkdir()
    a_file = tmp_path / ".step-00000008.tmp-0123456789ab"
    a_file.write_text("a file, not a folder we would write")
    other_name = tmp_path / ".results.tmp-0123456789ab"
    other_name.mkdir()
    with pytest.warns(torchkeep.TorchkeepWarning) as caught:
        CheckpointManager(tmp_path).close()
    assert not ours_partial.exists() and not ours_empty.exists() and not latest_temp.exists()
    assert (with_user_file / "thesis.tex").read_text() == "years of work"
    assert (with_user_file / "tensors.safetensors").exists()  # the folder is left whole
    for kept in (with_subfolder / "data", not_hex, a_file, other_name):
        assert kept.exists(), kept
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2 and "thesis.tex" in said[0] and "data/" in said[1]


def test_a_step_at_or_below_the_newest_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=1, save_every=10) as mgr:
        mgr.save(100, rng=False, tag="hundred")
        with pytest.raises(ValueError, match=r"step 50 is not after the newest saved step 100 in .*; pass a larger"):
            mgr.save(50, rng=False, tag="fifty")
        with pytest.raises(ValueError, match="already saved"):
            mgr.save(100, rng=False)
        assert [i.step for i in mgr.list()] == [100]
        assert [s for s in (50, 99, 100, 105, 110) if mgr.should_save(s)] == [110]
        assert mgr.restore(rng=False)["tag"] == "hundred"
        mgr.save(110, rng=False)
    assert steps_on_disk(tmp_path) == ["step-00000110"]
    # The rule holds across processes too: the newest on disk counts.
    with CheckpointManager(tmp_path) as again, pytest.raises(ValueError, match="not after the newest saved step 110"):
        again.save(7, rng=False)


def test_a_latest_that_cannot_be_written_is_a_typed_error_and_retention_waits(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, rng=False)
        (tmp_path / "latest").unlink()
        (tmp_path / "latest").mkdir()  # in the way: the rename onto it fails
        with pytest.raises(torchkeep.CheckpointWriteError, match=r"latest.*step 2 is saved") as caught:
            mgr.save(2, rng=False)
        assert str(tmp_path / "latest") in str(caught.value)
        assert [i.step for i in mgr.list()] == [1, 2]  # both on disk; nothing retired
        (tmp_path / "latest").rmdir()
        mgr.save(3, rng=False)
        assert [i.step for i in mgr.list()] == [3]
    assert (tmp_path / "latest").read_text() == "step-00000003\n"


def test_a_removed_or_replaced_run_directory_is_a_typed_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with CheckpointManager(run, keep_last=1) as mgr:
        mgr.save(1, rng=False)
        shutil.rmtree(run)
        with pytest.raises(torchkeep.CheckpointWriteError, match="was removed or replaced"):
            mgr.save(2, rng=False)
        assert not run.exists()  # not quietly recreated without its lock
    with CheckpointManager(run) as mgr:  # a new manager starts afresh
        mgr.save(1, rng=False)


def test_a_checkpoint_deleted_by_hand_is_dropped_from_the_view(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        mgr.save(1, rng=False)
        mgr.save(2, rng=False)
        shutil.rmtree(tmp_path / "step-00000001")
        mgr.save(3, rng=False)
        assert [i.step for i in mgr.list()] == [2, 3]


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@pytest.fixture
def read_only_run(tmp_path: Path) -> Iterator[Path]:
    """A run directory that a read-only bind mount will cover (the manager holds its lock open for writing)."""
    run = tmp_path / "run"
    run.mkdir()
    yield run
    subprocess.run(["umount", str(run)], capture_output=True, check=False)


def test_a_read_only_filesystem_is_a_typed_error_naming_the_path(read_only_run: Path) -> None:
    run = read_only_run
    with CheckpointManager(run, keep_last=1) as mgr:
        mgr.save(1, rng=False, tag="one")
        if not (_mount("--bind", str(run), str(run)) and _mount("-o", "remount,bind,ro", str(run))):
            pytest.skip("cannot mount read-only here (needs root and mount permission)")
        with pytest.raises(torchkeep.CheckpointWriteError) as caught:
            mgr.save(2, rng=False)
        assert caught.value.errno == errno.EROFS and str(run) in str(caught.value)
        assert [i.step for i in mgr.list()] == [1]
        assert mgr.restore(rng=False)["tag"] == "one"
    with pytest.raises(torchkeep.CheckpointWriteError, match="read_only=True"):
        CheckpointManager(run)
    assert main(["ls", str(run)]) == 0
    assert CheckpointManager(run, read_only=True).restore(rng=False)["tag"] == "one"


def test_a_retention_rename_that_fails_is_a_typed_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, rng=False)
        old = tmp_path / "step-00000001"
        # A mount point cannot be renamed (EBUSY): a real OS refusal, not a simulated one.
        if not _mount("--bind", str(old), str(old)):
            pytest.skip("cannot bind-mount here (needs root and mount permission)")
        try:
            with pytest.raises(torchkeep.CheckpointWriteError, match=r"step-00000001.*step 2 is saved") as caught:
                mgr.save(2, rng=False)
            assert caught.value.errno == errno.EBUSY
            assert [i.step for i in mgr.list()] == [1, 2]
        finally:
            subprocess.run(["umount", str(old)], capture_output=True, check=False)
        mgr.save(3, rng=False)
        assert [i.step for i in mgr.list()] == [3]
