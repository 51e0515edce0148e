"""The one reviewed list of what a pickle may name, and what each name is rebuilt with.

Every entry maps ``(module, name)`` to a *replacement*: a function that checks its arguments
and builds plain data from plain data, a value (a dtype), or a :class:`~rebuild.TypeToken`
for a class that is only passed around. No replacement imports a module named in the file,
calls anything the file chose, or allocates more than its arguments (charged to the load's
budget). Python 2 names (``__builtin__.set``, ``copy_reg._reconstructor``) are mapped to their
Python 3 names the way :mod:`pickle` does (``_compat_pickle``), so one entry covers every
protocol. The static scanner (``scan.py``) calls :func:`is_allowed`: what it calls safe is
exactly what the unpickler builds.

:func:`build` is the other half: which objects a pickle may fill with ``BUILD`` and how.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import math
import os
import pathlib
from typing import Any

import numpy as np
import torch

from torchkeep.format.pickle import rebuild
from torchkeep.format.pickle.rebuild import BadData, RefusedData, charge, check_hash_flood, describe

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "QInt8Storage": torch.qint8,
    "QUInt8Storage": torch.quint8,
    "QInt32Storage": torch.qint32,
    "QUInt4x2Storage": torch.quint4x2,
    "QUInt2x4Storage": torch.quint2x4,
    "UntypedStorage": torch.uint8,
}

TORCH_DTYPE_NAMES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))
# Per-item costs in bytes, as CPython lays the containers out at worst (measured, rounded up).
_ITEM, _ENTRY, _PAIR = 8, 128, 96


def _iterable_items(value: Any, what: str) -> list[Any]:
    """The items of a list, tuple, set or frozenset argument, charged; nothing lazy or user-defined."""
    if type(value) not in (list, tuple, set, frozenset):
        raise RefusedData(f"{what} from {describe(value)}")
    charge(_ITEM * len(value), what)
    return list(value)


def safe_set(items: Any = ()) -> set[Any]:
    values = _iterable_items(items, "set")
    charge(_ENTRY * len(values), "set")
    check_hash_flood(values, "set")
    return set(values)


def safe_frozenset(items: Any = ()) -> frozenset[Any]:
    values = _iterable_items(items, "frozenset")
    charge(_ENTRY * len(values), "frozenset")
    check_hash_flood(values, "frozenset")
    return frozenset(values)


def safe_ordered_dict(items: Any = ()) -> collections.OrderedDict[Any, Any]:
    """OrderedDict() as pickles write it (empty, items added by SETITEMS), or from pairs."""
    if isinstance(items, dict):
        items = list(items.items())
    pairs = _iterable_items(items, "OrderedDict")
    if not all(type(p) in (tuple, list) and len(p) == 2 for p in pairs):
        raise RefusedData("OrderedDict from something other than (key, value) pairs")
    check_hash_flood((p[0] for p in pairs), "OrderedDict")
    charge(_PAIR * len(pairs), "OrderedDict")
    return collections.OrderedDict(pairs)


def _number(value: Any) -> bool:
    return type(value) in (int, float, bool)


def safe_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not _number(real) or not _number(imag):
        raise RefusedData(f"complex from {describe(real)}, {describe(imag)}")
    return complex(real, imag)


def safe_slice(*args: Any) -> slice:
    # ints or None only: a slice of slices nests with no limit (and frees recursively, without a guard).
    if not 1 <= len(args) <= 3 or not all(a is None or type(a) in (int, bool) for a in args):
        raise RefusedData(f"slice of {', '.join(describe(a) for a in args)}")
    return slice(*args)


def safe_range(*args: Any) -> range:
    if not 1 <= len(args) <= 3 or not all(type(a) is int and abs(a) <= rebuild.INT64_MAX for a in args):
        raise RefusedData("range of anything but 64-bit ints")
    result = range(*args)
    try:
        len(result)
    except OverflowError as exc:
        raise BadData("range longer than 2**63") from exc
    return result


def safe_bytes(*args: Any) -> bytes:
    """``bytes()`` (protocol 2 writes ``b''`` so) or a copy of bytes; never ``bytes(n)`` (n zero bytes)."""
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        charge(len(args[0]), "bytes")
        return bytes(args[0])
    raise RefusedData(f"bytes from {describe(args[0])}")


def safe_bytearray(*args: Any) -> bytearray:
    """From bytes (protocols 0-4) or (str, 'latin-1') (Python 2); never ``bytearray(n)``."""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        data = bytes(args[0])
    elif len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin-1", "latin1"):
        data = args[0].encode("latin-1")
    elif not args:
        data = b""
    else:
        raise RefusedData(f"bytearray from {', '.join(describe(a) for a in args)}")
    charge(len(data), "bytearray")
    return bytearray(data)


def codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocols 0-2 write bytes as ``_codecs.encode(str, 'latin1')``; only that is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedData(f"_codecs.encode of {describe(text)} with encoding {describe(encoding)}")
    charge(len(text), "_codecs.encode")
    return codecs.encode(text, "latin1")


def safe_size(dims: Any = ()) -> torch.Size:
    shape = rebuild._ints(dims, "torch.Size")
    if math.prod(shape) > rebuild.INT64_MAX:
        raise BadData(f"torch.Size {list(shape)} has more than 2**63 elements")
    charge(_ITEM * len(shape), "torch.Size")
    return torch.Size(shape)


def safe_device(kind: Any, index: Any = None) -> torch.device:
    if isinstance(kind, str) and len(kind) <= 64 and (index is None or type(index) is int):
        return torch.device(kind) if index is None else torch.device(kind, index)
    if type(kind) is int and index is None:
        return torch.device(kind)
    raise RefusedData(f"torch.device from {describe(kind)}")


_MAX_PATH_CHARS = 4096  # PATH_MAX: a longer "path" is no path


def _path_parts(parts: tuple[Any, ...], what: str) -> tuple[str, ...]:
    """A path's parts as pickles write them (``PosixPath('a', 'b')``): a few strings, nothing else."""
    if not all(type(p) is str for p in parts) or sum(len(p) for p in parts) > _MAX_PATH_CHARS:
        raise RefusedData(f"{what} from anything but a few strings")
    charge(_ITEM * len(parts) + sum(len(p) for p in parts), what)
    return parts


