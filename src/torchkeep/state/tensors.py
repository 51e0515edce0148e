"""Preparing a state dict for the safe format: validation, CPU contiguous bytes, shared storage."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchkeep._warn import warn
from torchkeep.errors import UnsupportedTensorError
from torchkeep.format.dtypes import DTYPE_TO_CODE, dtype_name
from torchkeep.state import torch_ao
from torchkeep.state.keys import drop_compile_segments, is_extra_state, unwrap_model
from torchkeep.state.wrappers import flatten_wrappers


@dataclass(frozen=True)
class PreparedTensors:
    """Tensors ready to write (CPU, contiguous, one per storage view) and the aliases dropped."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]  # alias name -> stored name

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def state_dict_of(obj: nn.Module | Mapping[str, torch.Tensor], *, values: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to save: a module's unwrapped state dict, or a mapping as given.

    ``values``: the destination stores plain values too (a checkpoint's manifest), so a module's extra
    state (``get_extra_state()``) is kept whatever it is; otherwise (a weights file) it must be a tensor.
    """
    return state_and_metadata(obj, values=values)[0]


def state_and_metadata(
    obj: nn.Module | Mapping[str, torch.Tensor], *, values: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`state_dict_of`, and the reserved metadata describing how torch.ao quantized entries were stored."""
    raw = _raw_state(obj)
    if not values:
        for key, value in raw.items():
            if is_extra_state(key) and not isinstance(value, torch.Tensor):
                raise UnsupportedTensorError(key, _EXTRA_STATE_HINT.format(type(value).__name__))
    metadata: dict[str, str] = {}
    if torch_ao.has_entries(raw):
        flat = torch_ao.flatten(raw)
        warn(torch_ao.MIGRATION)
        raw, metadata[torch_ao.META_KEY] = (
            flat.tensors,
            json.dumps(flat.description(), sort_keys=True, separators=(",", ":")),
        )
    return flatten_wrappers(raw), metadata


_EXTRA_STATE_HINT = (
    "is a module's extra state (get_extra_state()), a {}, and a weights file holds tensors only: save with "
    "torchkeep.save_checkpoint(path, model=model), which stores it and restores it through set_extra_state, "
    "or make get_extra_state() return a tensor"
)


def _raw_state(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if isinstance(obj, nn.Module):
        module = unwrap_model(obj)
        return {drop_compile_segments(k): v for k, v in module.state_dict().items()}
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"state dict keys must be str, got {key!r} ({type(key).__name__})")
            if not isinstance(value, torch.Tensor) and is_extra_state(key):
                out[key] = value  # refused by state_and_metadata unless the destination stores values
                continue
            if not isinstance(value, torch.Tensor) and not torch_ao.is_entry(key, value):
                raise UnsupportedTensorError(
                    key, f"is a {type(value).__name__}, not a tensor; save_checkpoint stores other values"
                )
            out[key] = value
        return out
    raise TypeError(f"save() takes an nn.Module or a mapping of str to Tensor, not {type(obj).__name__}")


def _check_storable(key: str, tensor: torch.Tensor) -> None:
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise UnsupportedTensorError(
            key, f"has layout {tensor.layout}; only dense tensors can be stored: save tensor.to_dense()"
        )
    if tensor.is_quantized:
        raise UnsupportedTensorError(
            key, "is quantized; store tensor.dequantize(), or int_repr() with its scale and zero point"
        )
    if tensor.is_meta:
        raise UnsupportedTensorError(key, "is on the meta device and has no data to save")
    if getattr(tensor, "is_nested", False):
        raise UnsupportedTensorError(key, "is a nested tensor; save its unbind() parts instead")
    if tensor.dtype not in DTYPE_TO_CODE:
        hint = " (use .to(torch.complex64) or torch.view_as_real)" if tensor.is_complex() else ""
        raise UnsupportedTensorError(key, f"has dtype {dtype_name(tensor.dtype)}, which the format cannot hold{hint}")


def _view_key(tensor: torch.Tensor) -> tuple[object, ...]:
    # Identical views share a data pointer, shape, strides, dtype and device.
    return (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)


def _plain(tensor: torch.Tensor, keep_devices: bool) -> torch.Tensor:
    """Contiguous (and on the CPU unless ``keep_devices``), with lazy conj/neg bits resolved; no copy when
    already so.

    Autograd flags do not matter: bytes are read through the data pointer.
    """
    if tensor.is_conj() or tensor.is_neg():  # lazy bits (a real tensor can carry the negative one: x.conj().imag)
        tensor = tensor.detach().resolve_conj().resolve_neg()
    # Only contiguous CUDA tensors stay on their device (the writer stages their bytes); a non-contiguous
    # one would need a contiguous copy in device memory for the whole save, so it comes to the host here.
    if not tensor.is_cpu and not (keep_devices and tensor.is_cuda and tensor.is_contiguous()):
        tensor = tensor.detach().cpu()
    if not tensor.is_contiguous():
        tensor = tensor.detach().contiguous()
    return tensor


def prepare(state: Mapping[str, torch.Tensor], *, keep_devices: bool = False) -> PreparedTensors:
    """Validate every tensor and collapse identical views of one storage to a single entry.

    Views that overlap without being identical are stored as their values, each in full. With
    ``keep_devices`` GPU tensors stay where they are (the writer stages their bytes through small host
    buffers); otherwise every tensor is brought to the CPU here.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of_view: dict[tuple[object, ...], str] = {}
    strided = torch.strided
    for key, tensor in state.items():
        if (
            tensor.layout is not strided
            or tensor.is_quantized
            or tensor.is_meta
            or tensor.is_nested
            or tensor.dtype not in DTYPE_TO_CODE
        ):
            _check_storable(key, tensor)
        if tensor.numel() > 0:
            view = _view_key(tensor)
            if view in first_of_view:
                aliases[key] = first_of_view[view]
                continue
            first_of_view[view] = key
        tensors[key] = _plain(tensor, keep_devices)
    for device in {t.device for t in tensors.values() if t.is_cuda}:
        # The writer may read them from another thread, whose current stream is not this one: wait here for
        # the work this thread queued (the kernels that computed them).
        torch.cuda.current_stream(device).synchronize()
    return PreparedTensors(tensors=tensors, aliases=aliases)
