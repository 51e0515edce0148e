"""Lightning integration: ``Trainer(plugins=[TorchkeepCheckpointIO()])`` writes torchkeep checkpoints.

Every checkpoint Lightning saves (``ModelCheckpoint``, ``trainer.save_checkpoint``) becomes a torchkeep
checkpoint *directory* at the path Lightning chose (``.../epoch=0-step=4.ckpt/``): tensors in safetensors,
everything else in checksummed JSON, committed atomically, never a pickle. ``trainer.fit(ckpt_path=...)``
(a path, or ``"last"``) reads them back through the same plugin. Temporaries a killed run left behind are
removed at the first save of the next run, by the manager's rule: only the files a save writes (a leftover
that also holds something else is left, with a warning).

Lightning's checkpoint dict is stored as it is, with four exceptions that have a faithful plain form and
come back as their own type: ``argparse.Namespace`` (as its attributes), Lightning's ``AttributeDict`` and
``collections.OrderedDict`` (as dicts; a state dict keeps its ``_metadata``), and ``pathlib`` paths (as
strings). Any other object (an Enum, a function, a class, an OmegaConf config) is refused with
:class:`~torchkeep.UnsupportedValueError` naming its key (``hyper_parameters.activation``), before
anything is written.

Lightning itself is imported only when the plugin is created; ``import torchkeep`` never imports it.
Both ``pytorch_lightning`` and the unified ``lightning`` package are supported.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import cache
from importlib.util import find_spec
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from torchkeep import _config
from torchkeep.checkpoint.io import read_checkpoint, write_checkpoint_dir
from torchkeep.checkpoint.layout import CheckpointPlan, SaveRequest, plan_checkpoint
from torchkeep.errors import CorruptCheckpointError
from torchkeep.manager.folders import remove_leftover
from torchkeep.state.devices import MapLocation
from torchkeep.storage.local import TEMPORARY, temporary_sibling
from torchkeep.storage.remote import is_url
from torchkeep.weights.load import load_raw

__all__ = ["TorchkeepCheckpointIO"]

INFO_KEY = "lightning"  # the manifest's info entry that marks a checkpoint written by this plugin
INSTALL_HINT = "pip install 'torchkeep[lightning]' (or the unified 'lightning' package)"

# Lightning's base classes, pytorch_lightning's first: each found is the one its Trainer checks plugins against.
_CHECKPOINT_IO_BASES = (
    ("lightning_fabric", "lightning_fabric.plugins.io.checkpoint_io"),
    ("lightning", "lightning.fabric.plugins.io.checkpoint_io"),
)
_ATTRIBUTE_DICT_MODULES = (
    "pytorch_lightning.utilities.parsing",
    "lightning_fabric.utilities.data",
    "lightning.pytorch.utilities.parsing",
    "lightning.fabric.utilities.data",
)

# Top-level entries kept as the checkpoint's objects (``torchkeep.load`` finds the model's weights,
# ``torchkeep.load_checkpoint(model=, optimizer=, scheduler=)`` restores them); a list of one is unwrapped.
_OBJECTS = (
    ("state_dict", "model", False),
    ("optimizer_states", "optimizer", True),
    ("lr_schedulers", "scheduler", True),
)


@cache
def _register_with_lightning() -> None:
    """Make the plugin a (virtual) subclass of each installed Lightning's ``CheckpointIO``."""
    found = False
    for package, module in _CHECKPOINT_IO_BASES:
        if find_spec(package) is None:
            continue
        try:
            base = importlib.import_module(module).CheckpointIO
        except (ImportError, AttributeError):  # a Lightning too old to have it: the other one may do
            continue
        base.register(TorchkeepCheckpointIO)
        found = True
    if not found:
        raise ImportError(f"TorchkeepCheckpointIO needs PyTorch Lightning: {INSTALL_HINT}")


def _attribute_dict(module: str) -> Callable[[dict[Any, Any]], Any]:
    """Lightning's AttributeDict: the class named by the file if installed, else another Lightning's."""
    if module not in _ATTRIBUTE_DICT_MODULES:  # never import a module named by a file
        raise ValueError(module)
    for candidate in (module, *_ATTRIBUTE_DICT_MODULES):
        if find_spec(candidate.split(".")[0]) is not None:
            cls: Callable[[dict[Any, Any]], Any] = importlib.import_module(candidate).AttributeDict
            return cls
    raise ImportError(f"an AttributeDict in the checkpoint needs PyTorch Lightning: {INSTALL_HINT}")


