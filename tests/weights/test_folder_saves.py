"""Saving weights into a folder (one file, or shards and their index): a save interrupted at any point, a
folder removed during a save, and two processes saving into one folder at once never leave a folder that
does not load as one complete save."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep import _config
from torchkeep.storage.local import LocalStorage
from torchkeep.weights import save as weights_save


def state(seed: int, count: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(count)}


def test_killed_while_replacing_shards_by_one_file_leaves_a_loadable_folder(tmp_path: Path) -> None:
    """SIGKILL right after the first stale file is deleted: the old index goes first, so what is left is
    the new file alone, never an index that names deleted shards."""
    folder = tmp_path / "m"
    torchkeep.save(state(0), folder, max_shard_size=20_000)
    assert (folder / _config.INDEX_FILE_NAME).exists()
    script = textwrap.dedent(
        f"""
        import os, signal, torch, torchkeep
        from torchkeep.storage.local import LocalStorage
        original = LocalStorage.delete
        def delete_then_die(self, name):
            original(self, name)
            os.kill(os.getpid(), signal.SIGKILL)
        LocalStorage.delete = delete_then_die
        g = torch.Generator().manual_seed(1)
        torchkeep.save({{f"layer{{i}}.weight": torch.randn(64, 64, generator=g) for i in range(6)}}, {str(folder)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr.decode()
    assert not (folder / _config.INDEX_FILE_NAME).exists()
    assert_same_tensors(state(1), torchkeep.load(folder))


def test_a_folder_removed_during_a_sharded_save_fails_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    monkeypatch.setattr(_config, "IO_THREADS", 1)
    original = weights_save.write_weights
    written: list[str] = []

    def write_then_remove(storage: Any, name: str, *args: Any) -> int:
        size = original(storage, name, *args)
        written.append(name)
        if len(written) == 2:
            shutil.rmtree(folder)  # another program cleans up while the save runs
        return size

    monkeypatch.setattr(weights_save, "write_weights", write_then_remove)
    with pytest.raises(torchkeep.CheckpointWriteError, match="disappeared"):
        torchkeep.save(state(0), folder, max_shard_size=20_000)
    assert not folder.exists() or sorted(p.name for p in folder.iterdir()) == []


def test_two_processes_saving_shards_into_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    script = textwrap.dedent(
        f"""
        import sys, torch, torchkeep
        seed = int(sys.argv[1])
        for round in range(4):
            g = torch.Generator().manual_seed(seed)
            torchkeep.save({{f"layer{{i}}.weight": torch.randn(64, 64, generator=g) for i in range(6)}},
                           {str(folder)!r}, max_shard_size=20_000 if (round + seed) % 2 else None)
        """
    )
    runs = [subprocess.Popen([sys.executable, "-c", script, str(seed)], stderr=subprocess.PIPE) for seed in (1, 2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()
    loaded = torchkeep.load(folder)
    assert any(all(torch.equal(loaded[k], v) for k, v in state(seed).items()) for seed in (1, 2))
    listed = set(LocalStorage(folder).list())
    expected = {_config.SINGLE_FILE_NAME} if _config.SINGLE_FILE_NAME in listed else set()
    if not expected:  # sharded: the index and exactly the shards it names
        import json

        index = json.loads((folder / _config.INDEX_FILE_NAME).read_text())
        expected = {_config.INDEX_FILE_NAME, *index["weight_map"].values()}
    assert listed == expected


def test_storage_lists_one_level_and_deletes_what_is_gone(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for name in ("a.safetensors", "sub/b.safetensors", "sub/deeper/c.safetensors"):
        with storage.open_write(name) as sink:
            sink.write(b"x")
    assert storage.list() == ["a.safetensors", "sub/b.safetensors", "sub/deeper/c.safetensors"]
    assert storage.list(recursive=False) == ["a.safetensors"]
    assert storage.list("sub", recursive=False) == ["sub/b.safetensors"]
    storage.delete("a.safetensors")
    storage.delete("a.safetensors")  # already gone: another writer removed it
    assert storage.list(recursive=False) == []


def test_a_failure_after_the_index_is_in_place_keeps_the_shards_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index renamed into place commits the save; a failure after it (syncing the folder) must not delete
    the shards that index names (the folder then named missing shards and the old ones were unnamed)."""
    import errno

    from torchkeep.storage import local

    folder = tmp_path / "w"
    torchkeep.save(state(0), folder, max_shard_size=20_000)
    real = local.fsync_dir

    def failing(path: Any) -> None:
        index = Path(path) / _config.INDEX_FILE_NAME
        if index.exists() and "-r" in index.read_text():  # the new index (tagged shard names) is in place
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(local, "fsync_dir", failing)
    with pytest.raises(torchkeep.CheckpointWriteError, match="syncing"):
        torchkeep.save(state(1), folder, max_shard_size=20_000)
    monkeypatch.setattr(local, "fsync_dir", real)
    assert_same_tensors(state(1), torchkeep.load(folder))
