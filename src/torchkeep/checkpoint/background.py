"""Checkpoints written in the background: a snapshot of the state is taken while the caller waits, the
writing and committing happen on a worker thread.

The snapshot copies every tensor a plan refers to into staging buffers that are allocated once and reused
by the next save of the same shapes (so a training loop does not allocate a model's worth of memory per
save), and deep-copies the manifest, so training may go on changing the live tensors at once.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from torchkeep.checkpoint.layout import CheckpointPlan
from torchkeep.errors import TorchkeepError
from torchkeep.state.tensors import PreparedTensors

T = TypeVar("T")


class StagingBuffers:
    """Host copies of a plan's tensors, kept between saves; pinned when the source is on a GPU."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def snapshot(self, plan: CheckpointPlan) -> CheckpointPlan:
        """A plan that no longer shares memory with the live state (the copy the caller waits for)."""
        kept = self.stage(plan.tensors.tensors)
        return CheckpointPlan(copy.deepcopy(plan.manifest), PreparedTensors(kept, dict(plan.tensors.aliases)))

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` in this object's buffers (made or reused by name and shape); buffers of
        names not given are released."""
        kept: dict[str, torch.Tensor] = {}
        fresh = {
            name: tensor
            for name, tensor in tensors.items()
            if (old := self._buffers.get(name)) is None or old.shape != tensor.shape or old.dtype != tensor.dtype
        }
        kept.update(_pinned_views({n: t for n, t in fresh.items() if t.is_cuda}))
        kept.update({n: torch.empty(t.shape, dtype=t.dtype) for n, t in fresh.items() if not t.is_cuda})
        devices: set[torch.device] = set()
        for name, tensor in tensors.items():
            if name not in kept:
                kept[name] = self._buffers[name]  # the same name and shape as last time: reused
            buffer = kept[name]
            if tensor.is_cuda:
                devices.add(tensor.device)
            buffer.copy_(tensor, non_blocking=tensor.is_cuda)
        for device in devices:  # synchronize() alone waits for the current device only
            torch.cuda.synchronize(device)
        self._buffers = {name: kept[name] for name in tensors}
        return dict(self._buffers)


def _pinned_views(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host buffers for GPU tensors, carved from one pinned allocation: the pinned allocator rounds each
    allocation up to a power of two, which per tensor could lock almost twice the state's size."""
    align = 64
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    total = sum(-(-size // align) * align for size in sizes.values())
    if not total:
        return {n: torch.empty(t.shape, dtype=t.dtype) for n, t in tensors.items()}
    pool = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    out, offset = {}, 0
    for name, tensor in tensors.items():
        out[name] = pool[offset : offset + sizes[name]].view(tensor.dtype).view(tensor.shape)
        offset += -(-sizes[name] // align) * align
    return out


class PendingSave(Generic[T]):
    """A checkpoint being written in the background.

    ``wait()`` returns what the save returns when done (a :class:`~torchkeep.CheckpointInfo` for a
    manager) or raises the error that stopped it; ``done()`` says whether it finished. An error that
    nothing raised (no ``wait()``, no next save, no ``close()``) is written to stderr at interpreter exit.
    """

    def __init__(self, step: int | None, path: Path, future: Future[T]) -> None:
        self.step = step
        self.path = path
        self._future = future
        self._reported = False
        self._pid = os.getpid()

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Block until durable (or failed); raises the background error, once."""
        try:
            return self._future.result(timeout)
        except BaseException as exc:
            if self._future.done() and self._future.exception() is exc:  # not a timeout of this wait
                self._mark_reported()
            raise

    def join(self) -> None:
        """Wait until done, without raising or reporting its error."""
        self._future.exception()

    def unreported_error(self) -> BaseException | None:
        """Wait, then the error nobody has seen yet (the next save, ``wait()`` or ``close()`` raises it)."""
        error = self._future.exception()
        if error is None or self._reported:
            return None
        self._mark_reported()
        return error

    def _mark_reported(self) -> None:
        self._reported = True
        with _GUARD:
            _UNSEEN.pop(self, None)

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"PendingSave(step={self.step}, path={str(self.path)!r}, {state})"


# Background saves that may yet fail unseen, in the order they started; one that succeeds, or whose error
# is raised to someone, leaves. What is left at interpreter exit is written to stderr (_report_at_exit).
_UNSEEN: dict[PendingSave[Any], None] = {}
_GUARD = threading.Lock()
_HOOKED = False


def _watch(pending: PendingSave[Any]) -> None:
    global _HOOKED
    with _GUARD:
        _UNSEEN[pending] = None
        if not _HOOKED:
            # An atexit function runs after the interpreter has joined the worker threads (finishing the
            # saves in flight), before it tears modules down.
            atexit.register(_report_at_exit)
            _HOOKED = True

    def settled(future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            with _GUARD:
                _UNSEEN.pop(pending, None)

    pending._future.add_done_callback(settled)


def _report_at_exit() -> None:
    """Write each background save's error that nobody collected to stderr (warnings could be filtered away)."""
    with _GUARD:
        left = list(_UNSEEN)
    for pending in left:
        if pending._pid != os.getpid() or not pending.done():  # a forked child's copy; or still running
            continue
        error = pending.unreported_error()
        if error is not None:
            _to_stderr(_exit_message(pending, error))


def _exit_message(pending: PendingSave[Any], error: BaseException) -> str:
    step = f" (step {pending.step})" if pending.step is not None else ""
    if isinstance(error, TorchkeepError):
        detail = "".join(traceback.format_exception_only(type(error), error))
    else:  # not a failure torchkeep foresaw: the whole traceback
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (
        f"torchkeep: the background save of {pending.path}{step} failed, and the program ended without its "
        "error being raised (wait() on the handle or the manager, close(), or a next save raise it); "
        f"this checkpoint was not saved:\n{detail}"
    )


def _to_stderr(message: str) -> None:
    stream = sys.stderr if sys.stderr is not None else sys.__stderr__
    try:
        if stream is None:
            raise OSError("no stderr")
        stream.write(message if message.endswith("\n") else message + "\n")
        stream.flush()
    except (OSError, ValueError):  # closed or replaced by something that no longer works
        with contextlib.suppress(OSError):
            os.write(2, message.encode(errors="replace"))


class Writer:
    """One worker thread; at most one save in flight (the caller waits for the previous one first).

    The thread is not a daemon: at interpreter exit Python joins it, so a save in flight is finished; an
    error nobody raised is then written to stderr.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, step: int | None, path: Path, work: Callable[[], T]) -> PendingSave[T]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
            pending = PendingSave(step, path, self._executor.submit(work))
        _watch(pending)
        return pending

    def shutdown(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


_SHARED = Writer()


def submit(step: int | None, path: Path, work: Callable[[], T]) -> PendingSave[T]:
    """Run ``work`` on the shared background writer (``save_checkpoint(..., blocking=False)``)."""
    return _SHARED.submit(step, path, work)
