"""Incremental checkpoints: large tensors stored once by content; retention never deletes an object a kept
checkpoint uses, and leaves none that no checkpoint uses."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep.checkpoint import objects


def fine_tune(momentum: float = 0.9) -> tuple[nn.Module, torch.optim.Optimizer]:
    """90% of the weights frozen (a backbone), 10% trained (a head)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(*[nn.Linear(512, 512) for _ in range(9)])
    backbone.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(512, 512))
    return model, torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=momentum)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    optimizer.zero_grad()
    model(torch.randn(8, 512, generator=g)).square().mean().backward()
    optimizer.step()


def disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_ten_checkpoints_of_a_fine_tune_cost_little_more_than_one(tmp_path: Path) -> None:
    model, optimizer = fine_tune(momentum=0.0)  # no optimizer state: 90% of the checkpoint's bytes are frozen
    full = tmp_path / "full"
    torchkeep.save_checkpoint(full, model=model, optimizer=optimizer)
    one = disk(full)
    run = tmp_path / "run"
    written = []
    with torchkeep.CheckpointManager(run, incremental=True) as mgr:
        for step in range(1, 11):
            train(model, optimizer, step)
            before = disk(run) if run.exists() else 0
            mgr.save(step, model=model, optimizer=optimizer)
            written.append(disk(run) - before)
    assert disk(run) <= (1 + 0.1 * 9) * one * 1.05
    assert all(w <= 0.15 * one for w in written[1:]), [w / one for w in written]
    manifest = json.loads((run / "step-00000010" / "manifest.json").read_text())
    assert manifest["version"] == 2 and "0.0.weight" not in manifest["shared_tensors"]  # names are per object
    restored, restored_opt = fine_tune()
    torchkeep.load_checkpoint(run / "step-00000010", model=restored, optimizer=restored_opt)
    assert_same_tensors(restored.state_dict(), model.state_dict())


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.sets(st.integers(0, 3), max_size=4), st.booleans()), min_size=1, max_size=10),
    st.integers(1, 3),
)
def test_retention_never_deletes_an_object_a_kept_checkpoint_uses(
    tmp_path_factory: pytest.TempPathFactory, saves: list[tuple[set[int], bool]], keep: int
) -> None:
    run = tmp_path_factory.mktemp("run")
    tensors = {f"t{i}": torch.full((64, 512), float(i)) for i in range(4)}  # 128 KiB each: shared objects
    expected: dict[int, dict[str, torch.Tensor]] = {}
    with torchkeep.CheckpointManager(run, keep_last=keep, incremental=True, async_save=False) as mgr:
        for step, (changed, reopen) in enumerate(saves, start=1):
            for i in changed:
                tensors[f"t{i}"] = tensors[f"t{i}"] + step  # a new value: a new object
            mgr.save(step, **{k: v.clone() for k, v in tensors.items()})
            expected[step] = {k: v.clone() for k, v in tensors.items()}
            kept = [c.step for c in mgr.list()]
            for s in kept:
                state = torchkeep.load_checkpoint(run / f"step-{s:08d}")
                assert_same_tensors({k: state[k] for k in tensors}, expected[s])
            used = set().union(*(objects.referenced_by_folder(run / f"step-{s:08d}") for s in kept))
            assert set(os.listdir(run / "objects")) == used  # nothing missing, nothing orphaned
            if reopen:  # a new manager rebuilds the same view from the disk
                mgr.close()
                mgr = torchkeep.CheckpointManager(run, keep_last=keep, incremental=True)
        mgr.close()


