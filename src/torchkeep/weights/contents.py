"""What a pickled checkpoint holds, told from its structure alone: the one classifier of its parts, shared by
``load``, ``load_raw``, ``inspect``, ``convert`` and ``load_checkpoint``; FORMAT.md states the same rules.

``inspect`` reads a file with :func:`read_torch_file`'s ``read_limit`` (weights stay on the meta device;
scalars such as a loss saved as a tensor are read). Each top-level entry gets a role, first match wins:

1. a mapping with ``state`` and ``param_groups``: ``optimizer``;
2. weights (:func:`is_weights`: string keys to tensors or arrays of numbers, and modules' extra states under
   ``..._extra_state`` keys, not a lone generator state): ``weights``;
   also a mapping that holds weights under one of ``STATE_DICT_KEYS`` (nested one level: ``key/inner``);
3. a mapping with ``last_epoch`` / ``base_lrs`` / ``_last_lr``: ``scheduler``;
4. a mapping with ``scale`` and ``growth_factor`` (or ``_growth_tracker``): ``scaler`` (GradScaler);
5. a uint8 tensor of 5056 bytes (a CPU generator), or a key naming RNG state (``rng``, ``random`` or ``seed``
   in it) whose value is not a plain number (a seed saved as an int is a value): ``rng``;
6. an empty mapping under one of ``OBJECT_KEYS``' names: that object (a disabled GradScaler saves ``{}``);
7. a list of optimizers or of schedulers (Lightning's ``optimizer_states``, ``lr_schedulers``): that role;
8. a number, string, bool, None or a one-element tensor: ``value``; another tensor or array of numbers:
   ``tensor``; else ``other`` (an array of strings, objects or dates: no tensor can hold it).

The model's weights are the ``weights`` part whose key comes first in ``STATE_DICT_KEYS`` (then file order);
``load`` says which it took when there are several, and ``key=`` picks another. With no weights part, loose
top-level tensors are the weights. Two parts of one role (two optimizers): the name first in ``OBJECT_KEYS``.

The file's layout: ``state dict``, ``optimizer state``, ``scheduler state``, ``scaler state`` (a
GradScaler's) or ``RNG state`` when the whole object is one (``load_checkpoint(path, optimizer=...)``,
``scheduler=``, ``scaler=`` restore the first three); ``Lightning checkpoint`` when it has ``state_dict``
and ``pytorch-lightning_version`` or ``global_step``; ``training checkpoint`` when it holds weights or an
optimizer beside other entries; ``RNG state`` when it holds generators and plain values only (Accelerate's
``random_states_0.pkl``); ``state dict with other values`` for loose tensors beside values; else ``object``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torchkeep.errors import TorchkeepError
from torchkeep.format.dtypes import dtype_name
from torchkeep.state import torch_ao
from torchkeep.state.keys import is_extra_state

READ_LIMIT = 64  # bytes: a storage up to this size is read (scalars, steps); larger ones stay meta
CPU_RNG_STATE_BYTES = 5056  # torch.get_rng_state()'s size
_SCHEDULER_KEYS = ("last_epoch", "base_lrs", "_last_lr")
_RNG_WORDS = ("rng", "random", "seed")  # rng_state, random_state, torch_manual_seed (Accelerate)
# Where checkpoint layouts keep the model's weights, in order of preference: the tutorials', Lightning's and
# timm's (state_dict), accelerate/DeepSpeed (module), common variants; EMA weights last (a file with both
# is read for its trained weights unless key= asks for the EMA).
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "state_dict_ema",
    "model_ema",
    "ema",
)
# The names under which dict checkpoints (the tutorials', Lightning's, timm's) keep each training object:
# a tie-breaker between parts of the same role, and the role of an empty state (a disabled GradScaler's {}).
OBJECT_KEYS: dict[str, tuple[str, ...]] = {
    "optimizer": ("optimizer_state_dict", "optimizer", "optimizer_states", "optim"),
    "scheduler": ("scheduler_state_dict", "scheduler", "lr_scheduler", "lr_schedulers"),
    "scaler": ("scaler_state_dict", "scaler", "grad_scaler", "amp_scaling_state", "amp_scaler", "amp"),
}

# Layouts where the whole file is one training object's state, by the name load_checkpoint restores it as.
_WHOLE_OBJECT = {"optimizer state": "optimizer", "scheduler state": "scheduler", "scaler state": "scaler"}


@dataclass(frozen=True)
class Part:
    """One top-level entry of a checkpoint: where it is, what it is, and its description."""

    key: str
    role: str  # weights | optimizer | scheduler | scaler | rng | value | other
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "role": self.role, "summary": self.summary, "detail": self.detail}


@dataclass(frozen=True)
class Contents:
    layout: str
    weights_key: str | None  # where the model's weights are ("" for the whole object); None: no weights
    parts: list[Part]

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "weights_key": self.weights_key, "parts": [p.to_dict() for p in self.parts]}

    def lines(self) -> list[str]:
        head = f"holds: {self.layout}" + (
            f", model weights under {self.weights_key!r}" if self.weights_key else
            (", model weights at the top level" if self.weights_key == "" else "")
        )  # fmt: skip
        out = [head]
        for part in self.parts:
            out.append(f"  {part.key} [{part.role}]: {part.summary}")
            for group in part.detail.get("param_groups", []):
                hyper = ", ".join(f"{k}={_plain(v)}" for k, v in group.items() if k != "params")
                out.append(f"    param group: {group.get('params')} params; {hyper}")
        return out


def holds_numbers(value: Any) -> bool:
    """A tensor, or a NumPy array of a dtype torch holds (numbers, bool); not strings, objects or dates."""
    return isinstance(value, torch.Tensor) or (isinstance(value, np.ndarray) and _torch_dtype(value.dtype) is not None)


@functools.lru_cache(maxsize=256)  # bounded: a hostile file may name many record dtypes
def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype | None:
    """The torch dtype an array of ``dtype`` becomes; None for what no tensor holds."""
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:  # strings, bytes, objects, dates, structured records, float128...
        return None


def array_tensor(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """An array that :func:`holds_numbers` as a tensor: its memory when contiguous and in native byte order,
    else a copy (torch converts no byte order)."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


