"""The exceptions torchkeep raises.

Every error derives from :class:`TorchkeepError`; most also derive from the builtin a caller
would already catch::

    TorchkeepError
    ├── CheckpointNotFoundError   (also FileNotFoundError)
    ├── CorruptCheckpointError    (also ValueError)
    ├── UnsupportedTensorError    (also TypeError)
    ├── UnsupportedValueError     (also TypeError)
    ├── CheckpointWriteError      (also OSError: disk full, no space, read-only, locked)
    ├── InvalidDeviceError        (also ValueError: a malformed or unavailable device)
    ├── LoadMismatchError         (also RuntimeError)
    ├── StateMismatchError        (also ValueError: saved optimizer/scheduler state that does not fit the object)
    ├── DistributedError          (also RuntimeError: a rank failed, died or disagreed; names the ranks)
    ├── ExportError               (also RuntimeError: the exporter failed; names the op)
    │   └── ExportVerificationError   (the artifact's outputs differ from eager mode)
    └── UnsafeCheckpointError     (also pickle.UnpicklingError)

Each carries the context it is about (``.path``, ``.key``, ``.report``) and its message says
what went wrong, where, and how to fix it.
"""

from __future__ import annotations

import os
import pickle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchkeep.weights.report import LoadReport


class TorchkeepError(Exception):
    """Root of every error torchkeep raises."""


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """The path does not exist, or holds nothing torchkeep can read."""

    def __init__(self, path: str | os.PathLike[str], problem: str = "no such file or directory") -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class CorruptCheckpointError(TorchkeepError, ValueError):
    """The file is damaged or malformed: truncated, a bad header, bad offsets, a checksum mismatch.

    Also raised when the file is intact but holds nothing of what was asked for (``load`` of a file holding an
    optimizer's state and no weights): the message says so, lists what it holds and names the call that reads it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, *, key: str | None = None) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.key = key
        where = f"{self.path} (tensor {key!r})" if key is not None else self.path
        super().__init__(f"{where}: {problem}")


class UnsupportedTensorError(TorchkeepError, TypeError):
    """A value cannot be stored in the safe format; the message says how to convert it."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"tensor {key!r}: {problem}")


class UnsupportedValueError(TorchkeepError, TypeError):
    """A value in training state cannot be stored without pickle; ``.where`` says where it is."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where or 'value'}: {problem}")


class CheckpointWriteError(TorchkeepError, OSError):
    """A checkpoint could not be written (no space, a full disk, another writer). Nothing earlier was touched.

    ``.errno`` is the operating system's error number when an OS call failed (``errno.ENOSPC``...).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, *, cause: OSError | None = None) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
        if cause is not None:
            self.errno = cause.errno

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class InvalidDeviceError(TorchkeepError, ValueError):
    """A device (``map_location``...) that is malformed or not available on this machine; the message says the fix."""

    def __init__(self, device: object, problem: str) -> None:
        self.device = device
        self.problem = problem
        super().__init__(f"device {device!r}: {problem}")


class TorchkeepWarning(UserWarning):
    """Something was restored imperfectly or skipped; the message says what and why."""


class LoadMismatchError(TorchkeepError, RuntimeError):
    """A strict load found missing, unexpected or mismatched keys, or a checkpoint lacks an object asked for
    (``load_checkpoint(..., scheduler=s)``: ``.report.missing`` names it); nothing was modified."""

    def __init__(self, report: LoadReport, source: str, *, problem: str | None = None) -> None:
        self.report = report
        self.source = source
        if problem is not None:  # not about a model's keys: what is missing, and the way out
            super().__init__(f"{source}: {problem}")
            return
        super().__init__(
            f"cannot load {source} strictly, the model was left unchanged:\n{report}\n"
            "Pass strict=False to load the keys that match, or remap= to rename keys."
        )


class StateMismatchError(TorchkeepError, ValueError):
    """Saved state of an object (an optimizer's parameter groups...) does not fit the live object; nothing changed."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DistributedError(TorchkeepError, RuntimeError):
    """A distributed save or load failed on some rank, or the ranks disagree; raised on every rank.

    ``.ranks`` are the ranks that failed (empty when none is to blame, e.g. a world size that
    cannot be resharded to); ``.path`` the checkpoint. Nothing half-written becomes visible.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, *, ranks: tuple[int, ...] = ()) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.ranks = ranks
        super().__init__(f"{self.path}: {problem}")

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class ExportError(TorchkeepError, RuntimeError):
    """A model could not be exported; ``.op`` names the operator that failed where the exporter says."""

    def __init__(self, fmt: str, problem: str, *, op: str | None = None, cause: BaseException | None = None) -> None:
        self.format = fmt
        self.problem = problem
        self.op = op
        self.cause = cause
        where = f" at {op}" if op else ""
        super().__init__(f"cannot export to {fmt}{where}: {problem}")


class ExportVerificationError(ExportError):
    """The exported artifact ran, but its outputs differ from eager mode past the tolerance; ``.report`` has them."""

    def __init__(self, fmt: str, problem: str, report: object) -> None:
        super().__init__(fmt, problem)
        self.report = report


class UnsafeCheckpointError(TorchkeepError, pickle.UnpicklingError):
    """A file needs code to run (a pickle global outside the allowlist) and was not marked trusted."""

    def __init__(self, path: str | os.PathLike[str], problem: str, *, globals_: tuple[str, ...] = ()) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.globals = globals_
        super().__init__(f"{self.path}: {problem}")


__all__ = [
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "DistributedError",
    "ExportError",
    "ExportVerificationError",
    "InvalidDeviceError",
    "LoadMismatchError",
    "StateMismatchError",
    "TorchkeepError",
    "TorchkeepWarning",
    "UnsafeCheckpointError",
    "UnsupportedTensorError",
    "UnsupportedValueError",
]
