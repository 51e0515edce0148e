"""ExportedProgram archives (``torch.export.save``, ``.pt2``): weights and I/O read as data, nothing run.

The archive is a zip under one folder::

    archive_format                      "pt2"
    models/<model>.json                 the serialized program: graph, signature, tensor metadata
    data/weights/<model>_weights_config.json
                                        fqn -> {path_name, is_param, use_pickle, tensor_meta}
    data/weights/weight_<n>             a storage's raw bytes (or a torch.save file when use_pickle)
    data/constants/...                  non-persistent buffers and constants (not weights)

Each weight is a view (sizes, strides, offset from its ``tensor_meta``) of its member's bytes,
checked like any tensor torchkeep rebuilds; weights sharing a member stay shared. A pickled weight
(a tensor subclass) is read by the restricted unpickler. The program's JSON is only read: its
symbolic shape expressions, which ``torch.export.load`` hands to ``sympy.sympify`` (Python's
``eval``), are shown as text and never evaluated (``pt2_audit`` is what ``torchkeep scan`` checks).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError, UnsafeCheckpointError
from torchkeep.format.deploy.common import (
    KIND_TITLES,
    Description,
    Dim,
    Port,
    TensorMeta,
    read_member,
    read_member_storage,
    zip_prefix,
)
from torchkeep.format.dtypes import dtype_name
from torchkeep.format.jsondoc import parse_json
from torchkeep.format.names import is_plain_name
from torchkeep.format.pickle import rebuild
from torchkeep.format.pickle.rebuild import BadData, LoadedStorage, RefusedData, describe
from torchkeep.format.pickle.torchfile import open_zip, read_zip_stream

ARCHIVE_FORMAT = "pt2"
# torch/_export/serde/schema.py ScalarType: the on-disk codes of tensor_meta["dtype"].
SCALAR_TYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    9: torch.complex32,
    10: torch.complex64,
    11: torch.complex128,
    12: torch.bool,
    13: torch.bfloat16,
    28: torch.uint16,
    29: torch.float8_e4m3fn,
    30: torch.float8_e5m2,
    31: torch.float8_e4m3fnuz,
    32: torch.float8_e5m2fnuz,
    34: torch.uint32,
    35: torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):
    SCALAR_TYPES[33] = torch.float8_e8m0fnu
STRIDED = 7  # schema Layout.Strided


def _scalar_type(code: Any) -> torch.dtype | None:
    return SCALAR_TYPES.get(code) if type(code) is int else None


def is_exported_program(names: list[str]) -> bool:
    """A zip with ``archive_format`` at its top (or under one folder), as torch.export.load looks for."""
    return zip_prefix(names, "archive_format") is not None


@dataclass
class _Archive:
    archive: zipfile.ZipFile
    path: str
    size: int
    prefix: str
    infos: dict[str, zipfile.ZipInfo]
    models: list[str]

    def info(self, name: str) -> zipfile.ZipInfo | None:
        return self.infos.get(self.prefix + name)

    def json(self, name: str) -> Any:
        info = self.info(name)
        if info is None:
            raise CorruptCheckpointError(self.path, f"ExportedProgram archive: {name} is missing")
        return parse_json(read_member(self.archive, info, self.path), self.path, name)


def _open(archive: zipfile.ZipFile, path: str, size: int) -> _Archive:
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if info.filename in infos:
            raise CorruptCheckpointError(path, f"zip entry {info.filename!r} appears twice")
        infos[info.filename] = info
    prefix = zip_prefix(list(infos), "archive_format")
    if prefix is None:
        raise CorruptCheckpointError(path, "not an ExportedProgram archive: no archive_format entry")
    fmt = read_member(archive, infos[prefix + "archive_format"], path, limit=64).strip()
    if fmt != ARCHIVE_FORMAT.encode():
        raise CorruptCheckpointError(path, f"archive_format is {fmt[:20]!r}, not 'pt2'")
    models = sorted(
        name[len(prefix) + len("models/") : -len(".json")]
        for name in infos
        if name.startswith(prefix + "models/") and name.endswith(".json") and name.count("/") == prefix.count("/") + 1
    )
    if not models:
        if any(name.startswith(prefix + "data/aotinductor/") for name in infos):
            raise CorruptCheckpointError(
                path, "holds an AOTInductor-compiled model (a shared library), not an ExportedProgram: torchkeep "
                "does not read weights out of compiled code",
            )  # fmt: skip
        raise CorruptCheckpointError(path, "ExportedProgram archive: no models/<name>.json in it")
    return _Archive(archive, path, size, prefix, infos, models)


# -- tensor metadata ---------------------------------------------------------------------------------


def _int(value: Any, path: str, what: str) -> int:
    if isinstance(value, dict) and set(value) == {"as_int"} and type(value["as_int"]) is int:
        number: int = value["as_int"]
        if 0 <= number <= rebuild.INT64_MAX:
            return number
    raise CorruptCheckpointError(path, f"{what}: expected a non-negative integer, got {describe(value)}")


@dataclass(frozen=True)
class _Meta:
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int


def _tensor_meta(meta: Any, path: str, fqn: str) -> _Meta:
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(path, "weight has no tensor metadata", key=fqn)
    dtype = _scalar_type(meta.get("dtype"))
    if dtype is None:
        raise CorruptCheckpointError(path, f"unknown dtype code {describe(meta.get('dtype'))}", key=fqn)
    if meta.get("layout", STRIDED) != STRIDED:
        raise CorruptCheckpointError(path, f"layout {describe(meta.get('layout'))} is not a strided tensor", key=fqn)
    sizes, strides = meta.get("sizes"), meta.get("strides")
    if not isinstance(sizes, list) or not isinstance(strides, list) or len(sizes) > 64 or len(sizes) != len(strides):
        raise CorruptCheckpointError(path, "sizes and strides are not two lists of the same length", key=fqn)
    return _Meta(
        dtype,
        tuple(_int(s, path, f"{fqn} size") for s in sizes),
        tuple(_int(s, path, f"{fqn} stride") for s in strides),
        _int(meta.get("storage_offset", {"as_int": 0}), path, f"{fqn} storage offset"),
    )


def _payloads(found: _Archive, model: str) -> dict[str, dict[str, Any]]:
    config = found.json(f"data/weights/{model}_weights_config.json")
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(found.path, f"{model}_weights_config.json has no 'config' object")
    for fqn, entry in entries.items():
        if not (
            isinstance(entry, dict)
            and is_plain_name(entry.get("path_name"))
            and isinstance(entry.get("use_pickle", False), bool)
        ):
            raise CorruptCheckpointError(found.path, "malformed weight entry (path_name must be a plain name)", key=fqn)
    return entries


def _name(found: _Archive, model: str, fqn: str) -> str:
    return fqn if len(found.models) == 1 else f"{model}.{fqn}"


# -- reading -------------------------------------------------------------------------------------------


def _pickled(found: _Archive, member: zipfile.ZipInfo, fqn: str) -> torch.Tensor:
    data = read_member(found.archive, member, found.path)
    where = f"{found.path}:{member.filename}"
    value = read_zip_stream(io.BytesIO(data), where, len(data))
    if not isinstance(value, torch.Tensor):
        raise CorruptCheckpointError(found.path, f"pickled weight holds {describe(value)}, not a tensor", key=fqn)
    return value


def _raw(found: _Archive, meta: _Meta, storage: LoadedStorage, fqn: str) -> torch.Tensor:
    if storage.untyped.nbytes() == 0 and 0 not in meta.sizes:
        raise CorruptCheckpointError(found.path, "weight has no data (torch.export.save writes none for fake "
                                     "tensors)", key=fqn)  # fmt: skip
    try:
        return rebuild.rebuild_tensor_v2(storage, meta.offset, meta.sizes, meta.strides)
    except BadData as exc:
        raise CorruptCheckpointError(found.path, str(exc), key=fqn) from exc
    except RefusedData as exc:
        raise UnsafeCheckpointError(found.path, f"refused: {exc}") from exc


def _storage(found: _Archive, member: zipfile.ZipInfo, dtype: torch.dtype, fqn: str) -> LoadedStorage:
    data = read_member_storage(found.archive, member, found.path, found.size)
    item = rebuild.itemsize(dtype)
    if data.numel() % item:
        raise CorruptCheckpointError(found.path, f"{member.filename!r} holds {data.numel()} bytes, not a whole "
                                     f"number of {dtype_name(dtype)} elements", key=fqn)  # fmt: skip
    return LoadedStorage(data.untyped_storage(), dtype, "cpu")


def _model_weights(found: _Archive, model: str) -> Iterator[tuple[str, torch.Tensor]]:
    legacy = found.info(f"data/weights/{model}.pt")
    if legacy is not None:  # torch.export.save before the weights config: one torch.save'd state dict
        data = read_member(found.archive, legacy, found.path)
        state = read_zip_stream(io.BytesIO(data), f"{found.path}:{legacy.filename}", len(data))
        if not isinstance(state, dict):
            raise CorruptCheckpointError(found.path, f"{legacy.filename} holds {describe(state)}, not a state dict")
        for fqn, value in state.items():
            if isinstance(fqn, str) and isinstance(value, torch.Tensor):
                yield _name(found, model, fqn), value
        return
    storages: dict[tuple[str, torch.dtype], LoadedStorage] = {}
    for fqn, entry in _payloads(found, model).items():
        member = found.info(f"data/weights/{entry['path_name']}")
        if member is None:
            raise CorruptCheckpointError(found.path, f"weight file {entry['path_name']!r} is missing", key=fqn)
        if entry.get("use_pickle"):
            tensor = _pickled(found, member, fqn)
        else:
            meta = _tensor_meta(entry.get("tensor_meta"), found.path, fqn)
            key = (member.filename, meta.dtype)
            if key not in storages:  # weights that share a file share their storage, as torch.export.load gives
                storages[key] = _storage(found, member, meta.dtype, fqn)
            tensor = _raw(found, meta, storages[key], fqn)
        yield _name(found, model, fqn), tensor.detach() if tensor.requires_grad else tensor


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every weight (parameters and persistent buffers, as ``ep.state_dict``) by its FQN; nothing is run.

    Raises:
        CorruptCheckpointError: a damaged archive, naming the file and the problem.
        UnsafeCheckpointError: a pickled weight naming a global outside the allowlist.
    """
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as raw, open_zip(raw, path) as archive:
        found = _open(archive, path, size)
        with rebuild.deferred_checks(path):
            return {name: tensor for model in found.models for name, tensor in _model_weights(found, model)}