def is_weights(value: Any) -> bool:
    """Named tensors (a state dict): string keys, tensors or arrays of numbers; not a lone generator state."""
    if not isinstance(value, Mapping) or not value:
        return False
    if not all(
        isinstance(k, str) and (holds_numbers(v) or torch_ao.is_entry(k, v) or is_extra_state(k))
        for k, v in value.items()
    ):
        return False
    if all(is_extra_state(k) for k in value):  # a module's get_extra_state() alone is not weights
        return False
    if len(value) == 1:
        ((key, only),) = value.items()
        return not (_is_cpu_rng(only) or any(w in key.lower() for w in _RNG_WORDS))
    return True


def classify(obj: Any) -> Contents:
    """The layout of ``obj`` (a file's object, tensors possibly on the meta device) and each part's role."""
    if is_weights(obj):
        return Contents("state dict", "", [_weights("(all)", obj)])
    if _is_cpu_rng(obj):
        return Contents("RNG state", None, [Part("(all)", "rng", _short(obj))])
    if not isinstance(obj, Mapping):
        return Contents("object", None, [Part("(all)", "other", _short(obj))])
    if _is_optimizer(obj):
        return Contents("optimizer state", None, [_optimizer("(all)", obj)])
    if any(k in obj for k in _SCHEDULER_KEYS):
        return Contents("scheduler state", None, [_scheduler("(all)", obj)])
    if _is_scaler(obj):
        return Contents("scaler state", None, [_scaler("(all)", obj)])
    parts = [_part(str(key), value) for key, value in obj.items()]
    candidates = weights_candidates(parts)
    weights_key = candidates[0] if candidates else ("" if any(p.role == "tensor" for p in parts) else None)
    if "state_dict" in obj and ("pytorch-lightning_version" in obj or "global_step" in obj):
        layout = "Lightning checkpoint"
    elif any(p.role in ("weights", "optimizer") for p in parts):
        layout = "training checkpoint"
    elif any(p.role == "rng" for p in parts) and all(p.role in ("rng", "value") for p in parts):
        layout = "RNG state"
    elif weights_key == "":
        layout = "state dict with other values"
    else:
        layout = "object"
    return Contents(layout, weights_key, parts)


