"""TorchScript archives (``torch.jit.save``): their weights, read without running their code or pickles.

An archive is a zip holding ``<prefix>/data.pkl`` (the module tree: instances of ``__torch__.*``
classes, their attributes filled by BUILD, tensors by ``_rebuild_tensor_v2`` over ``data/<n>``
storages), ``constants.pkl``, and ``code/`` (the TorchScript source of every class, which
``torch.jit.load`` compiles and runs). Here ``data.pkl`` is read by torchkeep's restricted
unpickler, in which the ``__torch__.*`` classes this pickle names (and only in a TorchScript
archive) are inert records: created by NEWOBJ and filled by BUILD with plain data, never called.
Anything else the pickle names stays under the allowlist, so an ``os.system`` REDUCE is refused.

Which attributes are parameters and buffers is read from the class headers in ``code/`` as text
(``__parameters__ = ["weight", "bias", ]``); the names follow the module attribute path, as
``torch.jit.load(f).state_dict()`` gives them. ``forward``'s signature is read from the same text
when it is a plain ``def forward(self, x: Tensor) -> Tensor:``; otherwise it is reported unknown.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from torchkeep.errors import CorruptCheckpointError, UnsupportedTensorError
from torchkeep.format.deploy.common import (
    KIND_TITLES,
    Description,
    Port,
    TensorMeta,
    read_member,
)
from torchkeep.format.pickle import rebuild
from torchkeep.format.pickle.opwalk import scan_pickle_bytes
from torchkeep.format.pickle.rebuild import LoadedStorage, RefusedData, StorageType, charge, describe, itemsize
from torchkeep.format.pickle.torchfile import open_zip, read_zip_stream
from torchkeep.format.pickle.unpickler import RestrictedUnpickler

# Code files larger than this (each), or more code than this in all, are not parsed: the weights are
# then decided by attribute type alone (a note says so).
MAX_CODE_FILE = 8 << 20
MAX_CODE_TOTAL = 64 << 20
_TORCH_MODULE = "__torch__"
_TORCHBIND = "__torch__.torch.classes."


class ScriptRecord(rebuild.SafeState):
    """An instance of a TorchScript class, as data: the attributes its BUILD state sets, nothing else.

    ``qualname`` (``__torch__.torch.nn.modules.linear.Linear``) is set on each record class. A pickle
    can create one (NEWOBJ) and fill it (BUILD); calling the class (REDUCE) is refused, since the
    real class would run the archive's code.
    """

    qualname: ClassVar[str] = _TORCH_MODULE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RefusedData(f"call of the TorchScript class {self.qualname}; its objects are read as records only")

    def __setstate__(self, state: Any) -> None:
        attributes: dict[str, Any] = {}
        if isinstance(state, dict) and all(type(k) is str for k in state):
            charge(48 * len(state), "a TorchScript object's attributes")
            attributes = dict(state)
        else:  # a torchbind object's own state (packed parameters): kept, not interpreted
            vars(self)["state"] = state
        vars(self)["attributes"] = attributes

    def __reduce__(self) -> Any:  # never pickled back
        raise TypeError("ScriptRecord is read-only")


def _record_class(qualname: str) -> type[ScriptRecord]:
    return type("ScriptRecord", (ScriptRecord,), {"qualname": qualname})


def _list_of(kinds: tuple[type, ...], what: str) -> Callable[[Any], list[Any]]:
    def build(data: Any) -> list[Any]:
        if type(data) is not list or not all(type(v) in kinds for v in data):
            raise RefusedData(f"torch.jit._pickle.{what} of {describe(data)}")
        return data

    return build


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    """TorchScript tags typed lists and dicts with their type's name; the value itself is plain data."""
    if type(value) not in (list, dict) or not isinstance(type_str, str) or len(type_str) > 4096:
        raise RefusedData(f"torch.jit._pickle.restore_type_tag of {describe(value)}")
    return value


