"""What a checkpoint directory holds, planned as plain data before anything is written."""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.jsondoc import check_version, expect, parse_json
from torchkeep.format.layout import digest
from torchkeep.format.names import is_plain_name
from torchkeep.state.rng import capture_rng
from torchkeep.state.tensors import PreparedTensors, prepare, state_dict_of
from torchkeep.state.values import COLLECTION_TAGS, Encoder

FORMAT_NAME = "torchkeep.checkpoint"
FORMAT_VERSION = 1
# Incremental checkpoints (shared tensor objects) are version 2, so an older reader says to upgrade.
SHARED_VERSION = 2
# Checkpoints saved by several ranks (per-rank files, sharded tensors in DCP files) are version 3.
DISTRIBUTED_VERSION = 3
# Values of dict types that keep their class (OrderedDict, Counter, defaultdict: state/values.py) are version 4.
COLLECTIONS_VERSION = 4
READ_VERSION = COLLECTIONS_VERSION  # the newest version this torchkeep reads
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
CHECKSUM_KEY = "xxh3_64"
# The only files a save writes into a checkpoint folder: a save replaces (and retention deletes) nothing
# else. Saves from several ranks add each rank's file and DCP's (its metadata, its per-rank data files).
OWN_FILES = frozenset({MANIFEST_FILE, TENSORS_FILE, ".metadata"})
OWN_PATTERN = re.compile(r"^(rank-\d{5}\.safetensors|__\d+_\d+\.distcp)$")
DCP_TEMPORARY = ".metadata.tmp"  # DCP writes its metadata under this name first


def is_checkpoint_file(name: str) -> bool:
    """Whether a save writes a file of this name into a checkpoint folder (DCP's temporary included)."""
    return name in OWN_FILES or name == DCP_TEMPORARY or OWN_PATTERN.match(name) is not None


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()``: optimizers, schedulers, your objects."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class CheckpointPlan:
    """Everything one checkpoint will hold: the manifest (JSON) and the tensors it refers to."""

    manifest: dict[str, Any]
    tensors: PreparedTensors = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.tensors.nbytes


@dataclass(frozen=True)
class SaveRequest:
    """What a save was asked to keep: the objects with state dicts, the RNG flag, plain values, and (with
    several ranks) each rank's own state. Planned by :func:`plan_checkpoint` or ``plan_distributed``."""

    model: nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    components: Mapping[str, Any] | None = None
    rng: bool = True
    state: Mapping[str, Any] = field(default_factory=dict)
    per_rank: Mapping[str, Any] | None = None

    def objects(self) -> list[tuple[str, Any]]:
        """The four named objects that were given, by their key in the manifest."""
        named = (("model", self.model), ("optimizer", self.optimizer), ("scheduler", self.scheduler))
        return [(name, obj) for name, obj in (*named, ("scaler", self.scaler)) if obj is not None]


def object_state(obj: Any) -> dict[str, Any]:
    """A module's unwrapped state dict, or any Stateful's ``state_dict()``."""
    if isinstance(obj, nn.Module):
        return state_dict_of(obj, values=True)  # a module's extra state is kept, whatever it is
    if not isinstance(obj, Stateful):
        raise TypeError(f"{type(obj).__name__} has no state_dict()/load_state_dict(); it cannot be checkpointed")
    return _as_state(obj.state_dict())  # type: ignore[no-any-return]


def _as_state(state: Any) -> Any:
    """An object's state dict as a plain dict: ``load_state_dict`` takes any mapping, and a module's
    ``OrderedDict`` would otherwise be kept as one (a version-4 manifest an older torchkeep cannot read)."""
    return dict(state) if type(state) is collections.OrderedDict else state


def plan_checkpoint(
    request: SaveRequest,
    *,
    info: Mapping[str, Any] | None = None,
    encoder: Encoder | None = None,
    states: Mapping[str, Any] | None = None,
    rng: bool | None = None,
) -> CheckpointPlan:
    """Gather and encode the state of every object of ``request``; nothing is written.

    ``encoder`` may route some tensors elsewhere (sharded ones, to DCP); ``states`` holds state dicts
    already taken (by name: "model", "optimizer"), used instead of calling ``state_dict()``; ``rng``
    overrides the request's (a distributed save keeps each rank's generators apart).
    """
    from torchkeep import __version__

    encoder = encoder or Encoder()
    taken = states or {}
    objects: dict[str, Any] = {}
    for name, obj in request.objects():
        objects[name] = encoder.encode(_as_state(taken[name]) if name in taken else object_state(obj), name)
    if request.components:
        objects["components"] = {
            name: encoder.encode(object_state(obj), f"components.{name}") for name, obj in request.components.items()
        }
    if request.rng if rng is None else rng:
        objects["rng"] = encoder.encode(capture_rng(), "rng")
    user_state = encoder.encode(dict(request.state), "")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "torch": torch.__version__,
        "torchkeep": __version__,
        "created": time.time(),
        "info": encoder.encode(dict(info or {}), "info"),
        "objects": objects,
        "state": user_state,
    }
    return CheckpointPlan(manifest=manifest, tensors=prepare(encoder.tensors, keep_devices=True))


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def manifest_bytes(manifest: Mapping[str, Any], tensors_file: Mapping[str, Any]) -> bytes:
    """The manifest file: canonical JSON plus a checksum of everything else in it."""
    body = dict(manifest, tensors_file=dict(tensors_file))
    canonical = _canonical(body)
    # The least version whose readers know every tag in it: one of those tags can only stand as a key.
    if any(f'"{tag}":'.encode() in canonical for tag in COLLECTION_TAGS):
        body["version"] = max(int(body.get("version", FORMAT_VERSION)), COLLECTIONS_VERSION)
        canonical = _canonical(body)
    body[CHECKSUM_KEY] = digest(canonical)
    return json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"


def parse_manifest(raw: bytes, path: str) -> dict[str, Any]:
    """A validated manifest: JSON, the right format and version, an intact checksum, the expected fields.

    Raises:
        CorruptCheckpointError: anything else, naming the file; a newer format says to upgrade.
    """
    body = parse_json(raw, path, "manifest")
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(path, "not a torchkeep checkpoint manifest")
    check_version(path, "checkpoint", body.get("version"), READ_VERSION)
    recorded = body.pop(CHECKSUM_KEY, None)
    if recorded != digest(_canonical(body)):
        raise CorruptCheckpointError(path, "manifest checksum mismatch: the manifest is damaged")
    tensors_file = body.get("tensors_file")
    if not isinstance(tensors_file, dict):
        raise CorruptCheckpointError(path, "manifest has no tensors_file record")
    size = tensors_file.get("size")
    expect(type(size) is int and size >= 0, path, f"manifest records an invalid tensor file size {size!r}")
    expect(
        is_plain_name(tensors_file.get("name")),
        path,
        f"manifest names tensor file {tensors_file.get('name')!r}, not a plain file name inside its folder",
    )
    for key in ("objects", "info"):
        expect(isinstance(body.get(key, {}), dict), path, f"manifest field {key!r} is not an object")
    expect(
        isinstance(body.get("objects", {}).get("components", {}), dict),
        path,
        "manifest field 'objects.components' is not an object",
    )
    return body
