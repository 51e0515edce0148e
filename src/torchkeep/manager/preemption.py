"""A final checkpoint when the job is told to stop (SIGTERM from a scheduler, SIGUSR1 before a preemption)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Protocol

from torchkeep._warn import warn
from torchkeep.errors import TorchkeepError


class _Saving(Protocol):
    def save_now(self, step: int, deadline: float, **kwargs: Any) -> bool: ...


def install(
    manager: _Saving,
    state: Callable[[], Mapping[str, Any]],
    signals: Sequence[signal.Signals],
    deadline: float,
) -> Callable[[], None]:
    """Handle ``signals``: save what ``state()`` returns (it must hold ``step``), then let the signal act as
    before (the previous handler runs, or the default action: SIGTERM ends the process). Returns a function
    that puts the previous handlers back. Signals are handled in the main thread, between two Python
    statements of the training loop, so the state is consistent (never mid-step of the optimizer).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("signal handlers can only be installed from the main thread")
    previous: dict[signal.Signals, Any] = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous.clear()

    def handler(signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        before = previous.get(sig, signal.SIG_DFL)
        restore()  # a second signal during the save acts at once
        try:
            kwargs = dict(state())
            step = kwargs.pop("step")
            manager.save_now(step, time.monotonic() + deadline, **kwargs)
        except (TorchkeepError, ValueError, TypeError, OSError) as exc:
            warn(f"no final checkpoint on {sig.name}: {exc}")
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action, now that our handler is gone

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    return restore
