"""Restoring a checkpoint saved by N ranks on M ranks (or in one process).

- Shared state (a DDP model, schedulers, plain values) is read by every rank from the shared file.
- Sharded tensors go back through torch.distributed.checkpoint into the live model's and optimizer's
  own state dicts (``get_model_state_dict`` / ``get_optimizer_state_dict``), which DCP reshards to
  whatever the model is now: FSDP2 on M ranks, or a plain module in one process. DCP's metadata is
  read by torchkeep's checked reader, never by Python's own unpickler.
- Each rank's own state: when M == N, rank r gets rank r's RNG and ``per_rank`` state back exactly.
  Otherwise those ranks no longer exist: the RNG of each generator is re-derived from the saved rank
  0 state, the world size and the new rank (deterministic: the same resume draws the same numbers),
  per-rank plain values are not returned, and asking for ``per_rank`` objects raises.

Every check runs before anything is modified, and the ranks agree on the outcome before DCP's
collective load starts, so one rank's failure is an error on all of them rather than a hang.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from torchkeep.checkpoint.io import LoadedCheckpoint, Restore, SavedState, prepare_restore
from torchkeep.checkpoint.layout import MANIFEST_FILE
from torchkeep.checkpoint.sharded import Section, Where, layout_metadata, parse_section
from torchkeep.distributed.group import Group, active_group, no_message
from torchkeep.errors import CorruptCheckpointError, DistributedError, LoadMismatchError, StateMismatchError
from torchkeep.format.layout import digest
from torchkeep.format.pickle.dcp import dcp_metadata
from torchkeep.state.rng import check_rng, restore_rng
from torchkeep.state.values import Decoder
from torchkeep.weights.report import LoadReport, Mismatch

SHARDED_KEYS = ("model", "optimizer")


@dataclass(frozen=True)
class _Ref:
    """A sharded tensor named in the manifest, before DCP has read it."""

    key: str


@dataclass
class _Plan:
    """Everything matched and checked on this rank; applied only once every rank agrees."""

    restore: Restore
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # DCP key -> live tensor to read into
    sharded_model: Any = None  # the saved model state, with _Ref leaves
    sharded_optimizer: Any = None
    rng: dict[str, Any] | None = None  # this rank's saved generators (same world size)
    own_objects: list[tuple[str, Any, Any]] = field(default_factory=list)
    own_values: dict[str, Any] = field(default_factory=dict)
    metadata: Any = None  # DCP metadata, read safely


def verify_parts(loaded: LoadedCheckpoint, storage_options: Mapping[str, Any] | None = None) -> int:
    """Every rank's file and every DCP file of a checkpoint saved by several ranks, checked against the
    manifest (sizes and checksums); returns how many files. ``read_checkpoint`` checks the shared file.

    Raises:
        CorruptCheckpointError: a missing, truncated or changed file, naming it.
    """
    where = Where(loaded.path, storage_options)
    manifest_path = where.join(MANIFEST_FILE)
    section = parse_section(loaded.manifest, manifest_path)
    if section is None:
        return 0
    for entry in section.ranks:
        where.read_tensors(entry["file"]["name"], entry["file"]["size"])
    dcp_where = Where(where.join(section.dcp_folder), storage_options)
    for name, info in section.dcp_files.items():
        dcp_where.verify(name, info, manifest_path)
    return len(section.ranks) + len(section.dcp_files)


def load_distributed(
    loaded: LoadedCheckpoint,
    wanted: dict[str, Any],
    *,
    per_rank: Mapping[str, Any] | None,
    rng: bool,
    strict: bool,
    process_group: Any,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore ``wanted`` objects (by checkpoint key) and this rank's own state; returns the plain values."""
    where = Where(loaded.path, storage_options)
    root = loaded.path
    manifest_path = where.join(MANIFEST_FILE)
    section = parse_section(loaded.manifest, manifest_path)
    if section is None:
        raise CorruptCheckpointError(manifest_path, "is not a distributed checkpoint")
    group = active_group(process_group)
    rank, size = (group.rank, group.size) if group is not None else (0, 1)

    def prepare() -> _Plan:
        plan = _prepare(loaded, where, section, wanted, per_rank or {}, rng=rng, strict=strict, rank=rank, size=size)
        names = sorted(section.dcp_files)
        dcp_where = Where(where.join(section.dcp_folder), storage_options)
        for name in names[rank::size]:  # the ranks verify the shared files in parallel, a share each
            dcp_where.verify(name, section.dcp_files[name], manifest_path)
        return plan

    if group is None:
        plan = prepare()
    else:
        plan, _ = group.step(root, "reading and checking the checkpoint", prepare, no_message)
    if plan.targets:
        _read_sharded(root, where.dcp_reader(section.dcp_folder, plan.metadata), plan, group)
    plan.restore.apply()
    model, optimizer = wanted.get("model"), wanted.get("optimizer")
    if plan.sharded_model is not None and model is not None:
        state = _resolve(plan.sharded_model, plan.targets)
        set_model_state_dict(model, state, options=StateDictOptions(strict=strict))
    if plan.sharded_optimizer is not None and model is not None and optimizer is not None:
        set_optimizer_state_dict(model, optimizer, _resolve(plan.sharded_optimizer, plan.targets))
    for _, obj, state in plan.own_objects:
        obj.load_state_dict(state)
    if rng:
        if plan.rng is not None:
            restore_rng(plan.rng, source=str(root))
        elif section.world_size != size:
            rederive_rng(section, rank, size)
    return {**loaded.state(), **plan.own_values}