# Types with a faithful plain form: how each is rebuilt from it. Names come from the file: only these are used.
_REBUILD: dict[str, Callable[[Any], Any]] = {
    "argparse.Namespace": lambda attributes: argparse.Namespace(**attributes),
    "collections.OrderedDict": OrderedDict,
    "pathlib.Path": Path,
    "pathlib.PurePosixPath": PurePosixPath,
    "pathlib.PureWindowsPath": PureWindowsPath,
}


def _type_name(value: Any) -> str | None:
    """The name under which ``value`` is converted to plain data, or None if it is stored as it is."""
    kind = type(value)
    if kind is argparse.Namespace:
        return "argparse.Namespace"
    if kind is OrderedDict:
        return "collections.OrderedDict"
    if isinstance(value, PurePath):
        if isinstance(value, Path) and kind.__module__ == "pathlib":
            return "pathlib.Path"  # PosixPath or WindowsPath: rebuilt as this system's concrete path
        if kind in (PurePosixPath, PureWindowsPath):
            return f"pathlib.{kind.__name__}"
    if kind.__name__ == "AttributeDict" and kind.__module__ in _ATTRIBUTE_DICT_MODULES:
        return f"{kind.__module__}.AttributeDict"
    return None


def _to_plain(value: Any, path: tuple[Any, ...], converted: list[dict[str, Any]]) -> Any:
    """``value`` with the convertible types made plain, each recorded in ``converted`` by its path of keys."""
    if len(path) > _config.MAX_VALUE_DEPTH:
        return value  # the encoder refuses it, naming where (a structure that refers to itself)
    name = _type_name(value)
    if name is not None:
        record: dict[str, Any] = {"path": list(path), "type": name}
        metadata = getattr(value, "_metadata", None) if name == "collections.OrderedDict" else None
        if isinstance(metadata, dict):  # a state dict's module versions, which load_state_dict reads
            record["metadata"] = dict(metadata)
        converted.append(record)
        if isinstance(value, PurePath):
            return str(value)
        value = dict(vars(value)) if isinstance(value, argparse.Namespace) else dict(value)
    # The containers the encoder stores, as it sees them: dict and list subclasses as plain ones, exact tuples.
    if isinstance(value, dict):
        return {k: _to_plain(v, (*path, k), converted) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v, (*path, i), converted) for i, v in enumerate(value)]
    if type(value) is tuple:
        return tuple(_to_plain(v, (*path, i), converted) for i, v in enumerate(value))
    return value  # tensors, scalars; anything unsupported is refused by the encoder, by its key


def _rebuild(
    value: Any, path: tuple[Any, ...], records: Mapping[tuple[Any, ...], dict[str, Any]], within: set[Any]
) -> Any:
    """The inverse of :func:`_to_plain`: walks only down the paths that hold a converted value."""
    if path not in within:
        return value
    if type(value) is dict:
        value = {k: _rebuild(v, (*path, k), records, within) for k, v in value.items()}
    elif type(value) is list:
        value = [_rebuild(v, (*path, i), records, within) for i, v in enumerate(value)]
    elif type(value) is tuple:
        value = tuple(_rebuild(v, (*path, i), records, within) for i, v in enumerate(value))
    record = records.get(path)
    if record is None:
        return value
    name = record["type"]
    make = _attribute_dict(name.rsplit(".", 1)[0]) if name.endswith(".AttributeDict") else _REBUILD[name]
    rebuilt = make(value)
    if "metadata" in record:
        rebuilt._metadata = record["metadata"]
    return rebuilt


def _known_type(name: Any) -> bool:
    return isinstance(name, str) and (
        name in _REBUILD or (name.endswith(".AttributeDict") and name.rsplit(".", 1)[0] in _ATTRIBUTE_DICT_MODULES)
    )


