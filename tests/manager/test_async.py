"""Background saves: the caller gets the state's snapshot taken and goes on; latest, best and retention move only
once the checkpoint is durable and read back; errors surface later; a SIGKILL loses only the step in flight."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkeep
from tests.conftest import assert_same_tensors


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def step_once(model: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> float:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 2, (16,), generator=g)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def wait_for(condition: object, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_the_snapshot_is_the_state_at_save_time_and_resume_is_bit_exact(tmp_path: Path) -> None:
    model, optimizer = make()
    losses = []
    with torchkeep.CheckpointManager(tmp_path / "run", keep_last=2, async_save=True) as mgr:
        for i in range(1, 11):
            losses.append(step_once(model, optimizer, i))
            if i % 5 == 0:
                pending = mgr.save(i, model=model, optimizer=optimizer, losses=list(losses))
                assert isinstance(pending, torchkeep.PendingSave) and pending.step == i
                if i == 5:
                    at_five = {k: v.clone() for k, v in model.state_dict().items()}
        # Training went on while step 5 was written: its file still holds step 5's weights.
    saved = torchkeep.load(tmp_path / "run" / "step-00000005" / "tensors.safetensors")
    assert_same_tensors({k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}, at_five)

    fresh, fresh_opt = make(seed=1)
    state = torchkeep.CheckpointManager(tmp_path / "run", read_only=True).restore(5, model=fresh, optimizer=fresh_opt)
    replayed = state["losses"] + [step_once(fresh, fresh_opt, i) for i in range(6, 11)]
    assert replayed == losses
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_latest_moves_only_after_the_checkpoint_is_durable_and_read_back(tmp_path: Path) -> None:
    model, optimizer = make()
    mgr = torchkeep.CheckpointManager(tmp_path / "run", async_save=True)
    first = mgr.save(1, model=model, optimizer=optimizer)
    assert isinstance(first, torchkeep.PendingSave)
    assert first.wait().step == 1
    with mgr._mutex:  # the worker commits under this lock: hold it to catch the moment before latest moves
        pending = mgr.save(2, model=model, optimizer=optimizer)
        assert isinstance(pending, torchkeep.PendingSave)
        wait_for(lambda: (tmp_path / "run" / "step-00000002").is_dir())  # written and renamed into place
        assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000001"
        assert not pending.done()
    info = pending.wait()
    assert info.step == 2 and info.is_latest
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000002"
    mgr.close()


def test_a_background_failure_is_raised_by_the_next_save_and_changes_nothing(tmp_path: Path) -> None:
    model, optimizer = make()
    mgr = torchkeep.CheckpointManager(tmp_path / "run", async_save=True)
    mgr.save(1, model=model)
    mgr.wait()
    with mgr._mutex:
        mgr.save(2, model=model, optimizer=optimizer)
        folder = tmp_path / "run" / "step-00000002"
        wait_for(folder.is_dir)
        (folder / "tensors.safetensors").write_bytes(b"cut short")  # the read-back must catch it
    with pytest.raises(torchkeep.CheckpointWriteError, match="does not read back"):
        mgr.save(3, model=model)
    assert [c.step for c in mgr.list()] == [1]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000001"
    mgr.save(3, model=model)
    mgr.close()  # waits; step 3 is then the latest
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000003"


def test_close_raises_an_error_nobody_saw_and_the_handle_reports_it_once(tmp_path: Path) -> None:
    model, _ = make()
    mgr = torchkeep.CheckpointManager(tmp_path / "run", async_save=True)
    with mgr._mutex:
        pending = mgr.save(1, model=model)
        assert isinstance(pending, torchkeep.PendingSave)
        wait_for((tmp_path / "run" / "step-00000001").is_dir)
        (tmp_path / "run" / "step-00000001" / "manifest.json").write_text("{}")
    with pytest.raises(torchkeep.CheckpointWriteError):
        pending.wait()
    mgr.close()  # the error was seen through the handle: not raised twice

    mgr = torchkeep.CheckpointManager(tmp_path / "run2", async_save=True)
    with mgr._mutex:
        mgr.save(1, model=model)
        wait_for((tmp_path / "run2" / "step-00000001").is_dir)
        (tmp_path / "run2" / "step-00000001" / "manifest.json").write_text("{}")
    with pytest.raises(torchkeep.CheckpointWriteError):
        mgr.close()
    # close() released the lock all the same: another process may write here now.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torchkeep; torchkeep.CheckpointManager(sys.argv[1]).close()",
            str(tmp_path / "run2"),
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode == 0, other.stderr


def test_one_save_in_flight_the_next_waits_for_it(tmp_path: Path) -> None:
    model, optimizer = make()
    with torchkeep.CheckpointManager(tmp_path / "run", async_save=True) as mgr:
        first = mgr.save(1, model=model, optimizer=optimizer)
        second = mgr.save(2, model=model, optimizer=optimizer)
        assert isinstance(first, torchkeep.PendingSave) and isinstance(second, torchkeep.PendingSave)
        assert first.done()  # the second save returned only after the first was committed
        assert [c.step for c in mgr.list()] in ([1], [1, 2])
    assert [c.step for c in torchkeep.CheckpointManager(tmp_path / "run", read_only=True).list()] == [1, 2]


CHILD = textwrap.dedent("""
    import os, signal, sys, torch, torchkeep
    mode = sys.argv[2]
    mgr = torchkeep.CheckpointManager(sys.argv[1], async_save=True)
    mgr.save(1, big=torch.zeros(1000))
    mgr.wait()
    big = torch.randn(64 << 20)   # 256 MiB: the write takes a while
    mgr.save(2, big=big)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # mode == "exit": leave without close(); the interpreter finishes the save in flight
