"""Atomic writes: an interrupted or failed save never damages what was saved before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep.storage import LocalStorage, MemoryStorage
from torchkeep.storage.local import atomic_write


def test_exception_mid_write_leaves_old_file_and_no_debris(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as sink:
        sink.write(b"new but incomplete")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("storage_kind", ["local", "memory"])
def test_storage_contract(tmp_path: Path, storage_kind: str) -> None:
    storage = LocalStorage(tmp_path) if storage_kind == "local" else MemoryStorage()
    with storage.open_write("a/b.bin") as sink:
        sink.write(b"hello")
        assert not storage.exists("a/b.bin")  # not visible until committed
    assert storage.exists("a/b.bin") and storage.size("a/b.bin") == 5
    with storage.open_read("a/b.bin") as f:
        assert f.read() == b"hello"
    assert storage.list() == ["a/b.bin"]
    with pytest.raises(ValueError), storage.open_write("a/b.bin") as sink:
        sink.write(b"xx")
        raise ValueError
    with storage.open_read("a/b.bin") as f:
        assert f.read() == b"hello"
    storage.delete("a/b.bin")
    assert not storage.exists("a/b.bin")
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        storage.open_read("a/b.bin")


def test_local_storage_rejects_escaping_names(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="invalid storage name"):
            storage.open_write(bad)


def test_disk_full_keeps_the_previous_save(tmp_path: Path) -> None:
    """A child process whose file size limit is hit mid-save (EFBIG, as a full disk would)."""
    old = {"w": torch.arange(10.0)}
    path = tmp_path / "m.safetensors"
    torchkeep.save(old, path)
    script = textwrap.dedent(f"""
        import resource, signal, torch, torchkeep
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            torchkeep.save({{"w": torch.randn(1_000_000)}}, {str(path)!r})
        except OSError as exc:
            print("failed cleanly:", exc.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "failed cleanly" in done.stdout, done.stderr
    assert_same_tensors(old, torchkeep.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_sigkill_during_saves_never_leaves_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    script = textwrap.dedent(f"""
        import sys, torch, torchkeep
        print("imported", flush=True)
        i = 0
        while True:
            torchkeep.save({{"w": torch.full((2_000_000,), float(i)), "step": torch.tensor(i)}}, {str(path)!r})
            i += 1
    """)
    last_steps = []
    for delay in (0.3, 0.45, 0.6, 0.8, 1.0):
        with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            assert child.stdout.readline() == "imported\n"  # importing takes seconds when the cache is cold
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        if path.exists():
            state = torchkeep.load(path)  # verifies every checksum
            step = int(state["step"])
            assert torch.equal(state["w"], torch.full((2_000_000,), float(step)))
            last_steps.append(step)
    assert last_steps, "no save completed before the kills"


def test_sigkill_during_sharded_saves_never_mixes_two_saves(tmp_path: Path) -> None:
    """Shards of a save that replaces a sharded folder never overwrite a shard the live index names."""
    folder = tmp_path / "sharded"
    script = textwrap.dedent(f"""
        import sys, torch, torchkeep
        i = int(sys.argv[1])
        while True:
            state = {{f"w{{k}}": torch.full((1_000_000,), float(i)) for k in range(6)}}
            torchkeep.save(state, {str(folder)!r}, max_shard_size="8MB")
            print(i, flush=True)
            i += 1
    """)
    for run, pause in enumerate((0.0, 0.01, 0.03, 0.05)):
        start = 1000 * run
        with subprocess.Popen([sys.executable, "-c", script, str(start)], stdout=subprocess.PIPE, text=True) as child:
            assert child.stdout is not None
            for line in child.stdout:
                if int(line) >= start + 2:  # a few complete saves, then a kill in the middle of another
                    break
            time.sleep(pause)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        state = torchkeep.load(folder)  # the index and every shard it names, checksums verified
        values = {float(v) for t in state.values() for v in t.unique()}
        assert len(values) == 1, f"tensors from different saves after kill {run}: {sorted(values)}"
        assert values.pop() >= start + 2