def safe_path(*parts: Any) -> pathlib.PurePath:
    """``pathlib.Path`` (a ``PosixPath``, or a ``WindowsPath`` saved on Windows): only a name, nothing on the
    disk is touched by making one; a Windows path comes back pure, as no other can exist here."""
    return pathlib.Path(*_path_parts(parts, "a path"))


def safe_windows_path(*parts: Any) -> pathlib.PureWindowsPath:
    return pathlib.PureWindowsPath(*_path_parts(parts, "a Windows path"))


def safe_pure_posix_path(*parts: Any) -> pathlib.PurePosixPath:
    return pathlib.PurePosixPath(*_path_parts(parts, "a path"))


_PATHS: dict[str, Any] = {
    "Path": safe_path,
    "PosixPath": safe_path if os.name == "posix" else safe_pure_posix_path,
    "WindowsPath": safe_windows_path if os.name == "posix" else safe_path,
    "PurePath": safe_pure_posix_path if os.name == "posix" else safe_windows_path,
    "PurePosixPath": safe_pure_posix_path,
    "PureWindowsPath": safe_windows_path,
}

_FIXED: dict[tuple[str, str], Any] = {
    # Python 3.13 keeps the path classes in pathlib._local, and pickles name them there.
    **{(module, name): make for module in ("pathlib", "pathlib._local") for name, make in _PATHS.items()},
    ("collections", "OrderedDict"): safe_ordered_dict,
    ("builtins", "set"): safe_set,
    ("builtins", "frozenset"): safe_frozenset,
    ("builtins", "complex"): safe_complex,
    ("builtins", "slice"): safe_slice,
    ("builtins", "range"): safe_range,
    ("builtins", "bytes"): safe_bytes,
    ("builtins", "bytearray"): safe_bytearray,
    ("builtins", "object"): rebuild.OBJECT,
    ("builtins", "dict"): rebuild.DICT,
    ("_codecs", "encode"): codecs_encode,
    ("copyreg", "_reconstructor"): rebuild.reconstructor,
    ("torch", "Size"): safe_size,
    ("torch", "device"): safe_device,
    ("torch", "Tensor"): rebuild.TENSOR,
    ("torch.nn.parameter", "Parameter"): rebuild.PARAMETER,
    ("torch._utils", "_rebuild_tensor"): rebuild.rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild.rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild.rebuild_tensor_v3,
    ("torch.storage", "UntypedStorage"): rebuild.StorageType(torch.uint8, "UntypedStorage"),
    ("torch._utils", "_rebuild_parameter"): rebuild.rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild.rebuild_parameter_with_state,
    ("torch._utils", "_rebuild_sparse_tensor"): rebuild.rebuild_sparse_tensor,
    ("torch._utils", "_rebuild_qtensor"): rebuild.rebuild_qtensor,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): rebuild.rebuild_from_numpy,
    ("torch._tensor", "_rebuild_from_type_v2"): rebuild.rebuild_from_type_v2,
    ("torch.serialization", "_get_layout"): rebuild.get_layout,
    ("torch", "per_tensor_affine"): torch.per_tensor_affine,
    ("torch", "per_channel_affine"): torch.per_channel_affine,
    ("torch", "per_channel_affine_float_qparams"): torch.per_channel_affine_float_qparams,
    ("argparse", "Namespace"): rebuild.PlainNamespace,
    ("lightning.fabric.utilities.data", "AttributeDict"): rebuild.PlainDict,
    ("lightning_fabric.utilities.data", "AttributeDict"): rebuild.PlainDict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): rebuild.PlainDict,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): rebuild.PlainDict,
    ("numpy", "dtype"): rebuild.numpy_dtype,
    ("numpy", "ndarray"): rebuild.NDARRAY,
    ("numpy.core.multiarray", "_reconstruct"): rebuild.numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): rebuild.numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): rebuild.numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): rebuild.numpy_frombuffer,
    ("numpy.core.multiarray", "scalar"): rebuild.numpy_scalar,
    ("numpy._core.multiarray", "scalar"): rebuild.numpy_scalar,
}


