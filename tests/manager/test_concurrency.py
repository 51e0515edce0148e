"""Threads sharing one manager, managers sharing one directory, processes refused with a name."""

from __future__ import annotations

import fcntl
import gc
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import torchkeep
from torchkeep import CheckpointManager

ROOT = Path(__file__).parents[2]


def other_process_may_write(directory: Path) -> bool:
    script = "import sys, torchkeep; torchkeep.CheckpointManager(sys.argv[1]).close()"
    done = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert done.returncode == 0 or "CheckpointWriteError" in done.stderr, done.stderr
    return done.returncode == 0


def lock_is_free(directory: Path) -> bool:
    """Whether a new open of the lock file can take the flock: no open file in this process holds it."""
    fd = os.open(directory / ".torchkeep.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_threads_sharing_a_manager_never_corrupt_its_state(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_every=8)
    start = threading.Barrier(5)
    outcomes: dict[int, str] = {}
    errors: list[BaseException] = []

    def saver(offset: int) -> None:
        start.wait()
        for k in range(8):
            step = 1 + offset + 4 * k
            try:
                mgr.save(step, rng=False, w=torch.full((5000,), float(step)))
                outcomes[step] = "saved"
            except ValueError as exc:  # another thread saved a later step first: refused cleanly
                outcomes[step] = "refused" if "not after the newest" in str(exc) else repr(exc)
            except BaseException as exc:
                errors.append(exc)

    def reader() -> None:
        start.wait()
        try:
            for _ in range(200):
                listed = mgr.list()
                assert [i.step for i in listed] == sorted(i.step for i in listed)
                assert sum(i.is_latest for i in listed) == (1 if listed else 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=saver, args=(i,)) for i in range(4)] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert set(outcomes.values()) <= {"saved", "refused"} and len(outcomes) == 32
    saved = sorted(step for step, outcome in outcomes.items() if outcome == "saved")
    mgr.wait()
    listed = [i.step for i in mgr.list()]
    assert listed == [i.step for i in CheckpointManager(tmp_path, read_only=True).list()]
    assert listed[-2:] == saved[-2:] and set(listed) == set(saved[-2:]) | {s for s in saved if s % 8 == 0}
    assert (tmp_path / "latest").read_text() == f"step-{saved[-1]:08d}\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    for step in listed:
        assert torch.equal(mgr.restore(step, rng=False)["w"], torch.full((5000,), float(step)))
    mgr.close()


def test_a_second_manager_in_this_process_takes_over(tmp_path: Path) -> None:
    old = CheckpointManager(tmp_path, keep_last=1)
    old.save(1, rng=False, tag="old")
    new = CheckpointManager(tmp_path, keep_last=1)
    assert [i.step for i in new.list()] == [1]
    new.save(2, rng=False, tag="new")
    took_over = r"another CheckpointManager for .* in this process took over at \d\d:\d\d:\d\d"
    with pytest.raises(torchkeep.CheckpointWriteError, match=took_over):
        old.save(3, rng=False)
    assert not (tmp_path / "step-00000003").exists()
    assert old.restore(rng=False)["tag"] == "new"  # reading is still fine
    old.close()  # the old one's close leaves the new one's lock alone
    assert not lock_is_free(tmp_path)
    assert not other_process_may_write(tmp_path)
    new.save(3, rng=False)
    new.close()
    assert lock_is_free(tmp_path)
    assert other_process_may_write(tmp_path)