# TorchScript's own helpers for typed lists: each returns its (checked) argument, as torch's does.
JIT_HELPERS: dict[tuple[str, str], Any] = {
    ("torch.jit._pickle", "build_intlist"): _list_of((int, bool), "build_intlist"),
    ("torch.jit._pickle", "build_doublelist"): _list_of((float,), "build_doublelist"),
    ("torch.jit._pickle", "build_boollist"): _list_of((bool,), "build_boollist"),
    ("torch.jit._pickle", "build_tensorlist"): _list_of((torch.Tensor, torch.nn.Parameter), "build_tensorlist"),
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


def is_torchscript(names: list[str]) -> bool:
    """torch.load hands a zip holding ``constants.pkl`` to torch.jit.load: the same test, by content."""
    return any(n == "constants.pkl" or (n.endswith("/constants.pkl") and n.count("/") == 1) for n in names)


def _extra_globals(data: bytes, path: str) -> dict[tuple[str, str], Any]:
    """The data.pkl's ``__torch__.*`` classes as record classes, plus TorchScript's list helpers.

    The classes are found by the scanner's static walk of the same bytes; one it does not see is
    refused by the unpickler (fail closed).
    """
    scan, _ = scan_pickle_bytes(data, f"{path}:data.pkl")
    extra = dict(JIT_HELPERS)
    for ref in scan.globals:
        if ref.module == _TORCH_MODULE or ref.module.startswith(_TORCH_MODULE + "."):
            extra[(ref.module, ref.name)] = _record_class(f"{ref.module}.{ref.name}")
    return extra


# -- the code/ text: class headers and forward's signature, parsed as text, never run ---------------

_CLASS = re.compile(r"class (\w+)\((\w*)\):\s*$")
_NAME_LIST = re.compile(r'\s*\[((?:\s*"[^"\\]*"\s*,)*\s*(?:"[^"\\]*")?\s*)\]\s*$')
_STRING = re.compile(r'"([^"\\]*)"')
_SIMPLE_TYPE = re.compile(r"[\w.]+(?:\[[\w.,\s\[\]]*\])?")


@dataclass
class ClassInfo:
    """What a class header in code/ says: its base, its parameter and buffer names, forward's header."""

    base: str
    parameters: list[str] | None = None
    buffers: list[str] | None = None
    forward: str | None = None


def _names(text: str) -> list[str] | None:
    match = _NAME_LIST.fullmatch(text)
    return None if match is None else _STRING.findall(match.group(1))


def parse_code(module: str, text: str) -> dict[str, ClassInfo]:
    """Class headers of one code file (module ``__torch__.a.b``), by qualified class name."""
    classes: dict[str, ClassInfo] = {}
    current: ClassInfo | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith(" "):
            match = _CLASS.match(line)
            current = None
            if match:
                current = classes[f"{module}.{match.group(1)}"] = ClassInfo(base=match.group(2))
            continue
        if current is None or line.startswith("   "):
            continue
        body = line[2:]
        if body.startswith("__parameters__ ="):
            current.parameters = _names(body[len("__parameters__ =") :])
        elif body.startswith("__buffers__ ="):
            current.buffers = _names(body[len("__buffers__ =") :])
        elif body.startswith("def forward(") and current.forward is None:
            header = [body]
            while not header[-1].rstrip().endswith(":") and i < len(lines) and len(header) < 1000:
                header.append(lines[i].strip())
                i += 1
            current.forward = " ".join(header)
    return classes


def _split_top(text: str) -> list[str] | None:
    """Split at commas outside brackets; None if the brackets do not balance."""
    parts, depth, start = [], 0, 0
    for pos, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            parts.append(text[start:pos].strip())
            start = pos + 1
    if depth:
        return None
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def parse_forward(header: str) -> tuple[tuple[Port, ...], tuple[Port, ...]] | None:
    """``def forward(self: T, x: Tensor, y: Optional[Tensor]=None) -> Tensor:`` as ports; None if not that simple."""
    match = re.fullmatch(r"def forward\((.*)\)\s*->\s*(.+?)\s*:", header.strip())
    if match is None:
        return None
    params = _split_top(match.group(1))
    if not params or not params[0].startswith("self"):
        return None
    inputs = []
    for param in params[1:]:
        name, colon, annotation = param.partition(":")
        annotation = annotation.split("=", 1)[0].strip()
        if not colon or not name.strip().isidentifier() or not _SIMPLE_TYPE.fullmatch(annotation):
            return None
        inputs.append(_port(name.strip(), annotation))
    result = match.group(2).strip()
    if not _SIMPLE_TYPE.fullmatch(result):
        return None
    return tuple(inputs), (_port("output", result),)


def _port(name: str, annotation: str) -> Port:
    return Port(name, type=annotation)


def _code_files(archive: zipfile.ZipFile, prefix: str, path: str, notes: list[str]) -> dict[str, ClassInfo]:
    classes: dict[str, ClassInfo] = {}
    total = 0
    root = f"{prefix}code/"
    for info in archive.infolist():
        name = info.filename
        if not (name.startswith(root) and name.endswith(".py")):
            continue
        total += info.file_size
        if info.file_size > MAX_CODE_FILE or total > MAX_CODE_TOTAL:
            notes.append("code/ is too large to read: parameters and buffers are told apart from other attributes "
                         "by type only")  # fmt: skip
            return {}
        try:
            text = read_member(archive, info, path).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptCheckpointError(path, f"zip entry {name!r} is not UTF-8 text") from exc
        module = name[len(root) : -len(".py")].replace("/", ".")
        classes.update(parse_code(module, text))
    return classes


# -- the module tree -> state dict --------------------------------------------------------------------


def _is_module(record: Any, classes: dict[str, ClassInfo]) -> bool:
    if not isinstance(record, ScriptRecord):
        return False
    info = classes.get(record.qualname)
    if info is not None:
        return info.base == "Module"
    return isinstance(_attrs(record).get("training"), bool)


def _attrs(record: ScriptRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = vars(record).get("attributes", {})
    return attributes


def _holds_tensors(value: Any, depth: int = 0) -> bool:
    """A tensor anywhere in a record's state (nested containers: bounded, data.pkl is a checked tree)."""
    if isinstance(value, torch.Tensor):
        return True
    if depth > 8:
        return False
    if isinstance(value, dict):
        return any(_holds_tensors(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v, depth + 1) for v in value)
    return False


def state_items(root: Any, classes: dict[str, ClassInfo], path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter and buffer, in the order ``state_dict()`` gives them."""
    if not _is_module(root, classes):
        raise CorruptCheckpointError(path, f"data.pkl holds {describe(root)}, not a TorchScript module")
    # Pre-order, as nn.Module.state_dict: a module's own tensors, then each child's (a child shared under
    # two names is listed under both, as there). data.pkl was checked to be a tree of bounded size.
    stack: list[tuple[str, ScriptRecord]] = [("", root)]
    while stack:
        prefix, record = stack.pop()
        attributes = _attrs(record)
        info = classes.get(record.qualname)
        parameters = info.parameters if info is not None else None
        buffers = info.buffers if info is not None else None
        tensors = {k: v for k, v in attributes.items() if isinstance(v, torch.Tensor)}
        if parameters is None or buffers is None:
            ordered = list(tensors)
        else:
            ordered = [k for k in tensors if k in parameters] + [k for k in tensors if k in buffers]
        for key in ordered:
            tensor = tensors[key]
            yield prefix + key, tensor.detach() if tensor.requires_grad else tensor
        for key, value in attributes.items():
            # A torchbind object (a C++ class: quantized packed parameters) keeps tensors in its own state,
            # which torch.jit.load(f).state_dict() leaves out too: say so rather than return a silent subset.
            if (
                isinstance(value, ScriptRecord)
                and value.qualname.startswith(_TORCHBIND)
                and _holds_tensors(vars(value))
            ):
                raise UnsupportedTensorError(
                    prefix + key,
                    f"in {path}: a {value.qualname.removeprefix('__torch__.')} object holds tensors in its own state "
                    "(packed weights of a quantized module), which torchkeep does not unpack from TorchScript; "
                    "save the eager model with torchkeep.save instead (torch.ao packed weights are supported there)",
                )
        children = [(prefix + k + ".", v) for k, v in attributes.items() if _is_module(v, classes)]
        stack.extend(reversed(children))


# -- reading ------------------------------------------------------------------------------------------


@dataclass
class _Archive:
    prefix: str
    classes: dict[str, ClassInfo]
    version: str | None
    notes: list[str]
    extra: dict[tuple[str, str], Any]
    data: bytes
    infos: dict[str, zipfile.ZipInfo]


def _open(archive: zipfile.ZipFile, path: str) -> _Archive:
    infos = {info.filename: info for info in archive.infolist()}
    pickles = [name for name in infos if name.endswith("data.pkl") and name.count("/") <= 1]
    if len(pickles) != 1:
        raise CorruptCheckpointError(path, f"TorchScript archive: expected one data.pkl, found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    data = read_member(archive, infos[pickles[0]], path)
    notes: list[str] = []
    classes = _code_files(archive, prefix, path, notes)
    version_info = infos.get(prefix + "version")
    version = None
    if version_info is not None:
        version = read_member(archive, version_info, path, limit=64).decode("ascii", "replace").strip()
    return _Archive(prefix, classes, version, notes, _extra_globals(data, path), data, infos)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a TorchScript archive, by its attribute path, read without running code.

    Raises:
        CorruptCheckpointError: a damaged archive or pickle, naming the file and the problem.
        UnsafeCheckpointError: data.pkl names a global outside the allowlist (other than its own classes).
    """
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as raw:
        with open_zip(raw, path) as archive:
            found = _open(archive, path)
        raw.seek(0)
        root = read_zip_stream(raw, path, size, extra=found.extra)
    return dict(state_items(root, found.classes, path))


def describe_file(path: str) -> Description:
    """Kind, tensors (names, dtypes, shapes) and forward's signature, without reading the tensors' data."""
    with open(path, "rb", buffering=0) as raw, open_zip(raw, path) as archive:
        found = _open(archive, path)

        def storage(kind: StorageType, key: str, location: str, numel: int) -> LoadedStorage:
            # Sized from the member that would hold it, never read: the pages are not touched.
            info = found.infos.get(f"{found.prefix}data/{key}")
            nbytes = numel * itemsize(kind.dtype)
            if info is None or info.file_size < nbytes:
                raise CorruptCheckpointError(path, f"storage {key!r} is missing from the archive or too short")
            return LoadedStorage(torch.empty(nbytes, dtype=torch.uint8).untyped_storage(), kind.dtype, location)

        with rebuild.deferred_checks(path, run_on_exit=False):
            root = RestrictedUnpickler(found.data, path=path, load_storage=storage, extra=found.extra).load()
    tensors = [TensorMeta(name, t.dtype, tuple(t.shape)) for name, t in state_items(root, found.classes, path)]
    inputs = outputs = None
    notes = list(found.notes)
    info = found.classes.get(root.qualname)
    if info is not None and info.forward is not None:
        ports = parse_forward(info.forward)
        if ports is None:
            notes.append("forward's signature is not a simple one: inputs and outputs are not listed")
        else:
            inputs, outputs = ports
    else:
        notes.append(f"no code for {root.qualname} in code/: inputs and outputs are unknown")
    notes.append("TorchScript keeps type names, not dtypes or shapes, for inputs and outputs")
    version = f", TorchScript file version {found.version}" if found.version else ""
    summary = f"{KIND_TITLES['torchscript']}: module {root.qualname.removeprefix('__torch__.')}{version}"
    return Description("torchscript", summary, tensors, inputs, outputs, tuple(notes))
