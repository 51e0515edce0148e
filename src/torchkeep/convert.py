"""torchkeep.convert: any readable file to the safe formats, checked bit for bit."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkeep.checkpoint.io import read_checkpoint, save_checkpoint, split_legacy
from torchkeep.checkpoint.layout import SaveRequest
from torchkeep.errors import CorruptCheckpointError
from torchkeep.weights.contents import classify
from torchkeep.weights.legacy import detect_kind, extract_state_dict, read_raw
from torchkeep.weights.load import load
from torchkeep.weights.save import save

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ConvertReport:
    """What a conversion wrote and checked."""

    source: str
    destination: str
    kind: str  # "weights" or "checkpoint"
    tensors: int
    nbytes: int

    def __str__(self) -> str:
        return (
            f"{self.source} -> {self.destination}: {self.kind}, {self.tensors} tensors "
            f"({self.nbytes / 1e6:.1f} MB), every tensor verified bit-identical"
        )


class _Frozen:
    """A saved state dict, offered to save_checkpoint as an object with ``state_dict()``."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    flat_a, flat_b = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    return bool(torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8)))


def _check(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], dst: str, progress: Progress | None
) -> int:
    total = sum(t.numel() * t.element_size() for t in expected.values())
    done = 0
    for key, tensor in expected.items():
        if key not in got or not _same(tensor, got[key]):
            raise CorruptCheckpointError(dst, "converted tensor differs from the source", key=key)
        done += tensor.numel() * tensor.element_size()
        if progress is not None:
            progress(done, total)
    return total


def _is_training_checkpoint(raw: Any) -> bool:
    """A dict holding an optimizer, scheduler or scaler beside its weights (the one classifier decides)."""
    if not isinstance(raw, dict):
        return False
    return any(p.role in ("optimizer", "scheduler", "scaler") for p in classify(raw).parts)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    trusted: bool = False,
    progress: Progress | None = None,
    config: Any = None,
    max_shard_size: int | str | None = None,
    sharded: bool = False,
    key: str | None = None,
) -> ConvertReport:
    """Convert ``src`` (any format torchkeep reads) to safetensors or a torchkeep checkpoint.

    A ``dst`` ending in ``.safetensors`` gets the model weights. Any other ``dst`` is a folder:
    a pickled whole model (``torch.save(model)``, needs ``trusted=True``) becomes a
    :func:`torchkeep.save_model` directory (``config`` as for save_model); a training checkpoint
    (optimizer, scheduler, epoch...) becomes a torchkeep checkpoint directory keeping all of it;
    plain weights become ``dst/model.safetensors``. Every tensor is read back and compared bit
    for bit with the source.

    A checkpoint saved by several ranks (or any DCP folder) gives its model's weights reassembled:
    see :func:`consolidate`. ``sharded=True`` goes the other way: ``src``'s weights become a
    checkpoint folder whose tensors are in torch.distributed.checkpoint files, which any number of
    ranks loads straight into an FSDP2 / tensor-parallel model (``load_checkpoint(dst, model=...)``,
    each rank reading only its shards), in one process, without a process group.

    Args:
        trusted: allow full unpickling of ``src`` (runs its code): only for files you vouch for.
        progress: called with (bytes checked, total bytes) while verifying.
        max_shard_size: for weights written to a folder: the Hugging Face sharded layout.
        sharded: write ``dst`` as a sharded (DCP) checkpoint of ``src``'s weights.
        key: for a checkpoint dict holding several sets of weights, which to convert (as
            :func:`torchkeep.load` takes it: ``key="state_dict_ema"``); the weights alone are written.

    Raises:
        UnsafeCheckpointError: ``src`` needs code to run and ``trusted`` is False.
        CorruptCheckpointError: ``src`` is damaged, or the written copy differs.
    """
    source, target = os.fspath(src), Path(dst)
    pickled = Path(source).is_file() and detect_kind(source) in ("torch", "npy", "npz")
    raw = read_raw(source, trusted=trusted) if pickled else None
    if sharded:
        weights = extract_state_dict(raw, source, key) if pickled else load(source, key=key)
        return _write_sharded(weights, source, target, progress)
    if isinstance(raw, nn.Module) and not target.name.endswith(".safetensors"):
        return _convert_whole_model(raw, source, target, config, progress)
    if (
        key is not None
        or target.name.endswith(".safetensors")
        or max_shard_size is not None
        or not _is_training_checkpoint(raw)
    ):
        weights = extract_state_dict(raw, source, key) if pickled else load(source, key=key)
        save(weights, target, max_shard_size=max_shard_size)
        nbytes = _check(weights, load(target), str(target), progress)
        return ConvertReport(source, str(target), "weights", len(weights), nbytes)

    if not isinstance(raw, dict):  # _is_training_checkpoint said it is one
        raise CorruptCheckpointError(source, "not a checkpoint dict")
    objects, rest = split_legacy(raw)
    frozen: dict[str, Any] = {name: _Frozen(state) for name, state in objects.items()}
    reserved = {"path", "model", "optimizer", "scheduler", "scaler", "components", "rng"}
    plain = {str(k): v for k, v in rest.items() if str(k) not in reserved}
    clashing = {str(k): v for k, v in rest.items() if str(k) in reserved}
    if clashing:
        plain["extra"] = clashing  # names save_checkpoint keeps for its own arguments
    save_checkpoint(target, rng=False, **frozen, **plain)
    written = read_checkpoint(target)
    saved = {name: written.decode(written.objects[name]) for name in objects}
    nbytes = _check(_flatten(objects), _flatten(saved), str(target), progress)
    return ConvertReport(source, str(target), "checkpoint", len(written.decoder.tensors), nbytes)


