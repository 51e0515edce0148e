"""torch.ao.quantization state (the tutorials' ``quantize_dynamic`` and prepare/convert models) as plain tensors.

torch.ao's quantized modules put three kinds of values in a state dict that safetensors cannot hold:

- quantized tensors (``conv.weight``: qint8, per channel);
- packed parameters: ``fc._packed_params._packed_params`` is a tuple ``(weight, bias)``, the weight
  quantized (float for float16 dynamic quantization), the bias float or None;
- the packed parameters' dtype, ``fc._packed_params.dtype`` (a ``torch.dtype``).

Each is stored as plain tensors under names derived from its key (docs/FORMAT.md, "torch.ao quantized
state"): a quantized tensor ``K`` as ``K.int_repr`` (int8, uint8 or int32), ``K.scale`` and ``K.zero_point``,
shaped so that ``(int_repr - zero_point) * scale`` broadcasts to the float values (0-dim per tensor; for
per-channel tensors, the channel count at the axis and 1 elsewhere). A packed tuple ``P_packed_params``
becomes ``Pweight`` (those three parts, or a float tensor) and ``Pbias``. A dtype entry has no tensor: it is
described in the file's ``torchkeep.torch_ao`` metadata, and loading takes it from the model after checking
that the weight agrees.

Loading into a quantized model (:func:`repack`) rebuilds each quantized tensor from its parts with the
model's own scheme, then lets torch's own ``load_state_dict`` hooks pack the weights again: no pickle, and
the packed weights hold exactly the integers and scales that were saved.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkeep.errors import CorruptCheckpointError, TorchkeepError, UnsupportedTensorError

META_KEY = "torchkeep.torch_ao"  # reserved metadata: a JSON description of the entries (docs/FORMAT.md)
DESCRIPTION_VERSION = 1
PACKED = "_packed_params"  # last segment of a packed (weight, bias) tuple's key
DTYPE = "dtype"  # last segment of a packed-parameters dtype entry
INT_REPR = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}
QSCHEMES = {
    torch.per_tensor_affine: "per_tensor_affine",
    torch.per_channel_affine: "per_channel_affine",
    torch.per_channel_affine_float_qparams: "per_channel_affine_float_qparams",
}
PART_NAMES = ("int_repr", "scale", "zero_point")
MIGRATION = (
    "torch.ao.quantization (and its quantized tensors) is deprecated upstream and will be removed from torch; "
    "torchkeep stores the int8 data and scales as plain tensors and packs them again on load_into / load_model. "
    'For new models, quantize with torchkeep.quantize(model, method="int8_dynamic") (torchao) instead'
)
# The message torch emits (once per process) when any quantized tensor is created; torchkeep creates them
# only to hand saved integers back to torch.ao modules, which is not the user's to act on.
_CREATION_WARNING = r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"


def _last(key: str) -> str:
    return key.rpartition(".")[2]


def _prefix(key: str) -> str:
    """``fc._packed_params._packed_params`` -> ``fc._packed_params.``"""
    head, dot, _ = key.rpartition(".")
    return head + dot


def is_packed(key: Any, value: Any) -> bool:
    """A packed-parameters entry: anything but a tensor under a ``_packed_params`` key (checked by flatten)."""
    return not isinstance(value, torch.Tensor) and isinstance(key, str) and _last(key) == PACKED


def is_script_object(value: Any) -> bool:
    return isinstance(value, torch.ScriptObject)


def is_dtype_entry(key: Any, value: Any) -> bool:
    return isinstance(value, torch.dtype) and isinstance(key, str) and _last(key) == DTYPE


def is_entry(key: Any, value: Any) -> bool:
    """A value torch.ao puts in a state dict that is not a plain tensor (a dtype only beside packed params)."""
    if isinstance(value, torch.Tensor):
        return value.is_quantized
    return is_packed(key, value) or is_script_object(value) or is_dtype_entry(key, value)


def has_entries(state: Mapping[Any, Any]) -> bool:
    """True when ``state`` holds quantized tensors, packed parameters or torch.ao script objects."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.is_quantized:
                return True
        elif is_packed(key, value) or is_script_object(value):
            return True
    return False


@contextlib.contextmanager
def quiet_creation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", _CREATION_WARNING, UserWarning)
        yield


@dataclass(frozen=True)
class Flat:
    """A state dict with its torch.ao entries replaced by plain tensors, and how each was stored."""

    tensors: dict[str, torch.Tensor]
    entries: dict[str, dict[str, Any]]  # original key -> JSON description (docs/FORMAT.md)

    def description(self) -> dict[str, Any]:
        return {"version": DESCRIPTION_VERSION, "library": "torch.ao.quantization", "entries": self.entries}


Refuse = Callable[[str, str], TorchkeepError]


def saving_error(key: str, problem: str) -> TorchkeepError:
    return UnsupportedTensorError(key, problem)


def reading_error(path: str) -> Refuse:
    return lambda key, problem: CorruptCheckpointError(path, problem, key=key)


