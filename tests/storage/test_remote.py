"""Weights at URLs through fsspec: fsspec's in-memory filesystem, and a real S3-compatible server (moto's)
started by the test, with credentials and the endpoint passed as storage_options."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors
from torchkeep.storage.remote import RemoteStorage


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a": torch.randn(64, 32), "b": torch.arange(10), "c": torch.randn(3).half()}


def test_round_trips_on_the_memory_filesystem(memory_url: str) -> None:
    tensors = state()
    torchkeep.save(tensors, f"{memory_url}/w.safetensors", metadata={"epoch": "3"})
    assert_same_tensors(tensors, torchkeep.load(f"{memory_url}/w.safetensors"))
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    torchkeep.save(model, f"{memory_url}/sharded", max_shard_size=10_000)
    names = RemoteStorage(f"{memory_url}/sharded").list()
    assert "model.safetensors.index.json" in names and len(names) > 2
    fresh = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    assert torchkeep.load_into(fresh, f"{memory_url}/sharded").ok
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_a_damaged_object_is_caught_by_its_checksums(memory_url: str) -> None:
    torchkeep.save(state(), f"{memory_url}/w.safetensors")
    storage = RemoteStorage(memory_url)
    with storage.open_read("w.safetensors") as f:
        data = bytearray(f.read())
    data[-2] ^= 0x40
    with storage.open_write("w.safetensors") as sink:
        sink.write(bytes(data))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="checksum mismatch"):
        torchkeep.load(f"{memory_url}/w.safetensors")
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        torchkeep.load(f"{memory_url}/absent.safetensors")
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="neither"):
        torchkeep.load(f"{memory_url}/no-such-folder")


def test_a_failed_write_publishes_nothing_and_keeps_the_old_object(memory_url: str) -> None:
    storage = RemoteStorage(memory_url)
    with storage.open_write("x.bin") as sink:
        sink.write(b"old")
    with pytest.raises(RuntimeError, match="interrupted"), storage.open_write("x.bin") as sink:
        sink.write(b"new, cut short")
        raise RuntimeError("interrupted")
    with storage.open_read("x.bin") as f:
        assert f.read() == b"old"
    with pytest.raises(ValueError, match=r"without '\.\.'"), storage.open_write("../escape"):
        pass
    assert storage.list() == ["x.bin"]  # no temporary left by the failed write


def test_save_and_load_on_s3(s3: dict[str, Any]) -> None:
    tensors = state()
    url = "s3://torchkeep-bucket/run1/w.safetensors"
    torchkeep.save(tensors, url, storage_options=s3)
    assert_same_tensors(tensors, torchkeep.load(url, storage_options=s3))

    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    torchkeep.save(model, "s3://torchkeep-bucket/run1/model", storage_options=s3, max_shard_size="40KB")
    fresh = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    report = torchkeep.load_into(fresh, "s3://torchkeep-bucket/run1/model", map_location="cpu", storage_options=s3)
    assert report.ok
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_s3_errors_are_typed(s3: dict[str, Any]) -> None:
    with pytest.raises(torchkeep.CheckpointWriteError):
        torchkeep.save(state(), "s3://no-such-bucket/w.safetensors", storage_options=s3)
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        torchkeep.load("s3://torchkeep-bucket/nothing/w.safetensors", storage_options=s3)


def test_inspect_and_verify_at_a_url(memory_url: str, s3: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from torchkeep.cli.main import main

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    torchkeep.save(model, f"{memory_url}/m", max_shard_size=10_000)
    info = torchkeep.inspect(f"{memory_url}/m")
    assert {t.name for t in info.tensors} == set(model.state_dict()) and "sharded" in info.format
    assert torchkeep.verify(f"{memory_url}/m") == 4

    url = "s3://torchkeep-bucket/cli/w.safetensors"
    torchkeep.save(state(), url, storage_options=s3)
    options = json.dumps(s3)
    assert main(["inspect", url, "--storage-options", options, "--json"]) == 0
    assert {t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]} == {"a", "b", "c"}
    assert main(["verify", url, "--storage-options", options]) == 0
    assert "OK, 3 tensors verified" in capsys.readouterr().out
    assert main(["verify", "s3://torchkeep-bucket/cli/none.safetensors", "--storage-options", options]) == 1
    assert "none.safetensors" in capsys.readouterr().err


def test_checkpoints_at_a_url_resume_and_commit_by_their_manifest(s3: dict[str, Any], memory_url: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
    for base, options in (("s3://torchkeep-bucket/ckpt", s3), (f"{memory_url}/ckpt", None)):
        torchkeep.save_checkpoint(base, model=model, optimizer=optimizer, epoch=3, storage_options=options)
        first = RemoteStorage(base, options).list()
        # Saved again: a new tensor file, the manifest replaced last, the old tensor file removed.
        torchkeep.save_checkpoint(base, model=model, optimizer=optimizer, epoch=4, storage_options=options)
        second = RemoteStorage(base, options).list()
        assert len(first) == len(second) == 2 and set(first) != set(second) and "manifest.json" in second
        restored = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        restored_opt = torch.optim.AdamW(restored.parameters(), lr=0.01)
        extra = torchkeep.load_checkpoint(
            base, model=restored, optimizer=restored_opt, rng=False, storage_options=options
        )
        assert extra["epoch"] == 4
        assert_same_tensors(restored.state_dict(), model.state_dict())
        assert torch.equal(
            restored_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
        )
    with pytest.raises(torchkeep.CheckpointNotFoundError, match="never committed"):
        torchkeep.load_checkpoint("s3://torchkeep-bucket/no-ckpt", model=model, storage_options=s3)


def test_large_objects_are_read_by_ranged_spans(memory_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchkeep.weights.remote as remote

    monkeypatch.setattr(remote, "WHOLE_OBJECT_BYTES", 0)  # every object counts as large here
    monkeypatch.setattr(remote, "FETCH_SPAN_BYTES", 3000)  # spans of a few tensors
    monkeypatch.setattr(remote, "FETCH_CONCURRENT", 2)
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(i * 37 + 1) for i in range(20)} | {
        "big": torch.randn(5000),
        "empty": torch.empty(0),
    }
    torchkeep.save(tensors, f"{memory_url}/w.safetensors")
    assert_same_tensors(tensors, torchkeep.load(f"{memory_url}/w.safetensors"))

    storage = RemoteStorage(memory_url)
    with storage.open_read("w.safetensors") as f:
        data = bytearray(f.read())
    data[-100] ^= 0x01  # inside the last tensor
    with storage.open_write("w.safetensors") as sink:
        sink.write(bytes(data))
    with pytest.raises(torchkeep.CorruptCheckpointError, match="checksum mismatch"):
        torchkeep.load(f"{memory_url}/w.safetensors")
