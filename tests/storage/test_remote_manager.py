"""CheckpointManager on a run at a URL: a real S3 server (moto's), and fsspec's memory filesystem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.cli.main import main
from torchkeep.storage.remote import RemoteStorage


def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()


def test_a_run_on_s3_saves_retires_and_resumes_bit_exactly(
    s3: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    url = "s3://torchkeep-bucket/runs/exp1"
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    mgr = torchkeep.CheckpointManager(url, keep_last=2, keep_best=1, monitor="loss", storage_options=s3)
    assert type(mgr).__name__ == "RemoteCheckpointManager"
    losses = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.8}
    for step, loss in losses.items():
        train(model, opt)
        info = mgr.save(step, metrics={"loss": loss}, model=model, optimizer=opt, epoch=step)
        assert info.is_latest and info.path == f"{url}/step-{step:08d}"
    weights_at_4 = {k: v.clone() for k, v in model.state_dict().items()}
    assert [i.step for i in mgr.list()] == [1, 3, 4]  # the last 2, and the best (step 1)
    assert mgr.best().step == 1  # type: ignore[union-attr]
    run = RemoteStorage(url, s3)
    assert run.open_read("latest").read() == b"step-00000004\n"
    assert not any(name.startswith("step-00000002/") for name in run.list())  # retired whole
    with pytest.raises(ValueError, match="not after the newest"):
        mgr.save(2, model=model)  # retired, and steps only go forward

    # Another manager is refused while the lock object exists; a read-only one lists and restores.
    with pytest.raises(torchkeep.CheckpointWriteError, match="writes this run"):
        torchkeep.CheckpointManager(url, storage_options=s3)
    reader = torchkeep.CheckpointManager(url, read_only=True, monitor="loss", storage_options=s3)
    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    state = reader.restore(model=fresh, optimizer=fresh_opt)
    assert state == {"epoch": 4, "step": 4}
    assert all(torch.equal(weights_at_4[k], v) for k, v in fresh.state_dict().items())
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert reader.restore("best", model=fresh)["step"] == 1

    # torchkeep verify / inspect on a step at the URL
    options = json.dumps(s3)
    assert main(["verify", f"{url}/step-00000004", "--storage-options", options]) == 0
    assert "OK, checkpoint with" in capsys.readouterr().out
    assert main(["inspect", f"{url}/step-00000004", "--storage-options", options]) == 0
    assert "objects: model, optimizer, rng" in capsys.readouterr().out

    # torchkeep ls on the URL
    assert main(["ls", url, "--monitor", "loss", "--storage-options", json.dumps(s3)]) == 0
    listing = capsys.readouterr().out
    assert "latest" in listing and "best" in listing and listing.count("\n4 ") + listing.count("\n1 ") == 2
    mgr.close()
    torchkeep.CheckpointManager(url, storage_options=s3).close()  # the lock was released


def test_uncommitted_and_damaged_steps_are_skipped(tmp_path: Path) -> None:
    import fsspec

    url = "memory://torchkeep-test/remote-manager"
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)
    model = nn.Linear(3, 2)
    with torchkeep.CheckpointManager(url) as mgr:
        mgr.save(1, model=model)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1)
        mgr.save(2, model=model)
    run = RemoteStorage(url)
    # a save cut short after its tensors: no manifest, so not a checkpoint
    with run.open_write("step-00000003/tensors-0123456789ab.safetensors") as sink:
        sink.write(b"partial")
    # step 2's tensors damaged: restore("latest") falls back to step 1, with a warning naming it
    name = next(n for n in run.list() if n.startswith("step-00000002/tensors-"))
    with run.open_read(name) as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF
    with run.open_write(name) as sink:
        sink.write(bytes(data))
    mgr = torchkeep.CheckpointManager(url)
    assert [i.step for i in mgr.list()] == [1, 2]
    assert not any(n.startswith("step-00000003/") for n in run.list())  # deleted under the lock
    fresh = nn.Linear(3, 2)
    with pytest.warns(torchkeep.TorchkeepWarning, match="skipped .*step-00000002"):
        assert mgr.restore(model=fresh)["step"] == 1
    assert all(torch.equal(expected[k], v) for k, v in fresh.state_dict().items())
    mgr.close()
    with pytest.raises(ValueError, match="storage_options are for runs at a URL"):
        torchkeep.CheckpointManager(tmp_path / "local", storage_options={"key": "x"})


def test_async_saves_to_a_url_keep_the_state_of_the_call() -> None:
    import fsspec

    url = "memory://torchkeep-test/remote-async"
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)
    model = nn.Linear(3, 2)
    with torchkeep.CheckpointManager(url, async_save=True, keep_last=1) as mgr:
        at_save = {k: v.clone() for k, v in model.state_dict().items()}
        pending = mgr.save(1, model=model, rng=False)
        assert isinstance(pending, torchkeep.PendingSave)
        with torch.no_grad():
            model.weight.add_(1)  # training goes on while the upload may be in flight
        info = pending.wait()
        assert info.step == 1 and info.is_latest
        first = nn.Linear(3, 2)
        mgr.restore(1, model=first)
        assert all(torch.equal(at_save[k], v) for k, v in first.state_dict().items())  # the state at save()
        mgr.save(2, model=model, rng=False)  # waits for nothing, retires step 1 in the background
        mgr.wait()
        assert [i.step for i in mgr.list()] == [2]
        fresh = nn.Linear(3, 2)
        mgr.restore(model=fresh)
        assert torch.equal(fresh.weight, model.weight) and not torch.equal(fresh.weight, at_save["weight"])
    reader = torchkeep.CheckpointManager(url, read_only=True)
    assert [i.step for i in reader.list()] == [2]


def test_incremental_runs_at_a_url_store_each_large_tensor_once(s3: dict[str, Any]) -> None:
    url = "s3://torchkeep-bucket/runs/incremental"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 2))  # 256 KiB frozen, a small head that trains
    model[0].requires_grad_(False)
    with torchkeep.CheckpointManager(url, incremental=True, keep_last=2, storage_options=s3) as mgr:
        for step in (1, 2, 3):
            with torch.no_grad():
                model[1].weight.add_(0.1)
            mgr.save(step, model=model, rng=False)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
    run = RemoteStorage(url, s3)
    stored = [n for n in run.list() if n.startswith("objects/")]
    assert len(stored) == 1  # the frozen weight, once (the biases are under 64 KiB: in each checkpoint's file)
    fresh = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 2))
    reader = torchkeep.CheckpointManager(url, read_only=True, storage_options=s3)
    assert reader.restore(model=fresh)["step"] == 3
    assert all(torch.equal(expected[k], v) for k, v in fresh.state_dict().items())
    # torchkeep.load of one step at the URL reads its objects too
    assert torch.equal(torchkeep.load(f"{url}/step-00000002", storage_options=s3)["0.weight"], expected["0.weight"])
    # retiring every step that uses an object deletes it
    with torchkeep.CheckpointManager(url, incremental=True, keep_last=1, storage_options=s3) as mgr:
        mgr.save(4, model=nn.Sequential(nn.Linear(2, 2)), rng=False)
    assert not [n for n in run.list() if n.startswith("objects/")]
