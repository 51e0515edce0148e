"""What in a run directory belongs to a manager, and deleting it (only it) in the background."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchkeep._warn import warn
from torchkeep.checkpoint.layout import DCP_TEMPORARY, MANIFEST_FILE, is_checkpoint_file, parse_manifest
from torchkeep.errors import CorruptCheckpointError
from torchkeep.manager.view import DEFAULT_TEMPLATE, template_pattern
from torchkeep.storage.local import TEMPORARY


class Deleter:
    """Deletes retired checkpoints on a background thread that holds no reference to the manager.

    So a manager can always be collected (and its lock released) on any thread; were the thread
    to hold it, the last reference could drop on that thread, whose close() cannot join itself.
    """

    def __init__(self) -> None:
        self._queue: deque[Path] = deque()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, path: Path) -> None:
        with self._guard:
            self._queue.append(path)

    def start(self) -> None:
        with self._guard:
            if self._thread is None and self._queue:
                # Unlinking gigabytes takes a while; training need not wait for it.
                self._thread = threading.Thread(target=self._run, name="torchkeep-retention", daemon=True)
                self._thread.start()

    def _next(self) -> Path | None:
        with self._guard:
            if self._queue:
                return self._queue.popleft()
            self._thread = None  # under the guard: a later start() sees no thread and starts one
            return None

    def _run(self) -> None:
        while (path := self._next()) is not None:
            remove_own(path)

    def wait(self) -> None:
        thread = self._thread
        if thread is threading.current_thread():
            return  # a close() from a finaliser running on this very thread: it drains on its own
        if thread is not None:
            thread.join()
        while (path := self._next()) is not None:
            remove_own(path)


def remove_own(folder: Path) -> None:
    """Delete the files a save writes (and their temporaries) from ``folder``, then the folder if now empty."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if own_name(entry.name, temporaries=True) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # fails if anything else is inside: left for a person to look at


def remove_leftover(folder: Path) -> None:
    """A folder a cut-short save or deletion left: removed when it holds only what a save writes (and their
    temporaries); else left, with a warning naming what else is in it."""
    foreign = foreign_files(folder, temporaries=True)
    if not foreign:
        remove_own(folder)
        return
    warn(
        f"left {folder}: torchkeep left it (a save or a deletion cut short), but it also holds "
        f"{', '.join(foreign)}, which torchkeep does not write; move them out and delete it"
    )


def own_name(name: str, *, temporaries: bool) -> bool:
    if not temporaries:
        return is_checkpoint_file(name) and name != DCP_TEMPORARY
    match = TEMPORARY.match(name)
    return is_checkpoint_file(name) or (match is not None and is_checkpoint_file(match["base"]))


def foreign_files(folder: Path, *, temporaries: bool) -> list[str]:
    """Entries of ``folder`` a save does not write (sub-folders and links included), sorted."""
    return sorted(
        entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")
        for entry in os.scandir(folder)
        if not (own_name(entry.name, temporaries=temporaries) and entry.is_file(follow_symlinks=False))
    )


@dataclass(frozen=True)
class StepFolder:
    """An entry of a run folder named like a step folder, with its manifest read once."""

    name: str
    path: Path
    damage: str | None = None  # why a manager reports it damaged (a link, an unreadable manifest)
    raw: bytes = b""
    manifest: Mapping[str, Any] | None = None
    info: Mapping[str, Any] | None = None  # the manager's record; None: a checkpoint no manager wrote


def step_folders(folder: Path, template: str) -> Generator[StepFolder, None, None]:
    """The entries of ``folder`` that ``template`` names, each with its manifest read and judged once.

    Raises:
        OSError: ``folder`` cannot be listed.
    """
    pattern = template_pattern(template)
    with os.scandir(folder) as entries:  # closed when a caller stops early (any())
        for entry in entries:
            if not pattern.match(entry.name):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                yield StepFolder(entry.name, path, damage="a symbolic link, not a folder this manager wrote")
                continue
            if not entry.is_dir():
                continue
            try:
                raw = (path / MANIFEST_FILE).read_bytes()
                manifest = parse_manifest(raw, str(path / MANIFEST_FILE))
            except (OSError, CorruptCheckpointError) as exc:
                yield StepFolder(entry.name, path, damage=str(exc))
                continue
            yield StepFolder(entry.name, path, raw=raw, manifest=manifest, info=manager_info(manifest, path, template))


def is_run(path: str | os.PathLike[str], template: str = DEFAULT_TEMPLATE) -> bool:
    """Whether ``path`` is a CheckpointManager run: a local folder holding a step folder (named by
    ``template``) that a manager wrote, or one a manager would report damaged (a link, or an unreadable
    manifest). The one test, for ``torchkeep ls`` (a run, or a folder of files?) and ``average`` (a run's
    checkpoints, or one source?). A folder of step-named checkpoints no manager wrote is not a run."""
    try:
        with contextlib.closing(step_folders(Path(path), template)) as found:
            return any(s.damage is not None or s.info is not None for s in found)
    except OSError:  # not a folder, or not listable
        return False


def not_ours(path: Path, step: int, template: str) -> str | None:
    """Why retention must not delete ``path`` (None when it is provably a manager's checkpoint of ``step``)."""
    if path.is_symlink():
        return "is a symbolic link"
    try:
        foreign = foreign_files(path, temporaries=False)
        if foreign:
            return f"holds files the manager did not write ({', '.join(foreign)})"
        manifest = parse_manifest((path / MANIFEST_FILE).read_bytes(), str(path / MANIFEST_FILE))
    except (OSError, CorruptCheckpointError) as exc:
        return f"no longer reads as a checkpoint ({exc})"
    info = manager_info(manifest, path, template)
    if info is None or info["step"] != step:
        return "is not a checkpoint a manager wrote for this step"
    return None


def manager_info(manifest: Mapping[str, Any], path: Path, template: str) -> dict[str, Any] | None:
    """The manifest's ``info`` if a manager wrote it for the step ``path`` is named after, else None."""
    info = manifest.get("info")
    if not isinstance(info, dict) or info.get("manager") != 1:
        return None
    step = info.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or template.format(step=step) != path.name:
        return None
    return info