def weights_candidates(parts: list[Part]) -> list[str]:
    """Every place ``obj`` holds weights (``key``, or ``key/inner`` one level down), the preferred first."""
    found = [p.detail.get("path", p.key) for p in parts if p.role == "weights"]
    rank = {key: i for i, key in enumerate(STATE_DICT_KEYS)}
    return sorted(found, key=lambda path: (rank.get(path.split("/")[-1], len(rank)), found.index(path)))


def weights_at(obj: Any, contents: Contents, key: str | None = None) -> Mapping[str, Any] | None:
    """The weights at ``key`` (``outer/inner`` one level down), or where ``contents`` found them; None if none."""
    where = contents.weights_key if key is None else key
    if where is None:
        return None
    if where == "":
        if contents.layout == "state dict":
            return dict(obj)
        return {p.key: obj[p.key] for p in contents.parts if p.role == "tensor"}
    node: Any = obj
    for step in where.split("/"):
        node = node.get(step) if isinstance(node, Mapping) else None
    return node if key is None or is_weights(node) else None  # contents found weights there already


def extra_states_at(obj: Any, key: str | None = None) -> dict[str, Any]:
    """The modules' extra states (``get_extra_state()`` values, under ``..._extra_state`` keys) beside the
    weights that :func:`weights_at` finds in ``obj`` (``key`` as it takes it); tensors-only readers drop them."""
    if not isinstance(obj, Mapping):
        return {}
    weights = weights_at(obj, classify(obj), key)
    return {k: v for k, v in (weights or {}).items() if is_extra_state(k)}


def split_objects(obj: Mapping[Any, Any], contents: Contents) -> tuple[dict[str, Any], dict[Any, Any]]:
    """A checkpoint dict's training objects by torchkeep's names (model, optimizer, scheduler, scaler) and
    the remaining entries. Lightning keeps lists of one optimizer or scheduler: the one is taken."""
    if contents.layout == "state dict":  # the whole object is the model's weights
        return {"model": dict(obj)}, {}
    if contents.layout in _WHOLE_OBJECT:  # torch.save(optimizer.state_dict()): the whole object is one
        return {_WHOLE_OBJECT[contents.layout]: dict(obj)}, {}
    rest = dict(obj)
    objects: dict[str, Any] = {}
    if contents.weights_key is not None:
        objects["model"] = weights_at(obj, contents)
        if contents.weights_key == "":
            for part in contents.parts:
                if part.role == "tensor":
                    rest.pop(part.key)
        else:
            rest.pop(contents.weights_key.split("/")[0])
    for role, names in OBJECT_KEYS.items():
        keys = [p.key for p in contents.parts if p.role == role and p.key in rest]
        if not keys:
            continue
        order = {name: i for i, name in enumerate(names)}
        chosen = min(keys, key=lambda k: (order.get(k, len(order)), keys.index(k)))
        value = rest.pop(chosen)
        objects[role] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return objects, rest


def _part(key: str, value: Any) -> Part:
    if _is_optimizer(value):
        return _optimizer(key, value)
    if is_weights(value):
        return _weights(key, value)
    if isinstance(value, Mapping) and not any(k in value for k in _SCHEDULER_KEYS):
        inner = next((k for k in STATE_DICT_KEYS if is_weights(value.get(k))), None)
        if inner is not None:  # nested one level: {"model": {"state_dict": ...}}
            found = _weights(key, value[inner])
            return Part(key, "weights", f"under {inner!r}: {found.summary}", {**found.detail, "path": f"{key}/{inner}"})
    if isinstance(value, Mapping) and any(k in value for k in _SCHEDULER_KEYS):
        return _scheduler(key, value)
    if _is_scaler(value):
        return _scaler(key, value)
    if _is_cpu_rng(value) or (any(w in key.lower() for w in _RNG_WORDS) and _plain(value) is None):
        return Part(key, "rng", _short(value))
    if isinstance(value, Mapping) and not value:  # an empty state: its name says what it is (a disabled scaler)
        role = next((r for r, names in OBJECT_KEYS.items() if key in names), None)
        if role is not None:
            return Part(key, role, "empty state")
    if isinstance(value, (list, tuple)) and value and all(_is_optimizer(v) for v in value):
        parts = [_optimizer(f"{key}[{i}]", v) for i, v in enumerate(value)]
        groups = [g for p in parts for g in p.detail["param_groups"]]
        return Part(key, "optimizer", "; ".join(p.summary for p in parts), {"param_groups": groups})
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, Mapping) and any(k in v for k in _SCHEDULER_KEYS) for v in value)
    ):
        return Part(key, "scheduler", "; ".join(_scheduler(key, v).summary for v in value))
    plain = _plain(value)
    if plain is not None:
        return Part(key, "value", repr(plain) if isinstance(plain, str) else str(plain))
    if holds_numbers(value):  # a tensor beside other values, not in a state dict
        return Part(key, "tensor", _short(value))
    return Part(key, "other", _short(value))