def _prepare(
    loaded: LoadedCheckpoint,
    where: Where,
    section: Section,
    wanted: dict[str, Any],
    per_rank: Mapping[str, Any],
    *,
    rng: bool,
    strict: bool,
    rank: int,
    size: int,
) -> _Plan:
    source = loaded.path
    objects = loaded.objects
    saved: dict[str, Any] = {k: SavedState(v, loaded) for k, v in objects.items() if k not in ("components", "rng")}
    saved.update({f"components.{k}": SavedState(v, loaded) for k, v in objects.get("components", {}).items()})
    sharded_keys = [k for k in SHARDED_KEYS if section.sharded and k in wanted and k in saved]
    if "optimizer" in sharded_keys and "model" not in wanted:
        raise ValueError(f"{source}: the optimizer was saved sharded; pass model= too, to place its state")
    restore = prepare_restore(source, saved, {k: v for k, v in wanted.items() if k not in sharded_keys}, strict)
    plan = _Plan(restore)
    if sharded_keys:
        _match_sharded(loaded, where, section, plan, wanted, sharded_keys, strict)
    same_world = section.world_size == size
    if per_rank and not same_world:
        raise DistributedError(
            source,
            f"saved by {section.world_size} rank(s), loaded by {size}: per_rank state {sorted(per_rank)} belonged "
            "to ranks that do not exist now and cannot be split or merged. Keep such state global (e.g. "
            "torchkeep.ResumableSampler, whose position is global), or pass per_rank=None to start it afresh",
        )
    if same_world and (rng or per_rank):
        _read_own(where, section, rank, plan, per_rank, rng=rng)
    return plan


def _match_sharded(
    loaded: LoadedCheckpoint,
    where: Where,
    section: Section,
    plan: _Plan,
    wanted: dict[str, Any],
    keys: list[str],
    strict: bool,
) -> None:
    """Pair each sharded tensor of the saved model / optimizer with the live tensor it is read into."""
    source = loaded.path
    base = loaded.decoder
    refs = Decoder(base.tensors, base.source, base.place, sharded=_Ref)
    if section.dcp_layout is not None:  # checked JSON: no unpickling at all
        plan.metadata = layout_metadata(section.dcp_layout, section.dcp_files, where.join(MANIFEST_FILE))
    elif where.remote:
        raise CorruptCheckpointError(source, "a sharded checkpoint at a URL without a layout in its manifest")
    else:
        plan.metadata = dcp_metadata(where.join(section.dcp_folder))
    shapes = {
        key: tuple(entry.size) for key, entry in plan.metadata.state_dict_metadata.items() if hasattr(entry, "size")
    }
    model = wanted["model"]
    saved_model = refs.decode(loaded.objects["model"])
    if not isinstance(saved_model, dict):
        raise CorruptCheckpointError(source, "the saved model state is not a state dict")
    live_model = get_model_state_dict(model)
    report = LoadReport(
        loaded=[k for k in live_model if k in saved_model],
        missing=[k for k in live_model if k not in saved_model],
        unexpected=[k for k in saved_model if k not in live_model],
        source=f"{source} [model]",
    )
    for name in report.loaded:
        mismatch = _pair(saved_model[name], live_model[name], name, shapes, plan.targets)
        if mismatch is not None:
            report.mismatched.append(mismatch)
    if report.mismatched or (strict and not report.ok):
        raise LoadMismatchError(report, f"{source} [model]")
    plan.sharded_model = {k: v for k, v in saved_model.items() if k in live_model}
    if "optimizer" in keys:
        saved_optimizer = refs.decode(loaded.objects["optimizer"])
        live_optimizer = get_optimizer_state_dict(model, wanted["optimizer"])
        _pair_optimizer(saved_optimizer, live_optimizer, shapes, plan.targets, f"{source} [optimizer]")
        plan.sharded_optimizer = saved_optimizer


