"""Checkpoints written in the background: a snapshot of the state is taken while the caller waits, the
writing and committing happen on a worker thread.

The snapshot copies every tensor a plan refers to into staging buffers that are allocated once and reused
by the next save of the same shapes (so a training loop does not allocate a model's worth of memory per
save), and deep-copies the manifest, so training may go on changing the live tensors at once.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

import torch

from torchkeep.checkpoint.layout import CheckpointPlan
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
    manager) or raises the error that stopped it; ``done()`` says whether it finished.
    """

    def __init__(self, step: int | None, path: Path, future: Future[T]) -> None:
        self.step = step
        self.path = path
        self._future = future
        self._reported = False

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Block until durable (or failed); raises the background error, once."""
        try:
            return self._future.result(timeout)
        except BaseException:
            self._reported = True
            raise

    def join(self) -> None:
        """Wait until done, without raising or reporting its error."""
        self._future.exception()

    def unreported_error(self) -> BaseException | None:
        """Wait, then the error nobody has seen yet (the next save, ``wait()`` or ``close()`` raises it)."""
        error = self._future.exception()
        if error is None or self._reported:
            return None
        self._reported = True
        return error

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"PendingSave(step={self.step}, path={str(self.path)!r}, {state})"


class Writer:
    """One worker thread; at most one save in flight (the caller waits for the previous one first).

    The thread is not a daemon: at interpreter exit Python joins it, so a save in flight is finished.
    """

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, step: int | None, path: Path, work: Callable[[], T]) -> PendingSave[T]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchkeep-save")
            return PendingSave(step, path, self._executor.submit(work))

    def shutdown(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


_SHARED = Writer()


def submit(step: int | None, path: Path, work: Callable[[], T]) -> PendingSave[T]:
    """Run ``work`` on the shared background writer (``save_checkpoint(..., blocking=False)``)."""
    return _SHARED.submit(step, path, work)
