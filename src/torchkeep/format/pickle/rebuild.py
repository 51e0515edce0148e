"""Safe stand-ins for the functions torch.save pickles name: they check their inputs and build data."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

QUANTIZED_ITEMSIZE = {torch.qint8: 1, torch.quint8: 1, torch.qint32: 4, torch.quint4x2: 1, torch.quint2x4: 1}


def itemsize(dtype: torch.dtype) -> int:
    return QUANTIZED_ITEMSIZE.get(dtype) or torch.empty((), dtype=dtype).element_size()


class RefusedData(Exception):
    """Arguments to an allowed global that are not plain data of the expected kind."""


class DeferredChecks:
    """Sparse tensors are checked once their storages hold data (legacy files fill them last)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sparse: list[torch.Tensor] = []

    def run(self) -> None:
        from torchkeep.errors import CorruptCheckpointError

        for tensor in self.sparse:
            try:
                if tensor.layout == torch.sparse_coo:
                    torch._validate_sparse_coo_tensor_args(tensor._indices(), tensor._values(), tensor.size())
                else:
                    compressed, plain = (
                        (tensor.crow_indices(), tensor.col_indices())
                        if tensor.layout in (torch.sparse_csr, torch.sparse_bsr)
                        else (tensor.ccol_indices(), tensor.row_indices())
                    )
                    torch._validate_sparse_compressed_tensor_args(
                        compressed, plain, tensor.values(), tensor.size(), tensor.layout
                    )
            except RuntimeError as exc:
                raise CorruptCheckpointError(self.path, f"invalid sparse tensor: {exc}") from exc
        self.sparse.clear()


_CHECKS: contextvars.ContextVar[DeferredChecks | None] = contextvars.ContextVar("torchkeep_checks", default=None)


@contextlib.contextmanager
def deferred_checks(path: str, *, run_on_exit: bool = True) -> Iterator[DeferredChecks]:
    checks = DeferredChecks(path)
    token = _CHECKS.set(checks)
    try:
        yield checks
    finally:
        _CHECKS.reset(token)
    if run_on_exit:
        checks.run()


def _defer(tensor: torch.Tensor) -> torch.Tensor:
    checks = _CHECKS.get()
    if checks is None:
        raise RefusedData("sparse tensor outside a reader")
    checks.sparse.append(tensor)
    return tensor


@dataclass(frozen=True)
class StorageType:
    """What ``torch.FloatStorage`` and friends stand for in a pickle: a dtype."""

    dtype: torch.dtype
    name: str


@dataclass
class LoadedStorage:
    """A storage read from the file: untyped bytes, the dtype they were saved as, where they lived."""

    untyped: torch.UntypedStorage
    dtype: torch.dtype
    location: str

    @property
    def numel(self) -> int:
        return self.untyped.nbytes() // itemsize(self.dtype)


class PlainDict(dict[Any, Any]):
    """A dict subclass pickled by other libraries (Lightning's AttributeDict): rebuilt as a dict."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


class PlainNamespace(dict[Any, Any]):
    """``argparse.Namespace`` rebuilt as a plain dict of its attributes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            self.update(state[0])


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise RefusedData(f"{what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _check_hooks(hooks: Any) -> None:
    if hooks not in (None, {}) and not (isinstance(hooks, dict) and not hooks):
        raise RefusedData("tensor carries backward hooks (code); refusing")


def rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(storage, LoadedStorage):
        raise RefusedData(f"tensor storage is a {type(storage).__name__}, not a storage from the file")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise RefusedData(f"bad storage offset {storage_offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise RefusedData("size and stride differ in length")
    _check_hooks(backward_hooks)
    if storage.dtype in QUANTIZED_ITEMSIZE:
        raise RefusedData("quantized storage outside _rebuild_qtensor")
    if math.prod(shape) > 0:
        extent = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
        if extent > storage.numel:
            raise RefusedData(f"tensor view of {extent} elements exceeds its storage of {storage.numel}")
    tensor = torch.empty(0, dtype=storage.dtype).set_(storage.untyped, storage_offset, shape, strides)
    if requires_grad is True and (tensor.is_floating_point() or tensor.is_complex()):
        tensor.requires_grad_(True)
    return tensor


def rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """Tensors whose storage was saved untyped (float8, uint16...): the dtype comes separately."""
    if not isinstance(storage, LoadedStorage) or not isinstance(dtype, torch.dtype) or dtype in QUANTIZED_ITEMSIZE:
        raise RefusedData("untyped-storage tensor without a storage and a dtype")
    typed = LoadedStorage(storage.untyped, dtype, storage.location)
    return rebuild_tensor_v2(typed, storage_offset, size, stride, requires_grad, backward_hooks, metadata)


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    return rebuild_tensor_v2(storage, storage_offset, size, stride)


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor):
        raise RefusedData("parameter data is not a tensor")
    _check_hooks(backward_hooks)
    return torch.nn.Parameter(data.detach(), requires_grad=bool(requires_grad))


def rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> torch.nn.Parameter:
    return rebuild_parameter(data, requires_grad, backward_hooks)


def get_layout(name: Any) -> torch.layout:
    layouts = {str(layout): layout for layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc,
                                                 torch.sparse_bsr, torch.sparse_bsc, torch.strided)}  # fmt: skip
    if name not in layouts:
        raise RefusedData(f"unknown layout {name!r}")
    return layouts[name]