def test_rerunning_a_notebook_cell_takes_over_and_the_collected_old_manager_releases_nothing(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    mgr.save(1, rng=False)
    # The cell is run again: the new manager is made while the old one is alive, then the name is rebound.
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    gc.collect()
    mgr.save(2, rng=False)
    assert not lock_is_free(tmp_path / "run")
    del mgr
    gc.collect()
    assert lock_is_free(tmp_path / "run")


def test_the_same_directory_under_another_name_is_the_same_directory(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    first = CheckpointManager(tmp_path / "run")
    second = CheckpointManager(tmp_path / "alias")
    with pytest.raises(torchkeep.CheckpointWriteError, match="took over"):
        first.save(1, rng=False)
    second.save(1, rng=False)
    first.close()
    second.close()


def test_another_process_is_refused_with_its_pid_host_and_start(tmp_path: Path) -> None:
    script = "import sys, torchkeep; m = torchkeep.CheckpointManager(sys.argv[1]); print('ready', flush=True); input()"
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(torchkeep.CheckpointWriteError) as caught:
            CheckpointManager(tmp_path)
        message = str(caught.value)
        assert f"pid {child.pid} on {socket.gethostname()}" in message
        assert "another process" in message and "started" in message and "read_only=True" in message
        assert CheckpointManager(tmp_path, read_only=True).list() == []  # readers are welcome
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=60)
        child.stdout.close()
    with CheckpointManager(tmp_path) as mgr:  # the child is gone: its lock went with it
        mgr.save(1, rng=False)


class Recording(CheckpointManager):
    """Records the thread each close() runs on."""

    closed_on: ClassVar[list[str]] = []

    def close(self) -> None:
        Recording.closed_on.append(threading.current_thread().name)
        super().close()


def test_dropped_while_its_deleter_runs_the_lock_is_released(tmp_path: Path) -> None:
    # The reported leak: the retention thread held the last reference, so the manager was
    # finalised on that thread, whose close() tried to join itself and never released the lock.
    with CheckpointManager(tmp_path) as filler:
        for step in range(1, 101):
            filler.save(step, rng=False)
    Recording.closed_on = []
    mgr = Recording(tmp_path, keep_last=1)
    mgr.save(101, rng=False)  # 100 checkpoints to delete, in the background
    deleter = next((t for t in threading.enumerate() if t.name == "torchkeep-retention"), None)
    del mgr
    if deleter is not None:
        deleter.join()
    assert len(Recording.closed_on) == 1
    assert lock_is_free(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-00000101"]


def test_collected_on_its_own_deleter_thread_the_lock_is_released(tmp_path: Path) -> None:
    # A manager in a reference cycle is freed by the cyclic GC, on whichever thread allocates when
    # it runs. With everything older frozen (so full collections are not throttled) and the
    # thresholds at 1, that is the retention thread, deleting old checkpoints while we wait.
    with CheckpointManager(tmp_path) as filler:
        for step in range(1, 101):
            filler.save(step, rng=False)
    Recording.closed_on = []
    old_thresholds = gc.get_threshold()
    gc.freeze()
    gc.collect()  # gen2 is now empty: a full collection is no longer held back by its size
    try:
        mgr = Recording(tmp_path, keep_last=1)
        mgr.cycle = mgr  # type: ignore[attr-defined]
        gc.set_threshold(1, 1, 1)
        mgr.save(101, rng=False)  # 100 checkpoints to delete, in the background
        deleter = next((t for t in threading.enumerate() if t.name == "torchkeep-retention"), None)
        del mgr
        if deleter is not None:
            deleter.join()
    finally:
        gc.set_threshold(*old_thresholds)
        gc.unfreeze()
    gc.collect()
    assert Recording.closed_on == ["torchkeep-retention"]
    assert lock_is_free(tmp_path)
    CheckpointManager(tmp_path).wait()  # anything the thread left is removed at the next start
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", ".step-"))] == ["step-00000101"]


def test_a_lock_note_of_any_shape_is_no_crash(tmp_path: Path) -> None:
    """The holder's note is read to name it; one nested too deep for json is just not shown."""
    from torchkeep.manager.lock import LOCK_FILE

    script = (
        "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); f.write('[' * 4000); "
        "f.flush(); print('ready', flush=True); input()"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / LOCK_FILE)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(torchkeep.CheckpointWriteError, match="did not write which one"):
            CheckpointManager(tmp_path)
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()
