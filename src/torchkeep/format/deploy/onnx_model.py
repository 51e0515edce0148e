"""ONNX models: initializers by name as tensors, and the graph's inputs and outputs, through ``onnx``.

The model is parsed with ``onnx.load(load_external_data=False)`` (protobuf parsing runs no code);
external data is read by torchkeep, only from a plain file name inside the model's folder (the
rules of :mod:`torchkeep.format.names`), by the offset and length the tensor records, checked
against the file's size and the tensor's shape before anything is allocated. ``onnx`` is an
optional extra (``pip install 'torchkeep[export]'``), imported when an ONNX file is read.

The dynamo exporter names initializers by the module's FQN (``fc1.weight``), so ``load_into`` of an
eager model works where the exporter kept the weights as they were; an optimizing export may fold
some (a BatchNorm into the Conv before it) or add constants (``val_10``): what the file holds is
what is returned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchkeep._warn import warn
from torchkeep.errors import CorruptCheckpointError, UnsupportedTensorError
from torchkeep.format.deploy.common import KIND_TITLES, Description, Dim, Port, TensorMeta
from torchkeep.format.dtypes import dtype_name
from torchkeep.format.names import member

ONNX_EXTRA = "pip install 'torchkeep[export]'"
# onnx.TensorProto.DataType -> torch dtype (types torch has no dtype for are reported, not guessed).
ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    4: torch.uint16,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.uint32,
    13: torch.uint64,
    14: torch.complex64,
    15: torch.complex128,
    16: torch.bfloat16,
    17: torch.float8_e4m3fn,
    18: torch.float8_e4m3fnuz,
    19: torch.float8_e5m2,
    20: torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):
    ONNX_DTYPES[24] = torch.float8_e8m0fnu
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# The dynamo exporter records which graph inputs were parameters and buffers of the module.
_KIND_KEY = "pkg.torch.export.graph_signature.InputSpec.kind"
# A model file larger than this is not parsed (protobuf's own limit is 2 GiB).
MAX_MODEL_BYTES = 2 << 30


def import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"reading ONNX files needs the onnx package: {ONNX_EXTRA}") from exc
    return onnx


def looks_like_onnx(head: bytes) -> bool:
    """A serialized ModelProto: field 1 (``ir_version``, a small varint) then another ModelProto field.

    Exporters write fields in number order: ``ir_version`` first, then ``producer_name`` (2),
    ``producer_version`` (3), ``domain`` (4), ``model_version`` (5), ``doc_string`` (6), ``graph`` (7)
    or ``opset_import`` (8). A pickle never starts with byte 0x08; safetensors is tested first.
    """
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in b"\x12\x1a\x22\x28\x32\x3a\x42"


def _load(path: str) -> Any:
    onnx = import_onnx()
    if os.path.getsize(path) > MAX_MODEL_BYTES:
        raise CorruptCheckpointError(path, f"an ONNX model over {MAX_MODEL_BYTES} bytes cannot be a valid protobuf")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and whatever onnx raises on damaged bytes
        raise CorruptCheckpointError(path, f"not a readable ONNX model: {type(exc).__name__}: {exc}") from exc
    if not model.HasField("graph"):
        raise CorruptCheckpointError(path, "ONNX model without a graph")
    return model


def _text(value: Any) -> str:
    """A string field for display: protobuf hands back bytes for a proto2 string that is not UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _name(tensor: Any, path: str) -> str:
    if not isinstance(tensor.name, str):
        raise CorruptCheckpointError(path, f"an initializer's name is not UTF-8 text ({_text(tensor.name)!r})")
    name: str = tensor.name
    return name


def _dtype(tensor: Any, path: str) -> torch.dtype:
    dtype = ONNX_DTYPES.get(tensor.data_type)
    if dtype is None:
        codes = import_onnx().TensorProto.DataType
        name = codes.Name(tensor.data_type) if tensor.data_type in codes.values() else tensor.data_type
        raise UnsupportedTensorError(tensor.name, f"ONNX element type {name} in {path} has no torch dtype")
    return dtype


