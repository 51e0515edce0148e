"""Calling torchkeep's public read functions on hostile input: a result or a TorchkeepError, in bounded time and memory.

Every call goes through :func:`attempt`, which

- runs it under a wall-clock bound (``SIGALRM``) and an address-space bound (``RLIMIT_AS``:
  what the process maps now plus :data:`MEMORY_BUDGET`), so a hang or a runaway allocation
  is a finding instead of a stuck or killed run;
- accepts a return value or a :class:`torchkeep.TorchkeepError` (the builtin-derived subclasses
  included), and turns anything else into :class:`Escape`, an ``AssertionError`` hypothesis
  shrinks and reports;
- treats a typed error caused by running out of the memory budget as an escape too: a few KB
  of input must not ask for a GiB, even if the error is then translated;
- counts outcomes per function in :data:`TALLY` (the campaign script reports them).
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import torchkeep
from torchkeep.cli.main import main

# Seconds one public call may take on a few KB of input; generous, the machine is shared.
TIME_BUDGET = float(os.environ.get("TORCHKEEP_FUZZ_SECONDS", "20"))
# Bytes one call may map on top of what the process already has.
MEMORY_BUDGET = int(os.environ.get("TORCHKEEP_FUZZ_MEMORY", str(1 << 30)))
TALLY: Counter[tuple[str, str]] = Counter()
SLOWEST: dict[str, float] = {}


class Escape(AssertionError):
    """A public function let something other than a TorchkeepError out, or broke its budget."""


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the library swallows it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout(f"over the {TIME_BUDGET:.0f} s budget")


def _mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def bounded(seconds: float = TIME_BUDGET, extra_bytes: int = MEMORY_BUDGET) -> Iterator[None]:
    """Alarm after ``seconds``; refuse allocations past ``extra_bytes`` more than mapped now."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def _out_of_memory(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "std::bad_alloc" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def attempt(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: its result, or None after a TorchkeepError; anything else is an Escape."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), bounded():
            warnings.simplefilter("ignore")
            result = fn(*args, **kwargs)
    except CaseTimeout as exc:
        TALLY[what, "TIMEOUT"] += 1
        raise Escape(f"{what}: {exc}") from None
    except torchkeep.TorchkeepError as exc:
        if _out_of_memory(exc):
            TALLY[what, "MEMORY"] += 1
            raise Escape(f"{what}: ran out of its {MEMORY_BUDGET >> 20} MiB budget: {exc!s:.300}") from exc
        TALLY[what, type(exc).__name__] += 1
        return None
    except Exception as exc:
        TALLY[what, "ESCAPE " + type(exc).__name__] += 1
        raise Escape(f"{what} raised {type(exc).__name__}, not a TorchkeepError: {exc!s:.500}") from exc
    finally:
        elapsed = time.perf_counter() - start
        SLOWEST[what] = max(SLOWEST.get(what, 0.0), elapsed)
    TALLY[what, "ok"] += 1
    return result


def cli(*argv: str) -> int:
    """``torchkeep ARGV`` in process: it must return an int (its output is swallowed)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = attempt("cli " + argv[0], main, list(argv))
    if not isinstance(code, int):
        raise Escape(f"torchkeep {' '.join(argv)} raised instead of returning an exit code")
    return code


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh folder for one case (hypothesis reuses a test's tmp_path across its examples)."""
    with tempfile.TemporaryDirectory(prefix="torchkeep-fuzz-") as name:
        yield Path(name)


# ---------------------------------------------------------------------------------------------
# The objects a checkpoint is saved from and loaded into.


class Rig:
    """A model, Adam, a scheduler, a GradScaler and two components, all with some state."""

    def __init__(self, *, trained: bool = False) -> None:
        torch.manual_seed(1 if trained else 2)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2)
        self.scaler = torch.amp.GradScaler("cpu")
        self.components: dict[str, Any] = {"ema": nn.Linear(2, 2), "sampler": torchkeep.ResumableSampler(10, seed=3)}
        if trained:
            self.model(torch.randn(5, 3)).sum().backward()
            self.optimizer.step()
            self.scheduler.step()
            list(zip(range(4), self.components["sampler"], strict=False))

    def objects(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "components": self.components,
        }

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def unchanged_since(self, before: dict[str, torch.Tensor]) -> bool:
        after = self.model.state_dict()
        return all(torch.equal(before[k], after[k]) for k in before)


def plain_state() -> dict[str, Any]:
    """Every kind of plain value a checkpoint keeps, so that every decoder tag is in the seed."""
    return {
        "epoch": 3,
        "loss": torch.tensor(0.25),
        "best": float("nan"),
        "history": [1.5, float("inf"), -0.0],
        "pair": (1, "a"),
        "by_step": {10: 0.5, (1, 2): None},
        "array": np.arange(4, dtype=np.int16),
        "scalar": np.float32(2.5),
        "complex": np.complex64(1 + 2j),
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "config": {"lr": 0.01, "name": "run", "$odd": True},
    }