def _quantized_parts(key: str, tensor: torch.Tensor, refuse: Refuse) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if tensor.dtype not in INT_REPR:
        raise refuse(
            key,
            f"is a quantized tensor of dtype {tensor.dtype}; only qint8, quint8 and qint32 are stored: "
            "store tensor.dequantize() instead",
        )
    scheme = tensor.qscheme()
    if scheme not in QSCHEMES or tensor.layout != torch.strided:
        raise refuse(key, f"is a quantized tensor with scheme {scheme}, which torchkeep cannot store: "
                     "store tensor.dequantize() instead")  # fmt: skip
    described: dict[str, Any] = {"kind": "quantized", "dtype": str(tensor.dtype).removeprefix("torch.")}
    described["qscheme"] = QSCHEMES[scheme]
    if scheme == torch.per_tensor_affine:
        scale = torch.tensor(tensor.q_scale(), dtype=torch.float64)
        zero_point = torch.tensor(tensor.q_zero_point(), dtype=torch.int64)
    else:
        axis = tensor.q_per_channel_axis()
        scale, zero_point = tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()
        if not 0 <= axis < tensor.dim() or not scale.numel() == zero_point.numel() == tensor.shape[axis]:
            raise refuse(key, f"has {scale.numel()} per-channel scales for axis {axis} of shape {list(tensor.shape)}")
        shape = [1] * tensor.dim()
        shape[axis] = tensor.shape[axis]
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        described["axis"] = axis
    parts = {f"{key}.int_repr": tensor.int_repr(), f"{key}.scale": scale, f"{key}.zero_point": zero_point}
    return parts, described


def _packed_parts(key: str, value: Any, refuse: Refuse) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``P_packed_params`` = (weight, bias) -> ``Pweight[.int_repr|.scale|.zero_point]`` and ``Pbias``."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise refuse(key, "packed parameters must be a (weight, bias) pair")
    weight, bias = value
    if not isinstance(weight, torch.Tensor) or weight.layout != torch.strided or weight.dim() != 2:
        raise refuse(key, "the packed weight is not a 2-d tensor (a Linear's packed parameters hold one)")
    if not weight.is_quantized and not weight.is_floating_point():
        raise refuse(key, f"the packed weight has dtype {weight.dtype}: neither quantized nor float")
    if bias is not None and not (
        isinstance(bias, torch.Tensor)
        and bias.layout == torch.strided
        and not bias.is_quantized
        and bias.is_floating_point()
        and tuple(bias.shape) == (weight.shape[0],)
    ):
        raise refuse(key, f"the packed bias is not a float tensor of shape [{weight.shape[0]}] (or None)")
    prefix = _prefix(key)
    parts: dict[str, torch.Tensor] = {}
    if weight.is_quantized:
        parts, weight_described = _quantized_parts(prefix + "weight", weight, refuse)
    else:
        parts, weight_described = {prefix + "weight": weight}, {"kind": "tensor"}
    if bias is not None:
        parts[prefix + "bias"] = bias
    return parts, {"kind": "packed", "weight": weight_described, "bias": bias is not None}


def _script_object_problem(key: str) -> str:
    module = key.split("._all_weight_values.")[0] if "._all_weight_values." in key else _prefix(key).rstrip(".")
    return (
        f"is a TorchScript object (packed parameters of module {module!r}, e.g. a dynamically quantized LSTM "
        "or GRU); torchkeep cannot store it without pickle. Quantize only the Linear layers "
        '(quantize_dynamic(model, {nn.Linear})), or use torchkeep.quantize(model, method="int8_dynamic")'
    )


def flatten(state: Mapping[Any, Any], refuse: Refuse = saving_error) -> Flat:
    """``state`` with every torch.ao entry replaced by its plain tensors; other values are kept as they are.

    Raises:
        whatever ``refuse`` makes (UnsupportedTensorError when saving, CorruptCheckpointError when
        reading a file): an entry that cannot be stored, or a generated name that is already taken.
    """
    out: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        parts: dict[str, Any]
        if isinstance(value, torch.Tensor) and value.is_quantized:
            parts, entries[key] = _quantized_parts(key, value, refuse)
        elif is_packed(key, value):
            parts, entries[key] = _packed_parts(key, value, refuse)
        elif is_script_object(value):
            raise refuse(key, _script_object_problem(key))
        elif is_dtype_entry(key, value) and _has_packed_sibling(state, key):
            entries[key] = {"kind": "dtype", "dtype": str(value).removeprefix("torch.")}
            continue
        else:
            parts = {key: value}
        for name, tensor in parts.items():
            if name in out or (name != key and name in state):
                raise refuse(name, "is both a stored name and a part of a quantized entry; rename one of them")
            out[name] = tensor
    if entries:
        _check_dtypes(state, entries, refuse)
    return Flat(out, entries)


