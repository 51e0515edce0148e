"""Safe stand-ins for the functions torch.save pickles name: they check their inputs and build data.

Each stand-in checks the types and sizes of its arguments before it allocates, and charges what it
builds to the :class:`Budget` of the load in progress, so that no argument can make it allocate more
than the file could hold.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

QUANTIZED_ITEMSIZE = {torch.qint8: 1, torch.quint8: 1, torch.qint32: 4, torch.quint4x2: 1, torch.quint2x4: 1}
INT64_MAX = (1 << 63) - 1
# Keys of one dict or set whose (unsalted) hashes may coincide before the pickle counts as a hash flood.
MAX_HASH_COLLISIONS = 64


def itemsize(dtype: torch.dtype) -> int:
    return QUANTIZED_ITEMSIZE.get(dtype) or torch.empty((), dtype=dtype).element_size()


class RefusedData(Exception):
    """Arguments to an allowed global that are not plain data of the expected kind (-> UnsafeCheckpointError)."""


class BadData(Exception):
    """Sizes, shapes or amounts no real file holds: damage or a resource attack (-> CorruptCheckpointError)."""


def describe(value: Any) -> str:
    """A short description of an untrusted value for an error message: never a full repr (it may be huge or deep)."""
    if value is None or isinstance(value, (bool, float, complex)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


@dataclass
class Budget:
    """Bytes one load may build: ``floor``, or ``ratio`` times the pickle bytes read so far if more.

    ``consumed`` says how many bytes of the pickle have been read; every opcode and every allowed
    call charges what it builds, so a small pickle cannot demand a large allocation.
    """

    floor: int
    ratio: int
    consumed: Callable[[], int]
    used: int = 0

    @property
    def limit(self) -> int:
        return max(self.floor, self.ratio * self.consumed())

    def charge(self, nbytes: int, what: str) -> None:
        self.used += nbytes
        if self.used > self.floor and self.used > self.ratio * self.consumed():
            raise BadData(
                f"{what} would take the objects built past {self.limit} bytes "
                f"({self.ratio}x the {self.consumed()} pickle bytes read, at least {self.floor}): "
                "no real file needs that much"
            )


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("torchkeep_budget", default=None)


@contextlib.contextmanager
def budget_in_force(budget: Budget) -> Iterator[Budget]:
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def charge(nbytes: int, what: str) -> None:
    """Charge an allocation to the load in progress (nothing to charge outside one)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(nbytes, what)


def view_limit() -> int:
    """The largest tensor view (in bytes) beyond its storage a file may ask for."""
    budget = _BUDGET.get()
    return budget.limit if budget is not None else 1 << 26


def check_hash_flood(keys: Iterable[Any], what: str) -> None:
    """Refuse keys whose hashes coincide en masse: dict and set insertion would turn quadratic.

    str and bytes hashes are salted per process and cannot be aimed at; ints, floats and tuples can.
    """
    counts: collections.Counter[int] = collections.Counter()
    for key in keys:
        if type(key) is not str and type(key) is not bytes:
            h = hash(key)
            counts[h] += 1
            if counts[h] > MAX_HASH_COLLISIONS:
                raise BadData(f"{what}: more than {MAX_HASH_COLLISIONS} keys share one hash (a hash-flooding attack)")


@dataclass(frozen=True)
class TypeToken:
    """A class a pickle names only to pass or compare (``object`` in ``copyreg._reconstructor``).

    It stands in for the class so that nothing can call it, instantiate it or BUILD it.
    """

    name: str

    def __repr__(self) -> str:
        return f"<{self.name}>"


OBJECT = TypeToken("builtins.object")
DICT = TypeToken("builtins.dict")
NDARRAY = TypeToken("numpy.ndarray")
TENSOR = TypeToken("torch.Tensor")
PARAMETER = TypeToken("torch.nn.Parameter")


class SafeState:
    """Marker: a class of ours whose instances a pickle may create (NEWOBJ) and BUILD with plain data."""

    def __setstate__(self, state: Any) -> None:
        raise NotImplementedError


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


class PlainDict(SafeState, dict[Any, Any]):
    """A dict subclass pickled by other libraries (Lightning's AttributeDict): rebuilt as a dict."""

    def __init__(self) -> None:  # never called with data: pickles fill it through SETITEMS
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            charge(48 * len(state), "an AttributeDict's state")
            self.update(state)


