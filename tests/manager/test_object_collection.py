"""An incremental run's shared objects are deleted only when no manifest in the run folder mentions them:
whatever the folder's name (a renamed checkpoint, another template's) and whichever manager collects."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep.checkpoint import objects
from torchkeep.storage.remote import RemoteStorage


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(256, 256)  # a 256 KiB weight: a shared object


def loads_as(folder: Path, expected: nn.Module) -> None:
    fresh = nn.Linear(256, 256)
    assert not torch.equal(fresh.weight, expected.weight)
    torchkeep.load_checkpoint(folder, model=fresh)
    assert_same_tensors(fresh.state_dict(), expected.state_dict())


def mentioned(run: Path) -> set[str]:
    """The object keys every folder of the run that holds a manifest mentions."""
    return set().union(*(objects.referenced_by_folder(p) for p in run.iterdir() if (p / "manifest.json").is_file()))


def test_a_manager_with_another_template_keeps_the_runs_objects(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first, second = model(1), model(2)
    with torchkeep.CheckpointManager(run, keep_last=3, incremental=True) as mgr:
        mgr.save(100, model=first)
        mgr.save(200, model=second)
    before = set(os.listdir(run / "objects"))
    assert len(before) == 2
    with torchkeep.CheckpointManager(run, template="ckpt-{step}", keep_last=1, incremental=True) as other:
        assert other.list() == []  # it sees none of the step folders...
        other.save(1, model=model(3))
        other.save(2, model=model(4))  # ...and its retention retires its own step 1
    assert before <= set(os.listdir(run / "objects"))  # ...but deletes none of their objects
    loads_as(run / "step-00000100", first)
    loads_as(run / "step-00000200", second)
    loads_as(run / "ckpt-2", model(4))
    assert set(os.listdir(run / "objects")) == mentioned(run)  # ckpt-1's own object went with it


def test_a_renamed_checkpoint_keeps_its_objects_through_a_resume_and_retention(tmp_path: Path) -> None:
    run = tmp_path / "run"
    best = model(2)
    with torchkeep.CheckpointManager(run, keep_last=3, incremental=True) as mgr:
        mgr.save(100, model=model(1))
        mgr.save(200, model=best)
    os.rename(run / "step-00000200", run / "best")
    loads_as(run / "best", best)
    with torchkeep.CheckpointManager(run, keep_last=1, incremental=True) as mgr:  # resume the run
        assert [c.step for c in mgr.list()] == [100]
        for step in (300, 400, 500):
            mgr.save(step, model=model(step))
        assert [c.step for c in mgr.list()] == [500]
    loads_as(run / "best", best)
    loads_as(run / "step-00000500", model(500))
    # nothing is orphaned either: the objects of the retired steps 100, 300 and 400 are gone
    assert set(os.listdir(run / "objects")) == mentioned(run)
    assert len(mentioned(run)) == 2


def test_a_manifest_that_no_longer_parses_keeps_what_it_names(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kept = model(1)
    with torchkeep.CheckpointManager(run, keep_last=1, incremental=True) as mgr:
        mgr.save(1, model=kept)
    os.rename(run / "step-00000001", run / "archive")
    manifest = run / "archive" / "manifest.json"
    intact = manifest.read_bytes()
    manifest.write_bytes(intact[:-40])  # truncated: the JSON no longer parses
    with pytest.raises(torchkeep.CorruptCheckpointError):
        loads_as(run / "archive", kept)
    with torchkeep.CheckpointManager(run, keep_last=1, incremental=True) as mgr:
        mgr.save(2, model=model(2))
        mgr.save(3, model=model(3))
    manifest.write_bytes(intact)  # repaired from a backup: its objects are still there
    loads_as(run / "archive", kept)


def test_the_temporary_folder_of_a_save_being_written_keeps_its_objects(tmp_path: Path) -> None:
    """A folder of another template's save, still under its temporary name (not this manager's to clean
    up), holding its manifest already: the objects it names are kept."""
    run = tmp_path / "run"
    weights = model(1)
    with torchkeep.CheckpointManager(run, template="ckpt-{step}", incremental=True) as mgr:
        mgr.save(7, model=weights)
    temporary = run / f".ckpt-8.tmp-{uuid.uuid4().hex[:12]}"
    shutil.copytree(run / "ckpt-7", temporary)  # what a writer of step 8 has written so far
    shutil.rmtree(run / "ckpt-7")
    with torchkeep.CheckpointManager(run, keep_last=1, incremental=True) as mgr:
        mgr.save(1, model=model(2))
        mgr.save(2, model=model(3))
    assert objects.referenced_by_folder(temporary) <= set(os.listdir(run / "objects"))
    os.rename(temporary, run / "ckpt-8")  # the writer commits
    loads_as(run / "ckpt-8", weights)


def test_a_run_at_a_url_keeps_the_objects_of_other_templates_and_renamed_steps(memory_url: str) -> None:
    first, second = model(1), model(2)
    with torchkeep.CheckpointManager(memory_url, keep_last=3, incremental=True) as mgr:
        mgr.save(100, model=first)
        mgr.save(200, model=second)
    run = RemoteStorage(memory_url)
    for name in [n for n in run.list() if n.startswith("step-00000200/")]:  # renamed by a person: "best"
        with run.open_read(name) as f, run.open_write("best/" + name.partition("/")[2]) as sink:
            sink.write(f.read())
        run.delete(name)
    with torchkeep.CheckpointManager(memory_url, template="ckpt-{step}", keep_last=1, incremental=True) as other:
        other.save(1, model=model(3))
        other.save(2, model=model(4))  # retention retires ckpt-1 and collects objects
    with torchkeep.CheckpointManager(memory_url, keep_last=1, incremental=True) as mgr:
        mgr.save(300, model=model(5))  # retires step 100: its object goes, best's stays
    for url, expected in ((f"{memory_url}/best", second), (f"{memory_url}/ckpt-2", model(4))):
        fresh = nn.Linear(256, 256)
        torchkeep.load_checkpoint(url, model=fresh)
        assert_same_tensors(fresh.state_dict(), expected.state_dict())
    stored = {n.partition("/")[2] for n in run.list() if n.startswith("objects/")}
    assert objects.key_of(first.weight.detach()) not in stored
    assert len(stored) == 3  # best's, ckpt-2's, step 300's