def _pair(saved: Any, live: Any, name: str, shapes: dict[str, tuple[int, ...]], targets: dict[str, Any]) -> Any:
    """Record where a saved sharded tensor goes; a Mismatch when the shapes differ."""
    if not isinstance(saved, _Ref):
        return None  # a plain tensor or value: applied as it is
    shape = shapes.get(saved.key)
    if shape is None:
        raise CorruptCheckpointError(name, f"the sharded tensors lack {saved.key!r:.80}, which the manifest names")
    if not isinstance(live, torch.Tensor) or tuple(live.shape) != shape:
        live_shape = tuple(live.shape) if isinstance(live, torch.Tensor) else ()
        live_dtype = live.dtype if isinstance(live, torch.Tensor) else torch.float32
        return Mismatch(name, live_shape, live_dtype, shape, live_dtype)
    targets[saved.key] = live
    return None


def _pair_optimizer(saved: Any, live: Any, shapes: dict[str, Any], targets: dict[str, Any], source: str) -> None:
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CorruptCheckpointError(source, "the saved optimizer state has no 'state' dict")
    live_state = live.get("state", {})
    extra = sorted(set(saved["state"]) - set(live_state))
    if extra:
        raise StateMismatchError(
            source, f"the checkpoint holds optimizer state for parameters the model lacks: {extra[:5]}; nothing changed"
        )
    for name, entries in saved["state"].items():
        mine = live_state[name]
        if not isinstance(entries, dict):
            raise CorruptCheckpointError(source, f"the optimizer state of {name!r:.80} is not a dict")
        for slot, value in entries.items():
            mismatch = _pair(value, mine.get(slot), f"{name}.{slot}", shapes, targets)
            if mismatch is not None:
                raise StateMismatchError(
                    source, f"optimizer state {name}.{slot}: {mismatch.describe()}; nothing changed"
                )


def _resolve(node: Any, targets: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, _Ref):
        return targets[node.key]
    if isinstance(node, dict):
        return {k: _resolve(v, targets) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, targets) for v in node]
    return node


def _read_own(
    where: Where, section: Section, rank: int, plan: _Plan, per_rank: Mapping[str, Any], *, rng: bool
) -> None:
    """This rank's file, verified; its generators checked and its per-rank state matched."""
    entry = section.ranks[rank]
    manifest_path = where.join(MANIFEST_FILE)
    path = where.join(entry["file"]["name"])
    tensors = where.read_tensors(entry["file"]["name"], entry["file"]["size"])
    decoder = Decoder(tensors, manifest_path, lambda tensor, _device: tensor)
    if rng and entry.get("rng") is not None:
        state = decoder.decode(entry["rng"])
        check_rng(state, source=str(path))
        plan.rng = state
    saved_objects = entry.get("objects", {})
    if not isinstance(saved_objects, dict):
        raise CorruptCheckpointError(path, "per-rank objects are not a dict")
    for name, obj in per_rank.items():
        if hasattr(obj, "load_state_dict"):
            if name not in saved_objects:
                raise LoadMismatchError(LoadReport(missing=[f"per_rank.{name}"], source=str(path)), str(path))
            plan.own_objects.append((name, obj, decoder.decode(saved_objects[name])))
    values = decoder.decode(entry.get("state", {}))
    if isinstance(values, dict):
        plan.own_values = values


def _read_sharded(root: str, reader: Any, plan: _Plan, group: Group | None) -> None:
    """DCP's collective load of every sharded tensor into the live tensors it was paired with."""
    try:
        if group is None:
            with warnings.catch_warnings():  # torch warns that it assumes one process: that is the intent
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp_load(plan.targets, storage_reader=reader, no_dist=True)
        else:
            dcp_load(plan.targets, storage_reader=reader, process_group=group.process_group)
    except CheckpointException as exc:  # a BaseException in torch: turned into an ordinary error
        failures = getattr(exc, "failures", {}) or {}
        detail = "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
        raise DistributedError(
            root, f"torch.distributed.checkpoint.load failed: {detail or exc}", ranks=tuple(sorted(failures))
        ) from None


def rederive_rng(section: Section, rank: int, size: int) -> None:
    """Seed every generator from the saved rank-0 state, the new world size and this rank: deterministic,
    and different on each rank (used when the ranks that owned the saved generators no longer exist)."""
    saved = section.ranks[0].get("rng")
    seed = int(digest(f"{json.dumps(saved, sort_keys=True)}/{size}/{rank}".encode()), 16)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)  # every CUDA device too