def consolidate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ConvertReport:
    """A distributed checkpoint's model as one ``.safetensors`` file, or a (sharded) Hugging Face folder.

    ``src`` is a checkpoint saved by several ranks (its sharded tensors reassembled from every
    rank's DCP files; a folder or a URL, ``storage_options`` for fsspec), or a plain
    torch.distributed.checkpoint folder. Runs in one process, without
    a process group; every file is verified against the manifest's checksums first, DCP's metadata is
    read without ``pickle``, and the written weights are compared bit for bit with the source.

    Example:
        >>> torchkeep.consolidate("runs/1/step-00001000", "model.safetensors")
    """
    source, target = os.fspath(src), Path(dst)
    weights = load(source, storage_options=storage_options)
    save(weights, target, max_shard_size=max_shard_size)
    nbytes = _check(weights, load(target), str(target), progress)
    return ConvertReport(source, str(target), "weights", len(weights), nbytes)


def _write_sharded(
    weights: Mapping[str, torch.Tensor], source: str, target: Path, progress: Progress | None
) -> ConvertReport:
    """Weights -> a checkpoint whose every tensor is in DCP files (world size 1), checked bit for bit."""
    from torchkeep.distributed.group import SoloGroup
    from torchkeep.distributed.plan import plan_distributed
    from torchkeep.distributed.save import save_distributed

    frozen = _Frozen(dict(weights))

    def make_plan() -> Any:
        return plan_distributed(SaveRequest(model=frozen, rng=False), shard_everything=True)  # type: ignore[arg-type]

    save_distributed(target, make_plan, SoloGroup())
    nbytes = _check(weights, load(target), str(target), progress)
    return ConvertReport(source, str(target), "sharded checkpoint", len(weights), nbytes)


def _flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested structure, by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}/{key}"))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            out.update(_flatten(value, f"{prefix}[{index}]"))
    return out


def _convert_whole_model(
    model: nn.Module, source: str, target: Path, config: Any, progress: Progress | None
) -> ConvertReport:
    """A pickled model object to a save_model directory, rebuilt and compared with the original."""
    from torchkeep.model.io import load_model, save_model

    save_model(model, target, config=config)
    rebuilt = load_model(target, cls=type(model), eval=not model.training)
    if repr(rebuilt) != repr(model):
        raise CorruptCheckpointError(target, "the rebuilt model's structure differs from the original")
    expected = dict(model.state_dict())
    nbytes = _check(expected, dict(rebuilt.state_dict()), str(target), progress)
    return ConvertReport(source, str(target), "model", len(expected), nbytes)