def load_checkpoint_into_rig(path: Path, *, strict: bool = True, map_location: Any = "cpu") -> None:
    """load_checkpoint with every kind of object; a refusal must leave the model as it was."""
    rig = Rig()
    before = rig.snapshot()
    result = attempt(
        f"load_checkpoint(strict={strict})",
        torchkeep.load_checkpoint,
        path,
        **rig.objects(),
        strict=strict,
        map_location=map_location,
    )
    if result is None and strict and not rig.unchanged_since(before):
        raise Escape(f"load_checkpoint refused {path} but had already modified the model")


def read_as_weights(path: Path, work: Path) -> None:
    """Every public function that reads weights (a file or a folder)."""
    attempt("load", torchkeep.load, path)
    attempt("load(mmap)", torchkeep.load, path, mmap=True)
    attempt("load(bf16)", torchkeep.load, path, dtype=torch.bfloat16, map_location="auto")
    attempt("load_raw", torchkeep.load_raw, path)
    for strict in (True, False):
        rig = Rig()
        before = rig.snapshot()
        report = attempt(f"load_into(strict={strict})", torchkeep.load_into, rig.model, path, strict=strict)
        if report is None and not rig.unchanged_since(before):
            raise Escape(f"load_into refused {path} but had already modified the model")
    load_checkpoint_into_rig(path, strict=False)
    attempt("inspect", torchkeep.inspect, path)
    attempt("verify", torchkeep.verify, path)
    attempt("scan", torchkeep.scan, path)
    attempt("convert", torchkeep.convert, path, work / "converted.safetensors")
    attempt("convert(folder)", torchkeep.convert, path, work / "converted")
    cli("inspect", str(path))
    cli("inspect", str(path), "--json", "--tree")
    cli("verify", str(path))
    cli("scan", str(path), "--json")
    cli("convert", str(path), str(work / "cli-converted.safetensors"))


def read_as_checkpoint(path: Path, work: Path) -> None:
    """Every public function that reads a checkpoint folder."""
    load_checkpoint_into_rig(path)
    load_checkpoint_into_rig(path, strict=False, map_location=None)
    attempt("load", torchkeep.load, path)
    attempt("load_raw", torchkeep.load_raw, path)
    attempt("inspect", torchkeep.inspect, path)
    attempt("verify", torchkeep.verify, path)
    attempt("scan", torchkeep.scan, path)
    attempt("convert", torchkeep.convert, path, work / "converted.safetensors")
    cli("inspect", str(path))
    cli("inspect", str(path), "--json")
    cli("verify", str(path))


def read_as_run(run: Path) -> None:
    """A CheckpointManager directory, read only: list and restore (latest, best, a step), and ``ls``."""

    def manager() -> torchkeep.CheckpointManager:
        return torchkeep.CheckpointManager(run, read_only=True, monitor="val", mode="max")

    listed = attempt("CheckpointManager.list", lambda: manager().list())
    for step in ["latest", "best", *(info.step for info in listed or [])]:
        rig = Rig()
        attempt(f"CheckpointManager.restore({step!r})", lambda s=step, r=rig: manager().restore(s, **r.objects()))
    cli("ls", str(run), "--monitor", "val", "--mode", "max")


def read_as_model(path: Path) -> None:
    """A save_model folder: load_model in every mode, plus the weights readers."""
    attempt("load_model", torchkeep.load_model, path)
    attempt("load_model(strict=False)", torchkeep.load_model, path, strict=False, dtype=torch.float64)
    attempt("load_model(cls)", torchkeep.load_model, path, cls=nn.Sequential)
    attempt("inspect", torchkeep.inspect, path)
    attempt("load", torchkeep.load, path)
    cli("inspect", str(path))
    cli("inspect", str(path), "--json")


def read_as_pickle(path: Path, work: Path) -> None:
    """A pickle-based file (torch.save zip or legacy, a plain pickle)."""
    attempt("load", torchkeep.load, path)
    attempt("load_raw", torchkeep.load_raw, path)
    load_checkpoint_into_rig(path, strict=False)
    rig = Rig()
    attempt("load_into(strict=False)", torchkeep.load_into, rig.model, path, strict=False)
    attempt("scan", torchkeep.scan, path)
    attempt("inspect", torchkeep.inspect, path)
    attempt("convert", torchkeep.convert, path, work / "converted")
    cli("scan", str(path))
    cli("convert", str(path), str(work / "cli-converted.safetensors"))