def canonical(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global, mapped as pickle maps Python 2 names (``__builtin__`` -> ``builtins``)."""
    mapped = _compat_pickle.NAME_MAPPING.get((module, name))
    if mapped is not None:
        return mapped
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def lookup(module: str, name: str) -> Any | None:
    """The replacement for a global, or None if it is not allowed."""
    module, name = canonical(module, name)
    found = _FIXED.get((module, name))
    if found is not None:
        return found
    if module == "torch" and name in STORAGE_DTYPES:
        return rebuild.StorageType(STORAGE_DTYPES[name], name)
    if module == "torch" and name in TORCH_DTYPE_NAMES:
        return getattr(torch, name)
    return None


def is_allowed(module: str, name: str) -> bool:
    return lookup(module, name) is not None


# Names an OrderedDict's BUILD state may not set: they would shadow its methods.
_ORDERED_DICT_NAMES = frozenset(dir(collections.OrderedDict))


def build(inst: Any, state: Any) -> None:
    """The BUILD opcode: fill ``inst`` with ``state``, for the few kinds of objects that take one.

    Raises:
        RefusedData: anything else (a tensor's legacy ``__setstate__`` runs ``set_`` on its arguments).
        BadData: a NumPy state whose sizes disagree.
    """
    if isinstance(inst, rebuild.SafeState):
        inst.__setstate__(state)
    elif type(inst) is collections.OrderedDict:
        # torch's state dicts carry their `_metadata` as an attribute.
        if not isinstance(state, dict) or not all(
            type(k) is str and not k.startswith("__") and k not in _ORDERED_DICT_NAMES for k in state
        ):
            raise RefusedData("OrderedDict attributes that are not plain names")
        charge(_PAIR * len(state), "OrderedDict attributes")
        inst.__dict__.update(state)
    elif type(inst) is np.ndarray:
        inst.__setstate__(_array_state(state))
    elif isinstance(inst, np.dtype):
        setstate: Any = inst.__setstate__  # type: ignore[attr-defined]  # present at run time, not in the stubs
        setstate(_dtype_state(inst, state))
    else:
        raise RefusedData(f"BUILD of {describe(inst)} (only plain records, OrderedDicts and NumPy data take one)")


def _array_state(state: Any) -> tuple[Any, ...]:
    """``(version, shape, dtype, fortran, raw bytes)`` whose bytes are exactly the array's."""
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
        raise RefusedData(f"NumPy array state {describe(state)}")
    _, shape, dtype, fortran, raw = state
    shape = rebuild._ints(shape, "NumPy shape")
    if not isinstance(dtype, np.dtype) or dtype.hasobject or type(fortran) is not bool:
        raise RefusedData("NumPy array of Python objects")
    if not isinstance(raw, (bytes, bytearray)) or math.prod(shape) * dtype.itemsize != len(raw):
        raise BadData(f"NumPy array of shape {list(shape)} and dtype {dtype} without exactly its bytes")
    charge(len(raw), "a NumPy array")
    return (1, shape, dtype, fortran, raw)


def _dtype_state(dtype: np.dtype[Any], state: Any) -> tuple[Any, ...]:
    """Only a byte order (and a datetime unit) may change; fields, sizes and flags stay NumPy's own."""
    natural = dtype.__reduce__()[2]
    if not isinstance(state, tuple) or len(state) not in (8, 9) or not isinstance(natural, tuple):
        raise RefusedData(f"NumPy dtype state {describe(state)}")
    if state[1] not in ("<", ">", "|", "=") or state[2:8] != natural[2:8]:
        raise RefusedData(f"NumPy dtype state {describe(state)} changes more than the byte order")
    if len(state) == 9 and not (
        dtype.kind in "mM"
        and isinstance(state[8], tuple)
        and len(state[8]) == 2
        and state[8][0] is None
        and isinstance(state[8][1], tuple)
        and len(state[8][1]) == 4
        and isinstance(state[8][1][0], bytes)
        and len(state[8][1][0]) <= 8
        and all(type(v) is int for v in state[8][1][1:])
    ):
        raise RefusedData("NumPy dtype metadata other than a datetime unit")
    return state
