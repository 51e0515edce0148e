"""The globals a pickle may name, and what each is rebuilt with. Reviewed by hand: keep it short.

Every entry maps ``(module, name)`` to a *replacement* that builds plain data from plain data:
no entry imports a module named in the file or calls anything the file chose.
"""

from __future__ import annotations

import codecs
import collections
from typing import Any

import numpy as np
import torch

from torchkeep.format.pickle import rebuild

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


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol 2 writes bytes as ``_codecs.encode(str, 'latin1')``; only that is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise rebuild.RefusedData(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_FIXED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
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
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.serialization", "_get_layout"): rebuild.get_layout,
    ("torch", "per_tensor_affine"): torch.per_tensor_affine,
    ("torch", "per_channel_affine"): torch.per_channel_affine,
    ("torch", "per_channel_affine_float_qparams"): torch.per_channel_affine_float_qparams,
    ("argparse", "Namespace"): rebuild.PlainNamespace,
    ("lightning.fabric.utilities.data", "AttributeDict"): rebuild.PlainDict,
    ("lightning_fabric.utilities.data", "AttributeDict"): rebuild.PlainDict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): rebuild.PlainDict,
    ("lightning.pytorch.utilities.parsing", "AttributeDict"): rebuild.PlainDict,
    ("copyreg", "_reconstructor"): rebuild.reconstructor,
    ("copy_reg", "_reconstructor"): rebuild.reconstructor,
    ("builtins", "object"): object,
    ("builtins", "dict"): dict,
    ("numpy", "dtype"): rebuild.numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): rebuild.numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): rebuild.numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): rebuild.numpy_scalar,
    ("numpy._core.multiarray", "scalar"): rebuild.numpy_scalar,
}


def lookup(module: str, name: str) -> Any | None:
    """The replacement for a global, or None if it is not allowed."""
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