class PlainNamespace(SafeState, dict[Any, Any]):
    """``argparse.Namespace`` rebuilt as a plain dict of its attributes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict):
            charge(48 * len(state), "a Namespace's state")
            self.update(state)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(
        type(v) is int and 0 <= v <= INT64_MAX for v in value
    ):
        raise BadData(f"{what} must be a tuple of non-negative 64-bit ints, got {describe(value)}")
    return tuple(value)


def _check_view(shape: tuple[int, ...], strides: tuple[int, ...], offset: Any, storage_numel: int, item: int) -> None:
    """A view must fit in its storage, count fewer than 2**63 elements, and not dwarf its storage."""
    if type(offset) is not int or not 0 <= offset <= INT64_MAX:
        raise BadData(f"bad storage offset {describe(offset)}")
    if len(shape) != len(strides):
        raise BadData("size and stride differ in length")
    numel = math.prod(shape)
    if numel > INT64_MAX:
        raise BadData(f"tensor shape {list(shape)} has more than 2**63 elements")
    if numel == 0:
        return
    extent = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
    if extent > storage_numel:
        raise BadData(f"tensor view of {extent} elements exceeds its storage of {storage_numel}")
    if numel * item > max(storage_numel * item, view_limit()):
        raise BadData(f"tensor view of shape {list(shape)} repeats its {storage_numel}-element storage "
                      f"into {numel * item} bytes; refusing what would be materialised later")  # fmt: skip


def _check_hooks(hooks: Any) -> None:
    if hooks is not None and not (isinstance(hooks, dict) and not hooks):
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
        raise RefusedData(f"tensor storage is {describe(storage)}, not a storage from the file")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    _check_hooks(backward_hooks)
    if storage.dtype in QUANTIZED_ITEMSIZE:
        raise RefusedData("quantized storage outside _rebuild_qtensor")
    _check_view(shape, strides, storage_offset, storage.numel, itemsize(storage.dtype))
    device = storage.untyped.device  # cpu; meta when only the geometry is wanted
    tensor = torch.empty(0, dtype=storage.dtype, device=device).set_(storage.untyped, storage_offset, shape, strides)
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


_LAYOUTS = {str(layout): layout for layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc,
                                              torch.sparse_bsr, torch.sparse_bsc, torch.strided)}  # fmt: skip


def get_layout(name: Any) -> torch.layout:
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise RefusedData(f"unknown layout {describe(name)}")
    return _LAYOUTS[name]


def rebuild_sparse_tensor(layout: Any, data: Any) -> torch.Tensor:
    if not isinstance(data, tuple) or not all(
        isinstance(d, (torch.Tensor, tuple, list, torch.Size, bool)) for d in data
    ):
        raise RefusedData("sparse tensor parts are not tensors and sizes")
    if layout == torch.sparse_coo:
        if len(data) == 2:
            indices, values, size = data[0], data[1], None
        else:
            indices, values, size = data[0], data[1], _ints(data[2], "size")
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
    raise RefusedData(f"unsupported sparse layout {describe(layout)}")


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
    # Checked before the quantized tensor is allocated at this shape.
    _check_view(shape, strides, storage_offset, storage.untyped.nbytes() // itemsize(storage.dtype),
                itemsize(storage.dtype))  # fmt: skip
    if not isinstance(quantizer_params, tuple) or not quantizer_params:
        raise RefusedData("bad quantizer parameters")
    with warnings.catch_warnings():  # torch deprecates creating quantized tensors; reading old files is not that
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        return _qtensor(storage, storage_offset, shape, strides, quantizer_params)


def _qtensor(
    storage: LoadedStorage, storage_offset: Any, shape: tuple[int, ...], strides: tuple[int, ...], quantizer_params: Any
) -> torch.Tensor:
    scheme = quantizer_params[0]
    if scheme == torch.per_tensor_affine and len(quantizer_params) == 3:
        _, scale, zero_point = quantizer_params
        if not isinstance(scale, (int, float)) or type(zero_point) is not int:
            raise BadData("per-tensor quantizer needs a float scale and an int zero point")
        tensor = torch._empty_affine_quantized(shape, scale=float(scale), zero_point=zero_point,
                                               dtype=storage.dtype)  # fmt: skip
    elif scheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams) and len(quantizer_params) == 4:
        _, scales, zero_points, axis = quantizer_params
        if not isinstance(scales, torch.Tensor) or not isinstance(zero_points, torch.Tensor) or type(axis) is not int:
            raise RefusedData("per-channel quantizer needs tensors and an int axis")
        # torch checks none of this when it builds the tensor, only when it computes with it.
        if not 0 <= axis < len(shape) or any(
            t.layout != torch.strided or t.is_quantized or t.dim() != 1 or t.numel() != shape[axis]
            for t in (scales, zero_points)
        ):
            raise BadData(f"per-channel quantizer of axis {axis} does not fit a tensor of shape {list(shape)}")
        if not scales.is_floating_point() or zero_points.is_complex() or zero_points.dtype == torch.bool:
            raise BadData("per-channel quantizer scales must be float and zero points numbers")
        tensor = torch._empty_per_channel_affine_quantized(shape, scales=scales, zero_points=zero_points,
                                                           axis=axis, dtype=storage.dtype)  # fmt: skip
    else:
        raise RefusedData(f"unsupported quantization scheme {describe(scheme)}")
    tensor.set_(storage.untyped, storage_offset, shape, strides)
    return tensor


def rebuild_from_numpy(data: Any, dtype: Any, device: Any, requires_grad: Any) -> torch.Tensor:
    if not isinstance(data, np.ndarray) or data.dtype.hasobject or not isinstance(dtype, torch.dtype):
        raise RefusedData("tensor from a non-numeric NumPy array")
    charge(data.size * itemsize(dtype), "a tensor converted from a NumPy array")
    return torch.from_numpy(data).to(dtype=dtype)


def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func not in (rebuild_tensor_v2, rebuild_tensor_v3, rebuild_parameter, rebuild_qtensor, rebuild_sparse_tensor):
        raise RefusedData("tensor subclass rebuilt by an unexpected function")
    if new_type is not TENSOR and new_type is not PARAMETER:
        raise RefusedData(f"tensor subclass {describe(new_type)} is not allowed")
    if not isinstance(args, tuple):
        raise RefusedData("bad arguments")
    if state is not None and not (isinstance(state, dict) and not state):
        raise RefusedData("tensor carries Python state; refusing")
    result = func(*args)
    if new_type is PARAMETER and not isinstance(result, torch.nn.Parameter):
        result = torch.nn.Parameter(result, requires_grad=result.requires_grad)
    return result


def reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (protocols 0-1), for the few plain classes above only."""
    if cls not in (PlainNamespace, PlainDict) or base not in (OBJECT, DICT):
        raise RefusedData(f"copyreg._reconstructor of {describe(cls)}")
    obj = cls()
    if isinstance(state, dict):
        charge(48 * len(state), "copyreg._reconstructor's state")
        obj.update(state)
    elif state is not None:
        raise RefusedData(f"copyreg._reconstructor state is {describe(state)}")
    return obj


