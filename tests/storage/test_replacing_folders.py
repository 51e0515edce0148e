"""A save replaces a folder only when that folder is what the same kind of save writes: a checkpoint folder,
a model folder. Anything else (a project folder, a manager's run, a file) is refused before anything is
written, and left exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


def project(folder: Path) -> dict[str, bytes]:
    (folder / "data").mkdir(parents=True)
    (folder / "train.py").write_text("print('train')\n")
    (folder / "data" / "x.csv").write_text("1,2\n")
    return tree(folder)


@pytest.mark.parametrize(
    "save",
    [
        lambda path: torchkeep.save_checkpoint(path, model=nn.Linear(2, 2)),
        lambda path: torchkeep.save_model(nn.Linear(2, 2), path),
    ],
    ids=["save_checkpoint", "save_model"],
)
def test_a_folder_holding_other_files_is_refused_and_kept(tmp_path: Path, save: object) -> None:
    folder = tmp_path / "proj"
    before = project(folder)
    with pytest.raises(torchkeep.CheckpointWriteError) as caught:
        save(folder)  # type: ignore[operator]
    assert caught.value.path == str(folder)
    assert "data/" in str(caught.value) and "train.py" in str(caught.value)
    assert tree(folder) == before
    assert leftovers(tmp_path) == []


def test_a_managers_run_is_not_replaced_by_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "runs"
    with torchkeep.CheckpointManager(run) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, model=nn.Linear(2, 2))
    before = tree(run)
    with pytest.raises(torchkeep.CheckpointWriteError, match="step-00000001/"):
        torchkeep.save_checkpoint(run, model=nn.Linear(2, 2))
    assert tree(run) == before
    with torchkeep.CheckpointManager(run) as mgr:
        assert [info.step for info in mgr.list()] == [1, 2, 3]


def test_a_file_is_not_replaced_by_a_folder(tmp_path: Path) -> None:
    old = tmp_path / "old.pth"
    torch.save({"w": torch.ones(3)}, old)
    data = old.read_bytes()
    with pytest.raises(torchkeep.CheckpointWriteError, match="is a file"):
        torchkeep.save_checkpoint(old, model=nn.Linear(2, 2))
    with pytest.raises(torchkeep.CheckpointWriteError, match="is a file"):
        torchkeep.save_model(nn.Linear(2, 2), old)
    assert old.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pth"]


def test_a_checkpoint_or_model_folder_is_replaced_by_the_same_kind_of_save(tmp_path: Path) -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    torchkeep.save_checkpoint(tmp_path / "ck", model=first, epoch=1)
    torchkeep.save_checkpoint(tmp_path / "ck", model=second, epoch=2)
    restored = nn.Linear(3, 3)
    assert torchkeep.load_checkpoint(tmp_path / "ck", model=restored)["epoch"] == 2
    assert_same_tensors(restored.state_dict(), second.state_dict())
    torchkeep.save_model(first, tmp_path / "m")
    torchkeep.save_model(second, tmp_path / "m", max_shard_size=20)  # a sharded model replaces a single file
    assert_same_tensors(torchkeep.load_model(tmp_path / "m").state_dict(), second.state_dict())
    (tmp_path / "empty").mkdir()
    torchkeep.save_checkpoint(tmp_path / "empty", model=first)  # an empty folder holds nothing to lose
    with pytest.raises(torchkeep.CheckpointWriteError, match=r"manifest\.json"):
        torchkeep.save_model(first, tmp_path / "ck")  # a checkpoint is not a model folder
    assert leftovers(tmp_path) == []


def test_a_link_is_replaced_and_what_it_points_to_is_kept(tmp_path: Path) -> None:
    torchkeep.save_checkpoint(tmp_path / "epoch-1", model=nn.Linear(2, 2), epoch=1)
    before = tree(tmp_path / "epoch-1")
    (tmp_path / "latest").symlink_to(tmp_path / "epoch-1")
    torchkeep.save_checkpoint(tmp_path / "latest", model=nn.Linear(2, 2), epoch=2)
    assert not (tmp_path / "latest").is_symlink()
    assert torchkeep.load_checkpoint(tmp_path / "latest", model=nn.Linear(2, 2))["epoch"] == 2
    assert tree(tmp_path / "epoch-1") == before
    assert leftovers(tmp_path) == []


def test_dot_and_long_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "work"
    before = project(folder)
    monkeypatch.chdir(folder)
    with pytest.raises(torchkeep.CheckpointWriteError) as caught:
        torchkeep.save_checkpoint(".", model=nn.Linear(2, 2))
    assert caught.value.path == str(folder)
    assert tree(folder) == before
    name = "c" * 250  # a legal name with no room for a ".tmp-" suffix after it
    model = nn.Linear(2, 2)
    torchkeep.save_checkpoint(tmp_path / name, model=model)
    torchkeep.save_model(model, tmp_path / name[:-1])
    restored = nn.Linear(2, 2)
    torchkeep.load_checkpoint(tmp_path / name, model=restored)
    assert_same_tensors(restored.state_dict(), model.state_dict())
    assert leftovers(tmp_path) == []


def test_convert_into_a_project_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torchkeep.cli.main import main

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    source = tmp_path / "checkpoints" / "checkpoint_epoch_20.pth"
    source.parent.mkdir()
    state = {"epoch": 20, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}
    torch.save(state, source)
    (tmp_path / "checkpoints" / "checkpoint_epoch_10.pth").write_bytes(source.read_bytes())
    before = tree(tmp_path / "checkpoints")
    assert main(["convert", str(source), str(tmp_path / "checkpoints")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "checkpoint_epoch_10.pth" in err
    assert tree(tmp_path / "checkpoints") == before


def test_what_killed_saves_left_is_removed_by_the_next_save_of_the_name(tmp_path: Path) -> None:
    """A SIGKILL leaves a hidden temporary (a whole checkpoint folder, a weights file); once it has not been
    touched for STALE_TEMPORARY_S, the next save of the same name removes it. Fresh ones (a live writer's)
    and other names' stay."""
    import os
    import time

    from torchkeep import _config

    def leftover(name: str, *, folder: bool, age: float) -> Path:
        path = tmp_path / f".{name}.tmp-{os.urandom(6).hex()}"
        if folder:
            path.mkdir()
            (path / "tensors.safetensors").write_bytes(b"x" * 100)
            touched = [path / "tensors.safetensors", path]
        else:
            path.write_bytes(b"x" * 100)
            touched = [path]
        for p in touched:
            os.utime(p, (time.time() - age, time.time() - age))
        return path

    old = _config.STALE_TEMPORARY_S
    stale_ck = leftover("ck", folder=True, age=old + 60)
    fresh_ck = leftover("ck", folder=True, age=5)
    other = leftover("other", folder=True, age=old + 60)
    stale_file = leftover("m.safetensors", folder=False, age=old + 60)
    torchkeep.save_checkpoint(tmp_path / "ck", model=nn.Linear(2, 2))
    torchkeep.save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    assert not stale_ck.exists() and not stale_file.exists()
    assert fresh_ck.exists() and other.exists()