def _has_packed_sibling(state: Mapping[Any, Any], key: str) -> bool:
    prefix = _prefix(key)
    return any(isinstance(k, str) and k.startswith(prefix) and k != key and is_entry(k, state[k]) for k in state)


def _check_dtypes(state: Mapping[Any, Any], entries: dict[str, dict[str, Any]], refuse: Refuse) -> None:
    """A packed dtype entry must agree with its packed weight: it is not stored, so it must be implied."""
    for key, described in entries.items():
        if described["kind"] != "dtype":
            continue
        dtype = state[key]
        packed = _prefix(key) + PACKED
        weight = entries.get(packed, {}).get("weight")
        if weight is None:
            continue  # beside another kind of packed entry (an Embedding's quantized weight): nothing to check
        if weight["kind"] == "tensor" and not dtype.is_floating_point:
            raise refuse(key, f"says {dtype} but the packed weight beside it is a float tensor")
        if weight["kind"] == "quantized" and str(dtype) != f"torch.{weight['dtype']}":
            raise refuse(key, f"says {dtype} but the packed weight beside it is torch.{weight['dtype']}")


# -- loading into a quantized model -------------------------------------------------------------------------


def _rebuild_quantized(own: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A quantized tensor with ``own``'s scheme (dtype, axis) and the given int_repr, scale and zero point."""
    int_repr = parts["int_repr"]
    if own.qscheme() == torch.per_tensor_affine:
        return torch._make_per_tensor_quantized_tensor(int_repr, float(parts["scale"]), int(parts["zero_point"]))
    axis = own.q_per_channel_axis()
    scales = parts["scale"].reshape(-1).to(own.q_per_channel_scales().dtype)
    zero_points = parts["zero_point"].reshape(-1).to(own.q_per_channel_zero_points().dtype)
    return torch._make_per_channel_quantized_tensor(int_repr, scales, zero_points, axis)


def exact_int_types(own: Mapping[str, Any]) -> dict[str, torch.dtype]:
    """``K.int_repr`` -> the integer dtype it must have to go back into the model's quantized ``K``."""
    out: dict[str, torch.dtype] = {}
    for key, value in own.items():
        if isinstance(value, torch.Tensor) and value.is_quantized and value.dtype in INT_REPR:
            out[f"{key}.int_repr"] = INT_REPR[value.dtype]
        elif is_packed(key, value) and isinstance(value[0], torch.Tensor) and value[0].is_quantized:
            out[f"{_prefix(key)}weight.int_repr"] = INT_REPR[value[0].dtype]
    return out


def _ao_prefixes(model: nn.Module) -> list[str]:
    """Prefixes of the outermost torch.ao modules: their load hooks need every key of theirs."""
    prefixes: list[str] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if type(module).__module__.startswith("torch.ao.nn.") and not any(prefix.startswith(p) for p in prefixes):
            prefixes.append(prefix)
    return prefixes


def repack(model: nn.Module, own: Mapping[str, Any], loaded: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The state to give ``model.load_state_dict``: ``loaded`` (flattened names) with torch.ao entries rebuilt.

    Each quantized tensor gets the model's own scheme and the loaded parts (a part the source lacks
    keeps the model's value: only a non-strict load gets here with one missing). torch.ao modules'
    load hooks read every key of theirs, so keys the source lacks are given the model's own values;
    the result carries the model's ``_metadata`` (its hooks branch on the version).
    """
    own_flat = flatten(own).tensors
    result: collections.OrderedDict[str, Any] = collections.OrderedDict()
    used: set[str] = set()
    with quiet_creation():
        for key, value in own.items():
            if isinstance(value, torch.Tensor) and value.is_quantized:
                result[key] = _rebuild_quantized(value, _parts_of(key, own_flat, loaded, used))
            elif is_packed(key, value):
                prefix = _prefix(key)
                weight, bias = value
                if isinstance(weight, torch.Tensor) and weight.is_quantized:
                    new_weight = _rebuild_quantized(weight, _parts_of(prefix + "weight", own_flat, loaded, used))
                else:
                    new_weight = _part(prefix + "weight", own_flat, loaded, used)
                new_bias = None if bias is None else _part(prefix + "bias", own_flat, loaded, used)
                result[key] = (new_weight, new_bias)
            elif is_dtype_entry(key, value):
                result[key] = value
    for key, tensor in loaded.items():
        if key not in used:
            result[key] = tensor
    prefixes = _ao_prefixes(model)
    for key, value in own.items():
        if key not in result and any(key.startswith(p) for p in prefixes):
            result[key] = value  # a key the (non-strict) source lacks: the hooks still read it
    result._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    return result


def _part(name: str, own_flat: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    if name in loaded:
        used.add(name)
        return loaded[name].detach().clone()  # packed params may keep it: their own memory, not the file's map
    return own_flat[name].detach()


def _parts_of(
    key: str, own_flat: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], used: set[str]
) -> dict[str, torch.Tensor]:
    return {part: _part(f"{key}.{part}", own_flat, loaded, used) for part in PART_NAMES}
