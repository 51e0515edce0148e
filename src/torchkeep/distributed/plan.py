"""What one rank contributes to a distributed checkpoint, planned as data before anything is written.

Three parts, kept apart:

- the **shared** state (replicated on every rank: a DDP model, its optimizer, schedulers, plain values),
  planned on every rank like a single-process checkpoint and written by rank 0 alone;
- the **sharded** tensors (DTensors of FSDP2 / tensor-parallel models and their optimizer state), taken
  through ``torch.distributed.checkpoint.state_dict.get_state_dict`` (fully-qualified names, so any
  world size can load them) and written by every rank in parallel through DCP; the shared manifest
  refers to each by a ``{"$dcp": key}`` node;
- each rank's **own** state (its RNG generators, ``per_rank`` objects and values), written by that rank
  under a rank-unique name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchkeep.checkpoint.background import StagingBuffers
from torchkeep.checkpoint.layout import (
    DISTRIBUTED_VERSION,
    CheckpointPlan,
    SaveRequest,
    Stateful,
    object_state,
    plan_checkpoint,
)
from torchkeep.state.rng import capture_rng
from torchkeep.state.tensors import PreparedTensors, prepare
from torchkeep.state.values import Encoder, Json

RANK_FILE = "rank-{rank:05d}.safetensors"


def is_sharded(model: Any) -> bool:
    """True when the model's parameters are DTensors (FSDP2 ``fully_shard``, tensor parallel)."""
    if not isinstance(model, nn.Module):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedEncoder(Encoder):
    """An encoder that sends DTensors to DCP (by key) and every other tensor to the shared file."""

    def __init__(self, *, everything: bool = False) -> None:
        super().__init__()
        self.sharded: dict[str, torch.Tensor] = {}
        self.everything = everything  # plain tensors too (weights converted for sharded loading)

    def _tensor(self, value: torch.Tensor, where: str) -> Json:
        from torch.distributed.tensor import DTensor

        if not (self.everything or isinstance(value, DTensor)):
            return super()._tensor(value, where)
        key = where or "value"
        n = 2
        while key in self.sharded:
            key, n = f"{where}#{n}", n + 1
        self.sharded[key] = value
        return {"$dcp": key}


@dataclass(frozen=True)
class RankPlan:
    """One rank's own state: a JSON node and the tensors it names."""

    node: dict[str, Json]
    tensors: PreparedTensors = field(repr=False)


@dataclass(frozen=True)
class DistributedPlan:
    shared: CheckpointPlan
    sharded: dict[str, torch.Tensor] = field(repr=False)  # key -> DTensor, written through DCP
    own: RankPlan


def plan_distributed(
    request: SaveRequest, *, info: Mapping[str, Any] | None = None, shard_everything: bool = False
) -> DistributedPlan:
    """Gather and encode this rank's part of a distributed checkpoint; nothing is written.

    ``shard_everything``: every tensor goes to DCP (weights written offline for sharded loading).
    """
    states: dict[str, Any] = {}
    model, optimizer = request.model, request.optimizer
    if model is not None and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer if optimizer is not None else [])
        states["model"] = model_state
        if optimizer is not None:
            states["optimizer"] = optimizer_state
    encoder = ShardedEncoder(everything=shard_everything)
    # each rank's generators are its own state, kept apart from the shared manifest
    shared = plan_checkpoint(request, info=info, encoder=encoder, states=states, rng=False)
    manifest = dict(shared.manifest, version=DISTRIBUTED_VERSION)
    own = plan_own(request.rng, request.per_rank)
    return DistributedPlan(CheckpointPlan(manifest, shared.tensors), encoder.sharded, own)


def plan_own(rng: bool, per_rank: Mapping[str, Any] | None) -> RankPlan:
    """This rank's generators, ``per_rank`` objects (anything with ``state_dict()``) and plain values."""
    encoder = Encoder()
    node: dict[str, Json] = {}
    if rng:
        node["rng"] = encoder.encode(capture_rng(), "rng")
    objects = {name: v for name, v in (per_rank or {}).items() if isinstance(v, (Stateful, nn.Module))}
    values = {name: v for name, v in (per_rank or {}).items() if name not in objects}
    node["objects"] = {name: encoder.encode(object_state(obj), f"per_rank.{name}") for name, obj in objects.items()}
    node["state"] = encoder.encode(values, "per_rank")
    return RankPlan(node, prepare(encoder.tensors))


def snapshot(buffers: StagingBuffers, plan: DistributedPlan) -> DistributedPlan:
    """A plan that no longer shares memory with the live state: every tensor of every part (each DTensor's
    local shard) copied into reused staging buffers, the manifests deep-copied."""
    from torch.distributed.tensor import DTensor

    shared, own = plan.shared.tensors, plan.own.tensors
    local = {key: t.to_local() if isinstance(t, DTensor) else t for key, t in plan.sharded.items()}
    staged = buffers.stage(
        {
            **{f"shared/{k}": v for k, v in shared.tensors.items()},
            **{f"own/{k}": v for k, v in own.tensors.items()},
            **{f"sharded/{k}": v for k, v in local.items()},
        }
    )
    sharded: dict[str, torch.Tensor] = {}
    for key, tensor in plan.sharded.items():
        copy_ = staged[f"sharded/{key}"]
        if isinstance(tensor, DTensor):
            copy_ = DTensor.from_local(
                copy_, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape,
                stride=tensor.stride(),
            )  # fmt: skip
        sharded[key] = copy_
    return DistributedPlan(
        CheckpointPlan(
            copy.deepcopy(plan.shared.manifest),
            PreparedTensors({k: staged[f"shared/{k}"] for k in shared.tensors}, dict(shared.aliases)),
        ),
        sharded,
        RankPlan(
            copy.deepcopy(plan.own.node),
            PreparedTensors({k: staged[f"own/{k}"] for k in own.tensors}, dict(own.aliases)),
        ),
    )
