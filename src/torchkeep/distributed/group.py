"""The ranks of a distributed save or load, and the few collectives torchkeep itself runs.

torchkeep's own messages (the target's name, each rank's success or failure, small JSON fragments)
travel over a gloo group made for them, with a timeout of ``_config.COLLECTIVE_TIMEOUT_S``: a rank that
died or hangs fails the save on every other rank within that time instead of blocking it, and a
failing collective is a :class:`DistributedError`, never a bare backend error. Tensors are never sent
through it; sharded tensors go through torch.distributed.checkpoint on the caller's own group.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from torchkeep import _config
from torchkeep.errors import DistributedError, TorchkeepError

T = TypeVar("T")
_BACKGROUND: dict[int, tuple[Any, Any]] = {}  # id of a process group -> (that group, its background gloo group)
_CONTROL: dict[int, tuple[Any, Any]] = {}  # id of a process group -> (that group, its gloo control group)


def active_group(process_group: Any = None) -> Group | None:
    """The group a save or load runs across: the one given, or the default one when initialised with
    more than one rank; None for a single process."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        process_group = dist.group.WORLD
    return Group(process_group)


class Group:
    """A process group seen by one rank, with byte-level collectives on a gloo control group."""

    def __init__(self, process_group: Any, control: Any = None) -> None:
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        self.control = control if control is not None else _control_group(process_group)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def background(self) -> Group:
        """The same ranks on a gloo group of their own (made on first use: a collective call), for saves
        written on a background thread: their DCP collectives and torchkeep's exchanges then never
        interleave with the training's collectives, or with those of a load, on the foreground."""
        if self.process_group is not dist.group.WORLD:
            raise ValueError("background saves across ranks need the default process group (process_group=None)")
        background = _gloo_group_for(_BACKGROUND, self.process_group)
        return Group(background, control=background)

    @contextmanager
    def collective(self, path: str | os.PathLike[str], phase: str) -> Iterator[None]:
        """Turn a failed collective (a dead peer, a timeout) into DistributedError naming the phase."""
        try:
            yield
        except TorchkeepError:
            raise
        except (RuntimeError, dist.DistError) as exc:
            raise DistributedError(
                path,
                f"rank {self.rank}: the other ranks did not answer while {phase} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); a rank died or is stuck, or they called "
                "different functions. Nothing was committed; restart every rank and resume from the latest checkpoint",
            ) from exc

    def all_gather_bytes(self, data: bytes, path: str | os.PathLike[str], phase: str) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        with self.collective(path, phase):
            length = torch.tensor([len(data)], dtype=torch.int64)
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            dist.all_gather(lengths, length, group=self.control)
            longest = max(int(n.item()) for n in lengths)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(gathered, mine, group=self.control)
        return [bytes(t[: int(n.item())].numpy()) for t, n in zip(gathered, lengths, strict=True)]

    def broadcast_bytes(self, data: bytes, path: str | os.PathLike[str], phase: str) -> bytes:
        """Rank 0's ``data`` on every rank (the others' is ignored)."""
        return self.all_gather_bytes(data if self.is_coordinator else b"", path, phase)[0]

    def exchange(self, message: Mapping[str, Any], path: str | os.PathLike[str], phase: str) -> list[dict[str, Any]]:
        """Every rank's JSON ``message``, in rank order; if any carries a ``"problem"``, every rank raises
        DistributedError naming the ranks that failed and why."""
        raw = self.all_gather_bytes(json.dumps(message).encode("utf-8"), path, phase)
        answers = [json.loads(part) for part in raw]
        failed = {rank: str(a["problem"]) for rank, a in enumerate(answers) if a.get("problem")}
        if failed:
            if len(set(failed.values())) == 1:
                lines = next(iter(failed.values()))
            else:
                lines = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(failed.items()))
            raise DistributedError(path, f"{phase} failed on rank(s) {sorted(failed)}: {lines}", ranks=tuple(failed))
        return answers

    def step(
        self, path: str | os.PathLike[str], phase: str, work: Callable[[], T], tell: Callable[[T], Mapping[str, Any]]
    ) -> tuple[T, list[dict[str, Any]]]:
        """Run this rank's ``work``, then tell every rank how it went (``tell(result)`` on success).

        A failure anywhere raises on every rank (a failing rank its own TorchkeepError, the others
        DistributedError naming it), so no rank goes on into a collective the others will never join.
        """
        try:
            result = work()
        except Exception as exc:  # any failure must reach the other ranks, or they would wait for this one
            try:
                self.exchange({"problem": f"{type(exc).__name__}: {exc}"}, path, phase)
            except DistributedError as error:
                if isinstance(exc, TorchkeepError):
                    raise exc from None  # this rank keeps its own typed error; the others get DistributedError
                raise error from exc
            raise  # not reached: exchange raises when a rank reports a problem
        return result, self.exchange(dict(tell(result)), path, phase)


def no_message(_: Any) -> dict[str, Any]:
    """What a rank tells the others after a step that has nothing to report but its success."""
    return {}


def _control_group(process_group: Any) -> Any:
    """A gloo group over the same ranks, with torchkeep's timeout; made once per group (a collective call).
    A subgroup is its own control group: every other process would have to join a new group too."""
    return _gloo_group_for(_CONTROL, process_group) if process_group is dist.group.WORLD else process_group


def _gloo_group_for(cache: dict[int, tuple[Any, Any]], process_group: Any) -> Any:
    """A gloo group with torchkeep's timeout over every rank, made once per ``process_group`` and cache."""
    entry = cache.get(id(process_group))
    if entry is None or entry[0] is not process_group:  # the group is held, so its id is not reused
        timeout = datetime.timedelta(seconds=_config.COLLECTIVE_TIMEOUT_S)
        entry = (process_group, dist.new_group(backend="gloo", timeout=timeout))
        cache[id(process_group)] = entry
    return entry[1]


def forget_groups() -> None:
    """Drop cached control and background groups (after ``destroy_process_group``, before a new one is
    initialised)."""
    _CONTROL.clear()
    _BACKGROUND.clear()


class SoloGroup(Group):
    """One process and no process group: the same protocol, for writing sharded checkpoints offline."""

    def __init__(self) -> None:
        self.process_group = None
        self.rank = 0
        self.size = 1
        self.control = None

    def all_gather_bytes(self, data: bytes, path: str | os.PathLike[str], phase: str) -> list[bytes]:
        return [data]