def numpy_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype[Any]:
    if not isinstance(spec, str) or len(spec) > 32 or type(align) is not bool or type(copy) is not bool:
        raise RefusedData(f"numpy dtype from {describe(spec)}")
    # copy=True (as NumPy pickles it): BUILD then sets the byte order on a copy, not on NumPy's shared dtype.
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject or dtype.kind == "V":
        raise RefusedData(f"NumPy dtype {spec!r} holds Python objects or raw records")
    return dtype


def numpy_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray[Any, Any]:
    """An empty array: its BUILD state (checked in allowlist.build) gives the real shape and data."""
    if subtype is not NDARRAY:
        raise RefusedData("only plain NumPy arrays are rebuilt")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def numpy_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray[Any, Any]:
    """Protocol 5 pickles arrays as ``_frombuffer(bytes, dtype, shape, order)``."""
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise RefusedData("NumPy array from anything but bytes and a numeric dtype")
    dims = _ints(shape, "NumPy shape")
    if order not in ("C", "F") or math.prod(dims) * dtype.itemsize != len(buffer):
        raise BadData(f"NumPy array of shape {list(dims)} and dtype {dtype} without exactly its bytes")
    charge(len(buffer), "a NumPy array")
    return np.frombuffer(bytearray(buffer), dtype=dtype).reshape(dims, order=order)


def numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise RefusedData("NumPy scalar of a non-numeric dtype")
    if len(data) != dtype.itemsize:
        raise BadData("NumPy scalar bytes do not match its dtype")
    return np.frombuffer(data, dtype=dtype)[0]