class _Given:
    """A state dict already taken, standing in for the object it came from when the save is planned."""

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - plan_checkpoint uses the state given
        raise AssertionError("the state is passed to plan_checkpoint")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # pragma: no cover
        raise AssertionError("never loaded")


def plan_lightning(checkpoint: Mapping[str, Any]) -> CheckpointPlan:
    """Encode Lightning's checkpoint dict; nothing is written.

    Raises:
        UnsupportedValueError: a value that cannot be stored without pickle, naming its key.
    """
    converted: list[dict[str, Any]] = []
    plain = {key: _to_plain(value, (key,), converted) for key, value in checkpoint.items()}
    objects: dict[str, Any] = {}
    layout: dict[str, str] = {}
    for key, name, listed in _OBJECTS:
        value = plain.get(key)
        if listed:
            if type(value) is not list or len(value) != 1:
                continue  # several optimizers: kept as Lightning's list, among the plain values
            value = value[0]
        if type(value) is dict and (listed or all(isinstance(t, torch.Tensor) for t in value.values())):
            objects[name] = value
            layout[key] = name
            del plain[key]
    given: Any = _Given()

    def slot(name: str) -> Any:
        return given if name in objects else None

    request = SaveRequest(
        model=slot("model"), optimizer=slot("optimizer"), scheduler=slot("scheduler"), rng=False, state=plain
    )
    info = {INFO_KEY: {"keys": list(checkpoint), "objects": layout, "converted": converted}}
    return plan_checkpoint(request, info=info, states=objects)


def read_lightning(path: str, map_location: MapLocation, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Lightning's checkpoint dict back from a checkpoint directory written by :func:`plan_lightning`."""
    loaded = read_checkpoint(path, map_location=map_location, storage_options=storage_options)
    record = loaded.info().get(INFO_KEY)
    if not isinstance(record, dict):
        raise CorruptCheckpointError(
            loaded.path,
            "holds no Lightning checkpoint (it was not written by TorchkeepCheckpointIO); "
            "restore it with torchkeep.load_checkpoint(path, model=..., optimizer=...)",
        )
    keys, layout, converted = record.get("keys"), record.get("objects"), record.get("converted")
    if not (isinstance(keys, list) and isinstance(layout, dict) and isinstance(converted, list)):
        raise CorruptCheckpointError(loaded.path, f"manifest: malformed info.{INFO_KEY} record")
    state = loaded.state()
    for key, name in layout.items():
        node = loaded.objects.get(name)
        if node is None:
            raise CorruptCheckpointError(loaded.path, f"manifest: the {name!r} object ({key!r}) is missing")
        value = loaded.decode(node, into_model=name == "model")  # Lightning copies the model's weights at once
        state[key] = value if name == "model" else [value]
    if set(keys) != set(state):
        raise CorruptCheckpointError(loaded.path, f"manifest: the entries {sorted(map(str, state))} differ from {keys}")
    records: dict[tuple[Any, ...], dict[str, Any]] = {}
    for entry in converted:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), list) and _known_type(entry.get("type"))):
            raise CorruptCheckpointError(loaded.path, f"manifest: bad record of a converted value {entry!r:.120}")
        records[tuple(entry["path"])] = entry
    try:
        within = {path[:n] for path in records for n in range(1, len(path) + 1)}
        return {key: _rebuild(state[key], (key,), records, within) for key in keys}
    except (TypeError, ValueError, AttributeError) as exc:  # a record that does not fit the value it names
        raise CorruptCheckpointError(loaded.path, f"manifest: a converted value does not rebuild: {exc}") from exc