def _weights(key: str, tensors: Mapping[str, Any]) -> Part:
    if torch_ao.has_entries(tensors):  # quantized entries, counted as the tensors load gives for them
        with contextlib.suppress(TorchkeepError):  # one that does not flatten is reported when loaded
            tensors = torch_ao.flatten(tensors).tensors
    numel = nbytes = count = 0
    dtypes: dict[str, int] = {}
    for v in tensors.values():
        if isinstance(v, torch.Tensor):
            dtype, size, itemsize = v.dtype, v.numel(), v.element_size()
        elif isinstance(v, np.ndarray) and (found := _torch_dtype(v.dtype)) is not None:
            dtype, size, itemsize = found, v.size, v.itemsize  # described as is: no tensor made of it
        else:
            continue
        count += 1
        numel += size
        nbytes += size * itemsize
        dtypes[dtype_name(dtype)] = dtypes.get(dtype_name(dtype), 0) + size
    mix = ", ".join(f"{d} {n:,}" for d, n in sorted(dtypes.items(), key=lambda kv: -kv[1]))
    summary = f"{count} tensors, {numel:,} elements, {nbytes:,} bytes ({mix})"
    return Part(key, "weights", summary, {"tensors": count, "elements": numel, "bytes": nbytes, "dtypes": dtypes})


def _optimizer(key: str, value: Mapping[str, Any]) -> Part:
    groups = []
    for group in value.get("param_groups") or []:
        if isinstance(group, Mapping):
            params = group.get("params")
            hyper = {str(k): _plain(v) for k, v in group.items() if k != "params"}
            groups.append({"params": len(params) if isinstance(params, (list, tuple)) else None, **hyper})
    raw_state = value.get("state")
    state: Mapping[Any, Any] = raw_state if isinstance(raw_state, Mapping) else {}
    slots: dict[str, int] = {}
    nbytes = 0
    for per_param in state.values():
        if isinstance(per_param, Mapping):
            for slot, tensor in per_param.items():
                if isinstance(tensor, torch.Tensor):
                    slots[str(slot)] = slots.get(str(slot), 0) + 1
                    nbytes += tensor.numel() * tensor.element_size()
    summary = f"{len(groups)} param group(s), state for {len(state)} params" + (
        f" ({', '.join(sorted(slots))}; {nbytes:,} bytes)" if slots else ""
    )
    detail = {"param_groups": groups, "params_with_state": len(state), "slots": slots, "state_bytes": nbytes}
    return Part(key, "optimizer", summary, detail)


def _scheduler(key: str, value: Mapping[str, Any]) -> Part:
    shown = {k: _plain(value[k]) for k in ("last_epoch", "_last_lr", "base_lrs", "_step_count") if k in value}
    return Part(key, "scheduler", ", ".join(f"{k}={v}" for k, v in shown.items()), {k: v for k, v in shown.items()})


def _scaler(key: str, value: Mapping[str, Any]) -> Part:
    return Part(key, "scaler", ", ".join(f"{k}={_plain(v)}" for k, v in value.items()))


def _is_scaler(value: Any) -> bool:
    return isinstance(value, Mapping) and "scale" in value and ("growth_factor" in value or "_growth_tracker" in value)


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _is_cpu_rng(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() == CPU_RNG_STATE_BYTES


def _plain(value: Any) -> Any:
    """A JSON-able form of a small value (numbers, strings, short lists, one-element tensors); else None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
        return _plain(value.item())
    if isinstance(value, (list, tuple)) and len(value) <= 8:
        items = [_plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value, strict=True)) else items
    return None


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {dtype_name(value.dtype)}{list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{list(value.shape)}"
    if isinstance(value, Mapping):
        return f"dict of {len(value)}: " + ", ".join(repr(k) for k in list(value)[:6]) + (
            ", ..." if len(value) > 6 else ""
        )  # fmt: skip
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