KILLED = textwrap.dedent("""
    import os, signal, sys, torch, torchkeep
    mgr = torchkeep.CheckpointManager(sys.argv[1], keep_last=1, incremental=True)
    base = torch.ones(1 << 20)
    mgr.save(1, base=base, head=torch.zeros(1 << 16))
    mgr.close()
    mgr = torchkeep.CheckpointManager(sys.argv[1], keep_last=1, incremental=True, async_save=True)
    mgr.save(2, base=base, head=torch.ones(1 << 16), big=torch.randn(64 << 20))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_save_leaves_no_orphans_after_the_next_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", KILLED, str(run)], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    with torchkeep.CheckpointManager(run, keep_last=1, incremental=True) as mgr:
        assert [c.step for c in mgr.list()] == [1]
        used = objects.referenced_by_folder(run / "step-00000001")
        assert set(os.listdir(run / "objects")) == used
        state = torchkeep.load_checkpoint(run / "step-00000001")
        assert torch.equal(state["base"], torch.ones(1 << 20))


def test_a_damaged_or_missing_object_is_found(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run, incremental=True) as mgr:
        mgr.save(1, w=torch.randn(256, 256))
    key = next(iter(objects.referenced_by_folder(run / "step-00000001")))
    path = run / "objects" / key
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="checksum mismatch"):
        torchkeep.load_checkpoint(run / "step-00000001")
    path.unlink()
    with pytest.raises(torchkeep.CorruptCheckpointError, match="missing"):
        torchkeep.load_checkpoint(run / "step-00000001")


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "0123456789abcdef-7", "ZZ23456789abcdef-16"])
def test_a_manifest_cannot_name_anything_but_an_object_key(tmp_path: Path, key: str) -> None:
    from tests.checkpoint.test_hostile_manifests import rewrite_manifest

    run = tmp_path / "run"
    with torchkeep.CheckpointManager(run, incremental=True) as mgr:
        mgr.save(1, w=torch.randn(256, 256))
    folder = run / "step-00000001"
    rewrite_manifest(folder, lambda body: body["shared_tensors"]["w"].update(object=key))
    with pytest.raises(torchkeep.CorruptCheckpointError):
        torchkeep.load_checkpoint(folder)


def test_async_and_incremental_resume_bit_exactly(tmp_path: Path) -> None:
    model, optimizer = fine_tune()
    with torchkeep.CheckpointManager(tmp_path / "run", keep_last=2, incremental=True, async_save=True) as mgr:
        for step in range(1, 7):
            train(model, optimizer, step)
            if step % 2 == 0:
                mgr.save(step, model=model, optimizer=optimizer)
            if step == 4:
                reference = fine_tune()
                reference[0].load_state_dict(model.state_dict())
                reference[1].load_state_dict(copy.deepcopy(optimizer.state_dict()))  # not sharing buffers
    restored, restored_opt = fine_tune()
    torchkeep.CheckpointManager(tmp_path / "run", read_only=True).restore(4, model=restored, optimizer=restored_opt)
    for step in (5, 6):
        train(restored, restored_opt, step)
        train(reference[0], reference[1], step)
    assert_same_tensors(restored.state_dict(), reference[0].state_dict())
    assert_same_tensors(restored.state_dict(), model.state_dict())


def test_objects_of_gpu_tensors_pass_through_the_staging_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run here on host tensors taken as GPU ones: each object is hashed and written piece by piece, never
    brought to the host whole, and the run holds the same objects, byte for byte, as the host path writes."""
    from torchkeep import _config
    from torchkeep.format import staging

    model, optimizer = fine_tune()
    train(model, optimizer, 1)
    with torchkeep.CheckpointManager(tmp_path / "host", incremental=True) as mgr:
        mgr.save(1, model=model, optimizer=optimizer)
    monkeypatch.setattr(_config, "STAGING_PIECE_BYTES", 64 * 1024)
    monkeypatch.setattr(objects, "is_staged", lambda tensor: True)
    monkeypatch.setattr(staging, "is_staged", lambda tensor: True)
    hashed: list[int] = []  # every staged piece (the checkpoint's own small tensors too)
    written: list[int] = []  # the pieces written into objects
    original = staging.host_pieces

    def counting(into: list[int]) -> Callable[[list[torch.Tensor]], Iterator[tuple[int, memoryview]]]:
        def counted(tensors: list[torch.Tensor]) -> Iterator[tuple[int, memoryview]]:
            for index, view in original(tensors):
                assert view.nbytes <= 64 * 1024
                into.append(view.nbytes)
                yield index, view

        return counted

    monkeypatch.setattr(staging, "host_pieces", counting(hashed))
    monkeypatch.setattr(objects, "host_pieces", counting(written))
    with torchkeep.CheckpointManager(tmp_path / "staged", incremental=True) as mgr:
        mgr.save(1, model=model, optimizer=optimizer)
    host, staged = tmp_path / "host" / objects.OBJECTS_DIR, tmp_path / "staged" / objects.OBJECTS_DIR
    names = sorted(p.name for p in host.iterdir())
    assert names and names == sorted(p.name for p in staged.iterdir())
    for name in names:
        assert (staged / name).read_bytes() == (host / name).read_bytes(), name
    object_bytes = sum(int(name.rsplit("-", 1)[1]) for name in names)
    assert sum(written) == object_bytes and len(written) > len(names)  # in pieces, each object once
    assert sum(hashed) >= object_bytes  # hashed through the buffers too, not brought to the host whole
    restored, restored_opt = fine_tune()
    torchkeep.load_checkpoint(tmp_path / "staged" / "step-00000001", model=restored, optimizer=restored_opt)
    assert_same_tensors(restored.state_dict(), model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_incremental_checkpoints_resume(tmp_path: Path) -> None:
    model, optimizer = fine_tune()
    model.cuda()
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9)
    with torchkeep.CheckpointManager(tmp_path, incremental=True) as mgr:
        for step in (1, 2):
            g = torch.Generator().manual_seed(step)
            optimizer.zero_grad()
            model(torch.randn(8, 512, generator=g).cuda()).square().mean().backward()
            optimizer.step()
            mgr.save(step, model=model, optimizer=optimizer)
    restored, restored_opt = fine_tune()
    restored.cuda()
    restored_opt = torch.optim.SGD(restored[1].parameters(), lr=0.1, momentum=0.9)
    torchkeep.load_checkpoint(tmp_path / "step-00000002", model=restored, optimizer=restored_opt)
    assert_same_tensors(restored.state_dict(), model.state_dict())
    assert all(t.is_cuda for t in restored.state_dict().values())