def _shape(tensor: Any, path: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in tensor.dims)
    if len(dims) > 64 or any(d < 0 for d in dims):
        raise CorruptCheckpointError(path, f"initializer has an impossible shape {list(dims)[:8]}", key=tensor.name)
    return dims


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _external(tensor: Any, path: str) -> bytes:
    """An initializer's bytes from its external file: a plain name in the model's folder, checked ranges."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location")
    file = member(Path(path).parent, location, path, what=f"external data file of initializer {tensor.name!r}")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError as exc:
        raise CorruptCheckpointError(path, "external data offset or length is not a number", key=tensor.name) from exc
    needed = _nbytes(_dtype(tensor, path), _shape(tensor, path))
    if offset < 0 or (length is not None and length != needed):
        raise CorruptCheckpointError(path, f"external data of {length} bytes at offset {offset} does not hold the "
                                     f"{needed} bytes its shape needs", key=tensor.name)  # fmt: skip
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset + needed > size:
                raise CorruptCheckpointError(path, f"external data runs past the end of {location!r} "
                                             f"({offset} + {needed} > {size} bytes)", key=tensor.name)  # fmt: skip
            f.seek(offset)
            data = f.read(needed)
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(path, f"external data file {location!r} is missing", key=tensor.name) from exc
    except OSError as exc:
        raise CorruptCheckpointError(path, f"external data file {location!r}: {exc}", key=tensor.name) from exc
    if len(data) != needed:
        raise CorruptCheckpointError(path, f"external data file {location!r} is truncated", key=tensor.name)
    return data


def _tensor(tensor: Any, path: str) -> torch.Tensor:
    dtype, shape = _dtype(tensor, path), _shape(tensor, path)
    needed = _nbytes(dtype, shape)
    if tensor.HasField("segment"):
        raise CorruptCheckpointError(path, "segmented initializers are not supported", key=tensor.name)
    if tensor.data_location == EXTERNAL:
        data = _external(tensor, path)
    elif tensor.HasField("raw_data"):
        data = tensor.raw_data
        if len(data) != needed:
            raise CorruptCheckpointError(path, f"raw data of {len(data)} bytes for a shape that needs {needed}",
                                         key=tensor.name)  # fmt: skip
    else:  # typed fields (float_data, int32_data, ...): onnx knows how each type is packed in them
        onnx = import_onnx()
        try:
            array = onnx.numpy_helper.to_array(tensor)
        except Exception as exc:  # onnx raises ValueError/TypeError on fields that do not fit the shape
            raise CorruptCheckpointError(path, f"unreadable initializer: {exc}", key=tensor.name) from exc
        data = np.ascontiguousarray(array).tobytes()
        if len(data) != needed:
            raise CorruptCheckpointError(path, "initializer data does not fit its shape", key=tensor.name)
    if not needed:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every initializer of the main graph, by name, in the file's order.

    Raises:
        ImportError: ``onnx`` is not installed (``pip install 'torchkeep[export]'``).
        CorruptCheckpointError: a damaged model, or external data outside the folder or out of range.
        UnsupportedTensorError: an element type torch has no dtype for (4-bit, strings).
    """
    model = _load(path)
    marked = _marked(model.graph)
    out: dict[str, torch.Tensor] = {}
    left: list[str] = []
    for tensor in model.graph.initializer:
        name = _name(tensor, path)
        if name in out:
            raise CorruptCheckpointError(path, "two initializers share this name", key=name)
        if marked and name not in marked:
            left.append(name)  # a constant the exporter made, or a weight folded into another (BatchNorm)
            continue
        out[name] = _tensor(tensor, path)
    if left:
        shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
        warn(
            f"{path}: {len(left)} initializer(s) are not the model's parameters or buffers but constants the "
            f"exporter made or weights it folded (a BatchNorm into its Conv): {shown}; they are not returned, "
            "since loading them into a model would change what it computes"
        )
    return out


def _marked(graph: Any) -> set[str]:
    """The values the exporter marks as the model's parameters or buffers (none for older exporters)."""
    return {
        value.name
        for value in [*graph.input, *graph.value_info]
        for prop in value.metadata_props
        if prop.key == _KIND_KEY and prop.value in ("PARAMETER", "BUFFER")
    }


def _type_port(value: Any, onnx: Any) -> Port:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return Port(_text(value.name), type=kind or "unknown")
    tensor_type = value.type.tensor_type
    dtype = ONNX_DTYPES.get(tensor_type.elem_type)
    name = dtype_name(dtype) if dtype is not None else onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    shape: tuple[Dim, ...] | None = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else _text(d.dim_param) if d.HasField("dim_param") else "?"
            for d in tensor_type.shape.dim
        )
    return Port(_text(value.name), name, shape, "tensor")


def describe_file(path: str) -> Description:
    """Kind, initializers (dtypes and shapes, no external data read), graph inputs and outputs."""
    onnx = import_onnx()
    model = _load(path)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    tensors: list[TensorMeta] = []
    for tensor in graph.initializer:
        tensors.append(TensorMeta(_name(tensor, path), _dtype(tensor, path), _shape(tensor, path)))
    inputs = tuple(_type_port(v, onnx) for v in graph.input if v.name not in initializers)
    outputs = tuple(_type_port(v, onnx) for v in graph.output)
    notes: list[str] = []
    marked = _marked(graph) & initializers
    if marked:
        constants = [t.name for t in tensors if t.name not in marked]
        if constants:
            shown = ", ".join(constants[:5]) + (", ..." if len(constants) > 5 else "")
            notes.append(f"the exporter marks {len(marked)} initializer(s) as parameters or buffers; the other "
                         f"{len(constants)} are constants it made or folded weights ({shown})")  # fmt: skip
    external = sum(1 for t in graph.initializer if t.data_location == EXTERNAL)
    if external:
        notes.append(f"{external} initializer(s) keep their data in an external file beside the model")
    if graph.sparse_initializer:
        notes.append(f"{len(graph.sparse_initializer)} sparse initializer(s) are not read")
    opsets = ", ".join(f"{_text(o.domain) or 'ai.onnx'} {o.version}" for o in model.opset_import)
    producer = (
        f", produced by {_text(model.producer_name)} {_text(model.producer_version)}".rstrip()
        if model.producer_name
        else ""
    )
    summary = f"{KIND_TITLES['onnx']}: IR version {model.ir_version}, opset {opsets or '?'}{producer}"
    return Description("onnx", summary, tensors, inputs, outputs, tuple(notes))