""")


def test_sigkill_during_a_background_write_loses_only_that_step(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "run"), "kill"], capture_output=True)
    assert done.returncode == -signal.SIGKILL
    mgr = torchkeep.CheckpointManager(tmp_path / "run")  # cleans what the killed save left
    assert [c.step for c in mgr.list()] == [1]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000001"
    assert sorted(os.listdir(tmp_path / "run")) == [".torchkeep.lock", "latest", "step-00000001"]
    assert torchkeep.load(tmp_path / "run" / "step-00000001" / "tensors.safetensors")["big"].numel() == 1000
    mgr.close()


def test_interpreter_exit_finishes_the_save_in_flight(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "run"), "exit"], capture_output=True)
    assert done.returncode == 0, done.stderr
    mgr = torchkeep.CheckpointManager(tmp_path / "run", read_only=True)
    assert [c.step for c in mgr.list()] == [1, 2]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000002"
    assert torchkeep.verify(tmp_path / "run" / "step-00000002" / "tensors.safetensors") is not None


def test_save_checkpoint_without_blocking(tmp_path: Path) -> None:
    model, optimizer = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = torchkeep.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, epoch=3, blocking=False)
    assert handle is not None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # changed at once: the checkpoint still holds the values at the call
    assert handle.wait() > 0
    restored, _ = make(seed=5)
    assert torchkeep.load_checkpoint(tmp_path / "ckpt", model=restored)["epoch"] == 3
    assert_same_tensors(restored.state_dict(), before)
    assert torchkeep.save_checkpoint(tmp_path / "ckpt2", model=model) is None  # blocking by default


PREEMPTED = textwrap.dedent("""
    import sys, time, torch, torchkeep
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.zero_()  # weight == step after each step
    mgr = torchkeep.CheckpointManager(sys.argv[1], async_save=True, keep_last=2)
    step = 0
    mgr.save_on_signal(lambda: dict(step=step, model=model, seen=step))
    while True:
        step += 1
        with torch.no_grad():
            model.weight.add_(1.0)
        if step % 10 == 0:
            mgr.save(step, model=model, seen=step)
        print(step, flush=True)
        time.sleep(0.002)
""")


def test_sigterm_saves_a_final_checkpoint_then_ends_the_process(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PREEMPTED, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if int(line) >= 25:
                break
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGTERM  # the default action still ends it
    mgr = torchkeep.CheckpointManager(tmp_path / "run", read_only=True)
    latest = mgr.latest()
    assert latest is not None and latest.step >= 25  # saved at the signal, not only at the last multiple of 10
    model = nn.Linear(4, 4)
    state = mgr.restore(model=model, rng=False)
    assert state["seen"] == latest.step
    assert torch.equal(model.weight.detach(), torch.full((4, 4), float(latest.step)))  # the state of that step


def test_a_python_handler_installed_before_still_runs(tmp_path: Path) -> None:
    called = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: called.append(signum))
    try:
        mgr = torchkeep.CheckpointManager(tmp_path / "run", async_save=True)
        model = nn.Linear(2, 2)
        uninstall = mgr.save_on_signal(lambda: {"step": 7, "model": model})
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary of this thread
        assert called == [signal.SIGUSR1]
        assert [c.step for c in mgr.list()] == [7]
        uninstall()
        mgr.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_gpu_snapshots_share_one_pinned_allocation_carved_without_overlap() -> None:
    """The carving used for GPU tensors' host buffers, run with host tensors (no pinning without CUDA)."""
    from torchkeep.checkpoint.background import _pinned_views

    torch.manual_seed(0)
    sources = {
        "w": torch.randn(33, 7),
        "half": torch.randn(5).half(),
        "mask": torch.rand(3) > 0.5,
        "empty": torch.empty(0, 4),
        "ids": torch.arange(9),
    }
    views = _pinned_views(sources)
    storages = {v.untyped_storage().data_ptr() for v in views.values() if v.numel()}
    assert len(storages) == 1  # one allocation
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views.values() if v.numel())
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert all(start % 64 == spans[0][0] % 64 for start, _ in spans)
    for name, view in views.items():
        view.copy_(sources[name])
    for name, view in views.items():
        assert view.shape == sources[name].shape and view.dtype == sources[name].dtype
        assert torch.equal(view, sources[name])
