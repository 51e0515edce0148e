"""One answer to "is this folder a CheckpointManager run?", for `torchkeep ls` and for `average`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli import main as cli
from torchkeep.manager import folders
from torchkeep.weights.average import average


def _run(root: Path, steps: int = 2) -> Path:
    with torchkeep.CheckpointManager(root, keep_last=10) as manager:
        for step in range(1, steps + 1):
            manager.save(step, model=nn.Linear(2, 2))
    return root


def test_what_is_a_run(tmp_path: Path) -> None:
    assert folders.is_run(_run(tmp_path / "run"))
    assert folders.is_run(str(tmp_path / "run"))
    assert not folders.is_run(tmp_path / "run" / "step-00000001")  # a checkpoint, not a run
    (tmp_path / "empty").mkdir()
    assert not folders.is_run(tmp_path / "empty")
    assert not folders.is_run(tmp_path / "missing")
    torchkeep.save({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert not folders.is_run(tmp_path / "w.safetensors")

    damaged = tmp_path / "damaged" / "step-00000005"
    damaged.mkdir(parents=True)
    (damaged / "manifest.json").write_text("{not json")
    assert folders.is_run(tmp_path / "damaged")  # a manager lists it as damaged

    not_managed = tmp_path / "saved" / "step-00000001"
    not_managed.parent.mkdir()
    torchkeep.save_checkpoint(not_managed, model=nn.Linear(2, 2))
    assert not folders.is_run(tmp_path / "saved")  # step-named, but no manager wrote it

    other = tmp_path / "other"
    with torchkeep.CheckpointManager(other, template="epoch-{step}") as manager:
        manager.save(1, model=nn.Linear(2, 2))
    assert not folders.is_run(other) and folders.is_run(other, template="epoch-{step}")


def test_the_cli_and_average_ask_the_same_predicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.is_run is folders.is_run
    run = _run(tmp_path / "run")
    monkeypatch.setattr(folders, "is_run", lambda path, template="": False)
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="is not a CheckpointManager run directory"):
        average(run, tmp_path / "x.safetensors")


def test_ls_lists_a_run_or_the_files_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ls", str(_run(tmp_path / "run")), "--json"]) == 0
    assert [c["step"] for c in json.loads(capsys.readouterr().out)["checkpoints"]] == [1, 2]
    torchkeep.save_checkpoint(tmp_path / "saved" / "step-00000001", model=nn.Linear(2, 2))
    assert cli.main(["ls", str(tmp_path / "saved"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["what"] == "torchkeep checkpoint"


def test_average_of_one_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI averages one folder that is not a run (a sharded weights folder) as one source; the API, given
    a folder as the run, says it is not one instead of finding no checkpoints in it."""
    folder = tmp_path / "hf"
    torchkeep.save({"a": torch.ones(64), "b": torch.full((64,), 2.0)}, folder, max_shard_size=300)
    assert cli.main(["average", str(folder), "-o", str(tmp_path / "avg.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"] == [str(folder)]
    assert torch.equal(torchkeep.load(tmp_path / "avg.safetensors")["b"], torch.full((64,), 2.0))
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="is not a CheckpointManager run directory"):
        average(folder, tmp_path / "x.safetensors")
    run = _run(tmp_path / "run", steps=3)
    assert cli.main(["average", str(run), "-o", str(tmp_path / "run.safetensors"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sources"]) == 3