# -- describing -----------------------------------------------------------------------------------------


_SYMBOL = re.compile(r"Symbol\('([A-Za-z_]\w*)'(?:,\s*\w+=\w+)*\)")


def _dim(value: Any) -> Dim:
    if isinstance(value, dict) and type(value.get("as_int")) is int:
        number: int = value["as_int"]
        return number
    if isinstance(value, dict) and isinstance(value.get("as_expr"), dict):
        expr = value["as_expr"].get("expr_str")
        if isinstance(expr, str):  # shown as text, never evaluated; Symbol('s31', positive=True) reads as s31
            expr = _SYMBOL.sub(r"\1", expr[:200])
            return expr if len(expr) <= 80 else expr[:77] + "..."
    return "?"


def _port(name: str, argument: Any, tensors: dict[str, Any]) -> Port:
    if not isinstance(argument, dict) or len(argument) != 1:
        return Port(name, type="unknown")
    (kind, value), *_ = argument.items()
    if kind == "as_tensor" and isinstance(value, dict) and isinstance(value.get("name"), str):
        meta = tensors.get(value["name"])
        dtype = _scalar_type(meta.get("dtype")) if isinstance(meta, dict) else None
        sizes = meta.get("sizes") if isinstance(meta, dict) else None
        shape = tuple(_dim(s) for s in sizes) if isinstance(sizes, list) else None
        return Port(value["name"], dtype_name(dtype) if dtype else None, shape, "Tensor")
    return Port(name, type=str(kind).removeprefix("as_"))


