"""save_checkpoint / load_checkpoint: training state in, training state out, no pickle."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchkeep import _config
from torchkeep._gc import gc_paused
from torchkeep._warn import warn
from torchkeep.checkpoint import objects
from torchkeep.checkpoint.accelerate import is_accelerate_state, read_accelerate_state
from torchkeep.checkpoint.background import PendingSave, StagingBuffers, submit
from torchkeep.checkpoint.layout import (
    MANIFEST_FILE,
    SHARED_VERSION,
    TENSORS_FILE,
    CheckpointPlan,
    SaveRequest,
    is_checkpoint_file,
    manifest_bytes,
    parse_manifest,
    plan_checkpoint,
)
from torchkeep.checkpoint.sharded import FullTensors, Where, parse_section
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    LoadMismatchError,
    StateMismatchError,
)
from torchkeep.format.names import member
from torchkeep.format.pickle.dcp import is_dcp_dir, read_dcp
from torchkeep.state.devices import MapLocation, parse_device, placer
from torchkeep.state.keys import WRAPPER_PREFIX, drop_compile_segments, is_extra_state, unwrap_model
from torchkeep.state.optimizer_checks import check_optimizer, fit_state_shapes
from torchkeep.state.rng import check_rng, restore_rng
from torchkeep.state.tensors import PreparedTensors
from torchkeep.state.values import Decoder
from torchkeep.storage.base import Storage
from torchkeep.storage.local import LocalStorage, new_folder
from torchkeep.storage.remote import is_url
from torchkeep.weights.contents import array_tensor, classify, split_objects
from torchkeep.weights.legacy import detect_kind, read_raw
from torchkeep.weights.load import load, on_cpu, place_all, read_file
from torchkeep.weights.load_into import PendingLoad, match_model
from torchkeep.weights.report import LoadReport
from torchkeep.weights.save import write_weights


def write_checkpoint(storage: Storage, plan: CheckpointPlan) -> int:
    """Write the tensor file, then the manifest that names it; returns bytes written."""
    size = write_weights(storage, TENSORS_FILE, plan.tensors, {})
    manifest = manifest_bytes(plan.manifest, {"name": TENSORS_FILE, "size": size})
    with storage.open_write(MANIFEST_FILE) as sink:
        sink.write(manifest)
    return size + len(manifest)


def share_tensors(plan: CheckpointPlan, store: Storage) -> tuple[CheckpointPlan, int]:
    """Move a plan's large tensors into the run's object store (each written once, whatever the step).

    Returns the plan that remains (small tensors in the checkpoint's own file, the large ones listed
    in the manifest as ``shared_tensors``) and the bytes of new objects written. Objects are durable
    before the manifest that lists them is written.
    """
    stored, aliases = plan.tensors.tensors, plan.tensors.aliases
    # GPU tensors stay where they are: hashed and written through the staging buffers, one piece at a time.
    large = {n: t for n, t in stored.items() if t.numel() * t.element_size() >= objects.MIN_OBJECT_BYTES}
    if not large:
        return plan, 0
    keys = objects.keys_of(large)
    # New objects are written by a few threads: each is its own atomic file with an fsync, whose waits overlap.
    with ThreadPoolExecutor(max_workers=max(1, _config.IO_THREADS)) as pool:
        written = sum(pool.map(lambda n: objects.put(store, keys[n], large[n]), large))
    entries = {n: objects.describe(t, keys[n]) for n, t in large.items()}
    entries.update({alias: entries[target] for alias, target in aliases.items() if target in large})
    kept = PreparedTensors(
        {n: t for n, t in stored.items() if n not in large},
        {a: t for a, t in aliases.items() if t not in large},
    )
    version = max(int(plan.manifest.get("version", 1)), SHARED_VERSION)  # a distributed one stays 3
    manifest = dict(plan.manifest, version=version, shared_tensors=entries)
    return CheckpointPlan(manifest, kept), written


def write_checkpoint_dir(target: Path, plan: CheckpointPlan) -> int:
    """Write a checkpoint directory beside ``target`` and commit it atomically. An existing ``target`` is
    replaced only if it is a checkpoint folder (files a save writes, nothing else).

    Raises:
        CheckpointWriteError: ``target`` is a file or a folder holding other files (nothing written), or
            the write failed (``target`` as it was).
    """
    with new_folder(target, is_checkpoint_file, "checkpoint folder") as temp:
        size = write_checkpoint(LocalStorage(temp), plan)
    return size


@gc_paused
def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    components: Mapping[str, Any] | None = None,
    rng: bool = True,
    blocking: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    per_rank: Mapping[str, Any] | None = None,
    process_group: Any = None,
    **state: Any,
) -> PendingSave[int] | None:
    """Save everything needed to resume training, bit-exactly, as a directory. No pickle.

    Args:
        path: the checkpoint directory (replaced atomically if it exists).
        model: its state dict, unwrapped from DataParallel / DDP / torch.compile.
        optimizer, scheduler, scaler: any object with ``state_dict()`` / ``load_state_dict()``.
        components: more such objects by name (a GAN's two models and two optimizers, an EMA...).
        rng: capture Python, NumPy, torch CPU and CUDA random states.
        storage_options: for a URL (``s3://bucket/run/ckpt``): passed to fsspec. There the tensor file
            is written under a new name and the manifest, written last, is the commit point.
        blocking: False: return once the state is copied (training may change it at once) and write
            in the background; the returned handle's ``wait()`` raises any error of the write.
        per_rank: with several ranks, state that differs between them (a per-rank sampler, counters),
            saved under each rank's own name; objects with ``state_dict()`` or plain values.
        process_group: the ranks that save together (default: the initialised default group, when
            it has more than one rank). Every rank calls ``save_checkpoint``; rank 0 writes the shared
            state once, each rank its own RNG and ``per_rank`` state, and sharded (FSDP2 / DTensor)
            models and optimizers are written by every rank through torch.distributed.checkpoint.
            The folder is committed by rank 0 once every rank's files are durable, or not at all.
        **state: plain values to keep (``epoch=3, loss=loss_tensor, config={...}``).

    Returns:
        None, or with ``blocking=False`` a :class:`PendingSave` whose ``wait()`` returns the bytes written.

    Raises:
        UnsupportedValueError: a value that cannot be stored without pickle, naming where it is.
        DistributedError: with several ranks, on every rank, when any rank failed (naming it).

    Example:
        >>> torchkeep.save_checkpoint("ckpt", model=model, optimizer=opt, epoch=epoch, loss=loss)
    """
    from torchkeep.distributed.group import active_group

    request = SaveRequest(model, optimizer, scheduler, scaler, components, rng, state, per_rank)
    group = active_group(process_group)
    if group is not None:
        from torchkeep.distributed.plan import plan_distributed
        from torchkeep.distributed.save import save_job

        where: str | Path = str(path) if is_url(path) else Path(path)
        job = save_job(
            where,
            lambda: plan_distributed(request),
            group,
            lambda _, written: written,
            staging=None if blocking else StagingBuffers(),
            storage_options=storage_options,
        )
        if blocking:
            job()
            return None
        return submit(None, Path(path), job)
    if per_rank:
        raise ValueError("per_rank= is for saves from several ranks; no process group is initialised")
    plan = plan_checkpoint(request)
    if is_url(path):
        from torchkeep.checkpoint.remote import write_remote_checkpoint

        url = str(path)
        if blocking:
            write_remote_checkpoint(url, plan, storage_options)
            return None
        remote_snapshot = StagingBuffers().snapshot(plan)
        return submit(None, Path(url), lambda: write_remote_checkpoint(url, remote_snapshot, storage_options))
    target = Path(path)
    if blocking:
        write_checkpoint_dir(target, plan)
        return None
    snapshot = StagingBuffers().snapshot(plan)
    return submit(None, target, lambda: write_checkpoint_dir(target, snapshot))


@dataclass
class LoadedCheckpoint:
    """A checkpoint read and verified, decoded on demand."""

    path: str
    manifest: dict[str, Any]
    decoder: Decoder  # tensors come out as private copies
    model_decoder: Decoder | None = None  # tensors may stay on the mapped file: copied into a model at once

    @property
    def objects(self) -> dict[str, Any]:
        objects: dict[str, Any] = self.manifest.get("objects", {})
        return objects

    def decode(self, node: Any, *, into_model: bool = False) -> Any:
        """The value of a manifest node; ``into_model``: its tensors may be views of the mapped file."""
        decoder = self.model_decoder if into_model and self.model_decoder is not None else self.decoder
        return decoder.decode(node)

    def info(self) -> dict[str, Any]:
        return self._decode_dict("info")

    def state(self) -> dict[str, Any]:
        return self._decode_dict("state")

    def _decode_dict(self, field: str) -> dict[str, Any]:
        value = self.decode(self.manifest.get(field, {}))
        if not isinstance(value, dict):
            raise CorruptCheckpointError(self.path, f"manifest field {field!r} is a {type(value).__name__}, not a dict")
        return value


def checkpoint_weights(
    path: str | os.PathLike[str], *, verify: bool = True, storage_options: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The model state dict a training checkpoint holds (sharded tensors reassembled), verified.

    Raises:
        CheckpointNotFoundError: the checkpoint holds no model.
    """
    loaded = read_checkpoint(path, verify=verify, storage_options=storage_options)
    node = loaded.objects.get("model")
    if node is None:
        raise CheckpointNotFoundError(
            path, "this training checkpoint holds no model; load_checkpoint restores its objects, load_raw returns all"
        )
    state = loaded.decode(node)
    _check_model_state(state, f"{loaded.path} [model]")
    return dict(state)


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


@gc_paused
def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint directory: manifest checksum, tensor file checksums, and that they belong together."""
    if is_url(path):
        from torchkeep.checkpoint.remote import read_remote_checkpoint

        url = str(path)
        manifest, tensors = read_remote_checkpoint(url, storage_options, verify=verify)
        return loaded_checkpoint(url.rstrip("/"), manifest, tensors, set(), map_location, storage_options)
    root = Path(path)
    if not root.exists():
        raise CheckpointNotFoundError(root)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CorruptCheckpointError(root, f"no {MANIFEST_FILE}: not a checkpoint, or an incomplete one")
    manifest = parse_manifest(_read_small(manifest_path), str(manifest_path))
    tensors_file = manifest["tensors_file"]
    tensors_path = member(root, tensors_file["name"], manifest_path, what="tensor file")
    if not tensors_path.is_file():
        raise CorruptCheckpointError(root, f"{tensors_path.name} is missing")
    actual = tensors_path.stat().st_size
    if actual != tensors_file["size"]:
        cut = " (truncated?)" if actual < tensors_file["size"] else ""
        raise CorruptCheckpointError(
            tensors_path, f"size {actual} differs from the {tensors_file['size']} recorded in the manifest{cut}"
        )
    # Mapped, and verified on the mapped pages: a model's tensors are then copied straight from the page
    # cache into its parameters; everything else gets a private copy (objects keep what they are given).
    header, tensors = read_file(str(tensors_path), mmap=True, verify=verify)
    mapped = {id(t) for t in tensors.values()}
    shared = manifest.get("shared_tensors")
    if shared is not None:
        entries = objects.check_entries(shared, str(manifest_path))
        store = objects.objects_store(root)
        for name, entry in entries.items():
            if name in tensors:
                raise CorruptCheckpointError(manifest_path, f"tensor {name!r:.80} is both in the file and shared")
            tensors[name] = objects.read(store, name, entry, verify=verify)
    for alias, target in header.aliases.items():
        tensors[alias] = tensors[target]
    return loaded_checkpoint(str(root), manifest, tensors, mapped, map_location)


def loaded_checkpoint(
    where: str,
    manifest: dict[str, Any],
    tensors: dict[str, Any],
    mapped: set[int],
    map_location: MapLocation,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """A checkpoint's decoders: tensors placed as asked; ``mapped`` ones copied unless they go into a model."""
    manifest_path = f"{where}/{MANIFEST_FILE}"

    def place_tensor(tensor: Any, saved_device: str) -> Any:
        if map_location is None:  # as torch.load: back where it was saved
            return tensor if saved_device == "cpu" else tensor.to(parse_device(saved_device))
        return placer(map_location, saved_location=saved_device)(tensor)

    def place_copy(tensor: Any, saved_device: str) -> Any:
        placed = place_tensor(tensor, saved_device)
        return placed.clone() if id(placed) in mapped else placed

    sharded = None
    section = parse_section(manifest, manifest_path)
    if section is not None and section.sharded:
        full = FullTensors(Where(where, storage_options), section, manifest_path)

        def sharded(key: str) -> Any:
            return place_tensor(full(key), "cpu")

    return LoadedCheckpoint(
        where,
        manifest,
        Decoder(tensors, manifest_path, place_copy, sharded),
        Decoder(tensors, manifest_path, place_tensor, sharded),
    )


def _read_small(path: Path) -> bytes:
    """A JSON document's bytes, refusing absurd sizes before reading."""
    size = path.stat().st_size
    if size > _config.MAX_JSON_BYTES:
        raise CorruptCheckpointError(path, f"is {size} bytes, over the limit of {_config.MAX_JSON_BYTES}")
    return path.read_bytes()


def _check_model_state(saved: Any, path: str) -> None:
    """A model's saved state is a mapping of names to tensors; anything else would fail deep inside torch."""
    if not isinstance(saved, Mapping):
        raise CorruptCheckpointError(path, f"the saved model state is a {type(saved).__name__}, not a state dict")
    for name, value in saved.items():
        if is_extra_state(name):  # a module's get_extra_state(): any value, given to its set_extra_state
            continue
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(
                path, f"the saved model state holds a {type(value).__name__} under {name!r:.80}, not a tensor"
            )


def _int_state_keys(saved: Any) -> Any:
    """An optimizer state saved through DCP has its per-parameter keys as strings ("0"): back to the ints
    its param_groups use, so the live optimizer finds them (torch would ignore them silently)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return saved
    state = saved["state"]
    if not state or not all(isinstance(k, str) and k.isdigit() for k in state):
        return saved
    ids = {p for g in saved.get("param_groups", []) if isinstance(g, dict) for p in g.get("params", [])}
    if not all(int(k) in ids for k in state):
        return saved
    return {**saved, "state": {int(k): v for k, v in state.items()}}


def _fqn_state_keys(saved: Any, model: Any, optimizer: Any, source: str) -> Any:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's ``get_state_dict``,
    FSDP's optimizer state dicts: ``{"state": {"fc.weight": ...}, "param_groups": [{"params": ["fc.weight"]}]}``)
    back to the position numbers ``optimizer.load_state_dict`` expects, through the model's names of the
    optimizer's own parameters. Anything else is returned unchanged (and checked as it is)."""
    if not isinstance(saved, dict) or not isinstance(model, nn.Module) or not hasattr(optimizer, "param_groups"):
        return saved
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return saved
    names = [p for g in groups for p in g.get("params", [])]
    if not names or not all(isinstance(n, str) and not n.isdigit() for n in names):
        return saved
    live = unwrap_model(model)
    by_param = {id(p): drop_compile_segments(name) for name, p in live.named_parameters(remove_duplicate=False)}
    positions: dict[str, int] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            positions.setdefault(by_param.get(id(param), f"<unnamed {len(positions)}>"), len(positions))

    def position(name: str) -> int | None:
        name = drop_compile_segments(name)
        while name not in positions and name.startswith(WRAPPER_PREFIX):  # saved from a DDP-wrapped model
            name = name[len(WRAPPER_PREFIX) :]
        return positions.get(name)

    state = saved.get("state", {})
    unknown = [n for n in [*names, *(state if isinstance(state, dict) else ())] if position(n) is None]
    if unknown:  # torch would pair them with the optimizer's parameters by position, silently
        raise StateMismatchError(
            source,
            f"the saved optimizer state names parameters this optimizer does not hold: {unknown[:5]}; nothing changed",
        )
    return {
        **saved,
        "state": {position(k): v for k, v in state.items()} if isinstance(state, dict) else state,
        "param_groups": [{**g, "params": [position(n) for n in g.get("params", [])]} for g in groups],
    }


def _apply(key: str, obj: Any, state: Any, source: str, done: list[str]) -> None:
    """``obj.load_state_dict(state)``, with a failure named (and what was restored before it)."""
    try:
        obj.load_state_dict(state)
    except Exception as exc:
        earlier = f"; already restored: {', '.join(done)}" if done else "; nothing else was modified"
        raise CorruptCheckpointError(
            source, f"the saved {key} state does not fit the {type(obj).__name__}: {type(exc).__name__}: {exc}{earlier}"
        ) from exc
    done.append(key)


@gc_paused
def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    components: Mapping[str, Any] | None = None,
    rng: bool = True,
    map_location: MapLocation = "cpu",
    strict: bool = True,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    per_rank: Mapping[str, Any] | None = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """Restore the given objects in place from a checkpoint and return the remaining state.

    ``path`` is a torchkeep checkpoint directory, or a file written by ``torch.save`` the way the
    tutorials do (``{'epoch', 'model_state_dict', 'optimizer_state_dict', ...}``) or by
    Lightning (``state_dict``, ``optimizer_states``, ``lr_schedulers``...), a folder written by
    Accelerate's ``save_state`` (its model, optimizer, scheduler, scaler and this rank's generators; the
    ``step`` and registered objects are returned), a torch.distributed.checkpoint directory, or weights
    alone (safetensors, Hugging Face folders), read without running code unless ``trusted=True``; or a
    checkpoint at a URL written by :func:`save_checkpoint` (``s3://...``, ``storage_options`` for fsspec).

    Everything is read, verified and matched before any object is modified: with
    ``strict=True`` a mismatch raises and leaves every object as it was. ``map_location`` (the forms
    :func:`torchkeep.load` takes) is checked before anything is read and applied to every kind of input.

    A checkpoint saved by several ranks loads with any number of ranks (every rank calls this; the
    process group is the initialised default one, or ``process_group``), or in one process:
    sharded tensors are resharded through torch.distributed.checkpoint. Each rank's RNG and
    ``per_rank`` state come back exactly when the world size is the one saved; otherwise the RNG
    is re-derived from the saved state and the new rank, and asking for ``per_rank`` objects raises.

    Returns:
        The plain values saved with the checkpoint (``epoch``, ``loss``, ...), and this rank's own
        ``per_rank`` plain values when the world size is unchanged.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: as for :func:`torchkeep.load`.
        LoadMismatchError: a model does not match (strict), or an object was not saved.
        StateMismatchError: an optimizer whose parameter groups differ from the saved ones (a ValueError).
        InvalidDeviceError, TypeError: a malformed or unavailable ``map_location``.
        DistributedError: on every rank, when a rank failed or the world size cannot restore ``per_rank``.
    """
    place = placer(map_location)  # a bad map_location is the caller's error: raised before any file is read
    source = os.fspath(path)
    saved_rng: SavedState | None = None
    foreign_rng: dict[str, Any] | None = None  # generators saved by another library, in torchkeep's form
    loaded: LoadedCheckpoint | None = None
    saved: dict[str, Any]
    user_state: dict[str, Any]
    if Path(path).is_file() and detect_kind(source) in ("safetensors", "unknown"):
        saved, user_state = {"model": load(source, trusted=trusted)}, {}
    elif Path(path).is_file():
        saved, user_state = _legacy_objects(source, trusted=trusted)
    elif is_dcp_dir(path) and not is_checkpoint_dir(path):
        saved, user_state = split_legacy(read_dcp(path))
    elif Path(path).is_dir() and not is_checkpoint_dir(path) and is_accelerate_state(path):
        from torchkeep.distributed.group import active_group

        group = active_group(process_group)
        saved, user_state, foreign_rng = read_accelerate_state(
            Path(path), rank=group.rank if group is not None else 0, trusted=trusted
        )
    elif Path(path).is_dir() and not is_checkpoint_dir(path) and not (Path(path) / TENSORS_FILE).exists():
        # a weights folder (Hugging Face layouts); a tensor file without a manifest is a damaged checkpoint
        saved, user_state = {"model": load(source, trusted=trusted)}, {}
    else:
        loaded = read_checkpoint(path, map_location=map_location, storage_options=storage_options)
        source = loaded.path
        objects = loaded.objects
        saved = {k: v for k, v in objects.items() if k not in ("components", "rng")}
        saved.update({f"components.{k}": v for k, v in objects.get("components", {}).items()})
        saved = {k: SavedState(v, loaded) for k, v in saved.items()}
        if objects.get("rng") is not None:
            saved_rng = SavedState(objects["rng"], loaded)
        user_state = loaded.state()
    if loaded is None and not on_cpu(map_location):  # read to the CPU; a torchkeep checkpoint placed them itself
        saved, user_state = place_all(saved, place), place_all(user_state, place)
    if loaded is not None and "distributed" in loaded.manifest:
        from torchkeep.distributed.load import load_distributed

        return load_distributed(
            loaded,
            wanted_objects(model, optimizer, scheduler, scaler, components),
            per_rank=per_rank,
            rng=rng,
            strict=strict,
            process_group=process_group,
            storage_options=storage_options,
        )
    if per_rank:
        raise ValueError(f"{source} was saved by one process: it holds no per_rank state; pass per_rank=None")
    restore = prepare_restore(source, saved, wanted_objects(model, optimizer, scheduler, scaler, components), strict)
    rng_state = (saved_rng.decode() if saved_rng is not None else foreign_rng) if rng else None
    if rng_state is not None:
        check_rng(rng_state, source=source)
    elif rng and optimizer is not None:  # a resume: say why it cannot repeat an uninterrupted run exactly
        warn(
            f"{source}: holds no random generator state, so random streams (dropout, shuffling) go on from this "
            "process's and the resumed run will not repeat an uninterrupted one exactly (torchkeep.save_checkpoint "
            "saves them); pass rng=False to say so and silence this"
        )
    restore.apply()
    if rng_state is not None:
        restore_rng(rng_state, source=source)
    return dict(user_state)


def wanted_objects(
    model: nn.Module | None, optimizer: Any, scheduler: Any, scaler: Any, components: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The objects a load restores, by their key in the checkpoint."""
    wanted: dict[str, Any] = {
        name: obj
        for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler))
        if obj is not None
    }
    for name, obj in (components or {}).items():
        wanted[f"components.{name}"] = obj
    return wanted


@dataclass
class Restore:
    """Objects matched against their saved state and checked; nothing is modified until :meth:`apply`."""

    source: str
    states: list[tuple[str, Any, Any]]
    models: list[PendingLoad]

    def apply(self) -> None:
        # Objects whose own load_state_dict may still refuse go first: a refusal then leaves the
        # models untouched. Models were matched and cannot fail.
        done: list[str] = []
        for key, obj, state in self.states:
            _apply(key, obj, state, self.source, done)
        for pending in self.models:
            pending.apply()


def prepare_restore(source: str, saved: Mapping[str, Any], wanted: Mapping[str, Any], strict: bool) -> Restore:
    """Match every wanted object to its saved state (``SavedState`` nodes or plain values); touches nothing.

    Raises:
        LoadMismatchError: (strict) an object was not saved, or a model does not match.
        StateMismatchError, CorruptCheckpointError: saved state that cannot fit its object.
    """
    absent = [key for key in wanted if saved.get(key) is None]
    if absent:
        names = ", ".join(_object_name(key) for key in absent)
        it, it_is = ("it", "it is") if len(absent) == 1 else ("them", "they are")
        held = ", ".join(_object_name(key) for key in saved if saved[key] is not None) or "none of them"
        if strict:
            raise LoadMismatchError(
                LoadReport(missing=absent, source=source),
                source,
                problem=f"the checkpoint holds no state for the {names} (it holds: {held}); nothing was modified. "
                f"Pass strict=False to restore the rest and leave {it} as {it_is}",
            )
        warn(f"{source}: the checkpoint holds no state for the {names}; left as {it_is}")
    restore = Restore(source, [], [])
    for key, obj in wanted.items():
        value = saved.get(key)
        if value is None:
            continue
        state = value.decode(into_model=isinstance(obj, nn.Module)) if isinstance(value, SavedState) else value
        if isinstance(obj, nn.Module):
            _check_model_state(state, f"{source} [{key}]")
            pending = match_model(obj, state, source_name=f"{source} [{key}]")
            if strict and not pending.report.ok:
                raise LoadMismatchError(pending.report, f"{source} [{key}]")
            restore.models.append(pending)
        else:
            if key == "optimizer" or hasattr(obj, "param_groups"):
                state = _fqn_state_keys(_int_state_keys(state), wanted.get("model"), obj, f"{source} [{key}]")
                check_optimizer(obj, state, f"{source} [{key}]")
                state = fit_state_shapes(obj, state, f"{source} [{key}]", wanted.get("model"), strict)
            restore.states.append((key, obj, state))
    return restore


def _object_name(key: str) -> str:
    """How the caller named an object: ``scheduler``, or ``components['ema']``."""
    return f"components[{key.removeprefix('components.')!r}]" if key.startswith("components.") else key


@dataclass
class SavedState:
    """A manifest node, decoded only when an object asks for it."""

    node: Any
    loaded: LoadedCheckpoint

    def decode(self, *, into_model: bool = False) -> Any:
        return self.loaded.decode(self.node, into_model=into_model)


def _legacy_objects(path: str, *, trusted: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a torch.save'd checkpoint dict into the objects it holds and the remaining values."""
    raw = read_raw(path, trusted=trusted)
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(path, f"holds a {type(raw).__name__}, not a checkpoint dict")
    return split_legacy(raw)


def split_legacy(raw: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{'model_state_dict': ..., 'optimizer_state_dict': ..., 'epoch': 3}`` -> objects, plain values, by the
    one classifier (weights/contents.py)."""
    objects, rest = split_objects(raw, classify(raw))
    if isinstance(objects.get("model"), Mapping):  # NumPy archives: arrays become tensors, as load gives them
        objects["model"] = {k: array_tensor(v) if isinstance(v, np.ndarray) else v for k, v in objects["model"].items()}
    return objects, rest


def checkpoint_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a checkpoint or weights: a file's size, or every file under a folder (subfolders
    too, as a distributed checkpoint's parts); 0 for nothing there. A file gone meanwhile counts 0."""
    root = Path(path)
    if not root.is_dir():
        with contextlib.suppress(OSError):
            return root.stat().st_size
        return 0
    total = 0
    for file in root.rglob("*"):
        with contextlib.suppress(OSError):
            total += file.stat().st_size if file.is_file() else 0
    return total
