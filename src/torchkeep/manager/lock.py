"""The run directory lock: one writing process per directory, one writing manager per directory in a process.

Across processes, an exclusive ``flock`` on ``.torchkeep.lock`` (the kernel drops it when the
process dies, so a crash never leaves a stale lock); the file names its holder (pid, host, time)
for the message another process gets. Within a process, a second manager on the same directory
takes the lock over (a notebook cell run again): the first one's :class:`Lease` is revoked, and
it says so if it tries to write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from torchkeep.errors import CheckpointWriteError
from torchkeep.storage.local import reason

LOCK_FILE = ".torchkeep.lock"


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


@dataclass(eq=False)
class Lease:
    """One manager's right to write ``directory``; ``key`` is the lock file's (device, inode)."""

    directory: Path
    key: tuple[int, int]
    revoked_at: float | None = None
    released: bool = False

    def check(self) -> None:
        """Raise CheckpointWriteError unless this manager may write now."""
        if self.revoked_at is not None:
            raise CheckpointWriteError(
                self.directory,
                f"another CheckpointManager for {self.directory} in this process took over at "
                f"{_clock(self.revoked_at)[-8:]}; this one can no longer write (list and restore still work). "
                "Save through the newer manager",
            )
        if self.released:
            raise CheckpointWriteError(self.directory, "this CheckpointManager was closed; create a new one to save")
        try:
            st = os.stat(self.directory / LOCK_FILE)
            same = (st.st_dev, st.st_ino) == self.key
        except OSError:
            same = False
        if not same:
            # Writing on would recreate the folder without the lock another process relies on.
            raise CheckpointWriteError(
                self.directory,
                "was removed or replaced while this manager held it (its lock file is gone); "
                "nothing was written. Create a new CheckpointManager to start afresh",
            )


@dataclass(eq=False)
class _Held:
    fd: int
    pid: int
    lease: Lease


# Lock files this process holds, by (device, inode): an open descriptor keeps its inode from
# being reused, so the key cannot come to mean another file. Reentrant: a manager collected by
# the cyclic GC inside the critical section releases from the same thread.
_HELD: dict[tuple[int, int], _Held] = {}
_GUARD = threading.RLock()


def acquire(directory: Path) -> Lease:
    """Take ``directory`` for writing, from another manager of this process if it holds it.

    Raises:
        CheckpointWriteError: another process holds it (the message names it), or the lock file
            cannot be opened (a read-only directory).
    """
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointWriteError(
            path, f"cannot open the lock file: {reason(exc)}; to list and restore only, pass read_only=True", cause=exc
        ) from exc
    try:
        stat = os.fstat(fd)
        key = (stat.st_dev, stat.st_ino)
        with _GUARD:
            held = _HELD.get(key)
            # A forked child inherits the table and the descriptor; it must not think it holds the lock.
            if held is not None and held.pid == os.getpid():
                lease = Lease(directory, key)
                held.lease.revoked_at = time.time()
                held.lease = lease
                if _HELD.get(key) is held:  # else a collected manager released it meanwhile: take it anew
                    os.close(fd)
                    return lease
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CheckpointWriteError(
                    directory,
                    f"another process ({_holder(fd)}) is writing checkpoints here; stop it, use another "
                    "directory, or pass read_only=True to list and restore",
                ) from None
            _write_holder(fd)
            lease = Lease(directory, key)
            _HELD[key] = _Held(fd, os.getpid(), lease)
            return lease
    except BaseException:
        with _GUARD:
            if not any(h.fd == fd for h in _HELD.values()):
                os.close(fd)
        raise


def release(lease: Lease) -> None:
    """Give the lock up if ``lease`` is the one holding it; a revoked lease releases nothing."""
    lease.released = True
    with _GUARD:
        held = _HELD.get(lease.key)
        if held is None or held.lease is not lease or held.pid != os.getpid():
            return
        del _HELD[lease.key]
        os.close(held.fd)  # closing the only descriptor of this open file drops the flock


def _write_holder(fd: int) -> None:
    # Informational only (the flock is the lock): a full disk must not stop the run here.
    note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode() + b"\n", 0)


def _holder(fd: int) -> str:
    """``pid 1234 on host, started at 2025-01-31 12:00:00``, from the lock file the holder wrote."""
    try:
        note = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(note['pid'])} on {note['host']}, started at {_clock(float(note['started']))}"
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError):  # a note of any shape
        return "it did not write which one; a torchkeep older than this one, or it is starting up"