class TorchkeepCheckpointIO:
    """A Lightning ``CheckpointIO`` that writes torchkeep checkpoints: safe, checksummed, atomic.

    Example:
        >>> from torchkeep.lightning import TorchkeepCheckpointIO
        >>> trainer = Trainer(plugins=[TorchkeepCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
        >>> trainer.fit(model, ckpt_path="last")

    Each checkpoint is a directory at the path Lightning names (``epoch=0-step=4.ckpt``): a kill at any
    moment leaves either the previous checkpoint or the new one there, never a partial one. Checkpoints
    written by ``torch.save`` (a ``.ckpt`` file from before) are read too, through torchkeep's safe
    unpickler: nothing in them is run.

    Args:
        storage_options: for ``s3://...``-style paths: passed to fsspec when reading and removing
            (``trainer.save_checkpoint(..., storage_options=)`` overrides them for a save).

    Raises:
        ImportError: neither ``pytorch_lightning`` nor ``lightning`` is installed.
    """

    def __init__(self, *, storage_options: Mapping[str, Any] | None = None) -> None:
        _register_with_lightning()
        self.storage_options = dict(storage_options) if storage_options is not None else None
        self._created = time.time()
        self._swept: set[Path] = set()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` as a torchkeep checkpoint directory at ``path``, replacing it atomically.

        Raises:
            UnsupportedValueError: a value that cannot be stored without pickle, naming its key; nothing is written.
            CheckpointWriteError: the disk refused (full, read-only); any earlier checkpoint at ``path`` is intact.
            TypeError: ``storage_options`` for a local path.
        """
        plan = plan_lightning(checkpoint)
        if is_url(path):
            from torchkeep.checkpoint.remote import write_remote_checkpoint

            options = storage_options if storage_options is not None else self.storage_options
            write_remote_checkpoint(str(path), plan, options)
            return
        if storage_options is not None:
            raise TypeError(f"{os.fspath(path)}: storage_options are for URLs (s3://...); this path is local")
        target = Path(path)
        write_checkpoint_dir(target, plan)
        self._sweep(target.parent)

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's checkpoint dict, every tensor and checksum verified, on the CPU unless ``map_location`` says.

        ``weights_only`` is accepted for Lightning's interface and changes nothing: no code is ever run
        from a checkpoint, whatever it says.

        Raises:
            CheckpointNotFoundError: nothing at ``path`` (a FileNotFoundError, as Lightning expects).
            CorruptCheckpointError: damage or tampering, naming the file; a directory not written by this plugin.
            UnsafeCheckpointError: a ``torch.save`` file that would need to run code to load.
        """
        location: MapLocation = "cpu" if map_location is None else map_location
        local = not is_url(path)
        if local and Path(path).is_file():  # a torch.save checkpoint from before the switch
            raw = load_raw(path, map_location=location)
            if not isinstance(raw, dict):
                raise CorruptCheckpointError(path, f"holds a {type(raw).__name__}, not a Lightning checkpoint dict")
            return raw
        return read_lightning(os.fspath(path), location, self.storage_options)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint at ``path`` (a link: the link alone). Its name disappears first, in one
        rename, so an interrupted removal never leaves a half-deleted checkpoint under that name."""
        if is_url(path):
            self._remove_remote(str(path))
            return
        target = Path(path)
        if target.is_symlink() or target.is_file():
            target.unlink(missing_ok=True)
        elif target.is_dir():
            doomed = temporary_sibling(target)
            os.rename(target, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _sweep(self, folder: Path) -> None:
        """Remove what a killed run left half-written in ``folder`` (``.epoch=0-step=4.ckpt.tmp-...``), once:
        only temporaries of ``.ckpt`` names, older than this plugin, so another live writer's are kept. A
        leftover folder goes as a manager's does (``remove_own``): the files a save writes, then the folder;
        one that also holds anything else is left, with a warning naming it."""
        if folder in self._swept:
            return
        self._swept.add(folder)
        with os.scandir(folder) as entries:
            stale = [
                Path(entry.path)
                for entry in entries
                if (match := TEMPORARY.match(entry.name)) is not None
                and match["base"].endswith(".ckpt")
                and entry.stat(follow_symlinks=False).st_mtime < self._created
            ]
        for path in stale:
            if not path.is_dir() or path.is_symlink():
                path.unlink(missing_ok=True)
                continue
            with contextlib.suppress(OSError):  # gone meanwhile: nothing to do
                remove_leftover(path)

    def _remove_remote(self, url: str) -> None:
        from torchkeep.checkpoint.layout import MANIFEST_FILE
        from torchkeep.storage.remote import RemoteStorage

        storage = RemoteStorage(url, self.storage_options)
        storage.delete(MANIFEST_FILE)  # the commit point goes first: what remains is no checkpoint
        for name in storage.list():
            storage.delete(name)

    def teardown(self) -> None:
        """Nothing to release: every save is complete when it returns."""