def rebuild_sparse_tensor(layout: Any, data: Any) -> torch.Tensor:
    if not isinstance(data, tuple) or not all(
        isinstance(d, (torch.Tensor, tuple, list, torch.Size, bool)) for d in data
    ):
        raise RefusedData("sparse tensor parts are not tensors and sizes")
    if layout == torch.sparse_coo:
        if len(data) == 2:
            indices, values, size = data[0], data[1], None
        else:
            indices, values, size = data[0], data[1], data[2]
        result = torch.sparse_coo_tensor(indices, values, size, check_invariants=False)
        if len(data) > 3:
            result._coalesced_(bool(data[3]))
        return _defer(result)
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        crow, col, values, size = data
        return _defer(torch.sparse_compressed_tensor(crow, col, values, _ints(size, "size"), layout=layout,
                                                     check_invariants=False))  # fmt: skip
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        ccol, row, values, size = data
        return _defer(torch.sparse_compressed_tensor(ccol, row, values, _ints(size, "size"), layout=layout,
                                                     check_invariants=False))  # fmt: skip
    raise RefusedData(f"unsupported sparse layout {layout!r}")


def rebuild_qtensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    quantizer_params: Any,
    requires_grad: Any,
    backward_hooks: Any,
) -> torch.Tensor:
    if not isinstance(storage, LoadedStorage) or storage.dtype not in QUANTIZED_ITEMSIZE:
        raise RefusedData("quantized tensor without a quantized storage")
    _check_hooks(backward_hooks)
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(quantizer_params, tuple) or not quantizer_params:
        raise RefusedData("bad quantizer parameters")
    scheme = quantizer_params[0]
    if scheme == torch.per_tensor_affine and len(quantizer_params) == 3:
        _, scale, zero_point = quantizer_params
        tensor = torch._empty_affine_quantized(shape, scale=float(scale), zero_point=int(zero_point),
                                               dtype=storage.dtype)  # fmt: skip
    elif scheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams) and len(quantizer_params) == 4:
        _, scales, zero_points, axis = quantizer_params
        if not isinstance(scales, torch.Tensor) or not isinstance(zero_points, torch.Tensor):
            raise RefusedData("per-channel quantizer needs tensors")
        tensor = torch._empty_per_channel_affine_quantized(shape, scales=scales, zero_points=zero_points,
                                                           axis=int(axis), dtype=storage.dtype)  # fmt: skip
    else:
        raise RefusedData(f"unsupported quantization scheme {scheme!r}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise RefusedData("bad storage offset")
    if math.prod(shape) and storage_offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) >= \
            storage.untyped.nbytes():  # fmt: skip
        raise RefusedData("quantized tensor view exceeds its storage")
    tensor.set_(storage.untyped, storage_offset, shape, strides)
    return tensor


def rebuild_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> torch.Tensor:
    if not isinstance(data, np.ndarray) or data.dtype.hasobject:
        raise RefusedData("tensor from a non-numeric NumPy array")
    return torch.from_numpy(data).to(dtype=dtype)


def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in (rebuild_tensor_v2, rebuild_tensor_v3, rebuild_parameter, rebuild_qtensor, rebuild_sparse_tensor):
        raise RefusedData("tensor subclass rebuilt by an unexpected function")
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise RefusedData(f"tensor subclass {new_type!r} is not allowed")
    if not isinstance(args, tuple):
        raise RefusedData("bad arguments")
    result = func(*args)
    if new_type is torch.nn.Parameter and not isinstance(result, torch.nn.Parameter):
        result = torch.nn.Parameter(result, requires_grad=result.requires_grad)
    if state not in (None, {}, collections.OrderedDict()):
        raise RefusedData("tensor carries Python state; refusing")
    return result


def reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor, for the few plain classes above only."""
    if cls not in (PlainNamespace, PlainDict) or base not in (object, dict):
        raise RefusedData(f"copyreg._reconstructor of {cls!r}")
    obj = cls()
    if isinstance(state, dict):
        obj.update(state)
    return obj


def numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype[Any]:
    if not isinstance(spec, str):
        raise RefusedData(f"numpy dtype from {type(spec).__name__}")
    dtype = np.dtype(spec)
    if dtype.hasobject or dtype.kind == "V":
        raise RefusedData(f"NumPy dtype {spec!r} holds Python objects (pickles)")
    return dtype


def numpy_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray[Any, Any]:
    if subtype is not np.ndarray:
        raise RefusedData("only plain NumPy arrays are rebuilt")
    return np.ndarray.__new__(np.ndarray, _ints(shape, "shape"), np.uint8)


def numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise RefusedData("NumPy scalar of a non-numeric dtype")
    if len(data) != dtype.itemsize:
        raise RefusedData("NumPy scalar bytes do not match its dtype")
    return np.frombuffer(data, dtype=dtype)[0]