def _signature(program: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]] | None:
    module = program.get("graph_module") if isinstance(program, dict) else None
    if not isinstance(module, dict) or not isinstance(module.get("signature"), dict):
        return None
    graph = module.get("graph")
    tensors = graph.get("tensor_values") if isinstance(graph, dict) else None
    if not isinstance(tensors, dict):
        tensors = {}
    signature = module["signature"]
    inputs: list[Port] = []
    outputs: list[Port] = []
    for spec in signature.get("input_specs") or []:
        if isinstance(spec, dict) and isinstance(spec.get("user_input"), dict):
            inputs.append(_port(f"input_{len(inputs)}", spec["user_input"].get("arg"), tensors))
    for spec in signature.get("output_specs") or []:
        if isinstance(spec, dict) and isinstance(spec.get("user_output"), dict):
            outputs.append(_port(f"output_{len(outputs)}", spec["user_output"].get("arg"), tensors))
    return tuple(inputs), tuple(outputs)


def describe_file(path: str) -> Description:
    """Kind, weights (from the weights config: no tensor data read) and the program's user inputs/outputs."""
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as raw, open_zip(raw, path) as archive:
        found = _open(archive, path, size)
        tensors: list[TensorMeta] = []
        notes: list[str] = []
        for model in found.models:
            if found.info(f"data/weights/{model}.pt") is not None:
                tensors += [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in _model_weights(found, model)]
                continue
            for fqn, entry in _payloads(found, model).items():
                meta = _tensor_meta(entry.get("tensor_meta"), path, fqn)
                tensors.append(TensorMeta(_name(found, model, fqn), meta.dtype, meta.sizes))
        program = found.json(f"models/{found.models[0]}.json")
        version = program.get("torch_version") if isinstance(program, dict) else None
        constants = [n for n in found.infos if n.startswith(found.prefix + "data/constants/") and "config" not in n]
    ports = _signature(program)
    if ports is None:
        notes.append("the program's signature is missing or malformed: inputs and outputs are not listed")
    if len(found.models) > 1:
        notes.append(f"{len(found.models)} programs ({', '.join(found.models)}): weights are named <program>.<fqn>; "
                     f"inputs and outputs are {found.models[0]}'s")  # fmt: skip
    if constants:
        notes.append(f"{len(constants)} constant(s) (non-persistent buffers, lifted constants) are not weights: "
                     "not listed or loaded")  # fmt: skip
    written = f", written by torch {version}" if isinstance(version, str) and len(version) < 40 else ""
    summary = f"{KIND_TITLES['exported_program']}: program {found.models[0]}{written}"
    inputs, outputs = ports if ports is not None else (None, None)
    return Description("exported_program", summary, tensors, inputs, outputs, tuple(notes))
