"""Files torchkeep did not write: torch.save archives (.pt/.pth/.bin/.ckpt, zip or legacy), NumPy, and
deployment formats (TorchScript, ExportedProgram .pt2, ONNX: read by :mod:`torchkeep.format.deploy`).

Formats are told apart by content, not by name (:func:`detect_kind`, the one detector). Nothing here
runs code from a file unless the caller passes ``trusted=True``.
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from torchkeep._warn import warn
from torchkeep.errors import CorruptCheckpointError, TorchkeepError, UnsafeCheckpointError
from torchkeep.format import deploy
from torchkeep.format.names import refuse_special
from torchkeep.format.pickle.torchfile import MAX_DEFLATE_RATIO, PARSE_ERRORS, read_torch_file
from torchkeep.state import torch_ao
from torchkeep.weights.contents import array_tensor, classify, holds_numbers, weights_at, weights_candidates

Kind = Literal["safetensors", "torch", "npy", "npz", "torchscript", "exported_program", "onnx", "unknown"]

# First bytes of a pickle: PROTO (protocols 2-5), or what protocols 0-1 begin with (MARK, containers,
# GLOBAL, numbers and strings; torch.save's legacy format begins with the LONG of its magic number).
_PICKLE_STARTS = frozenset(bytes([c]) for c in b"\x80(}])cLIJKMFGNSVXTU")


def detect_kind(path: str) -> Kind:
    """What a file is, from its content: the one place torchkeep decides which reader reads a file."""
    refuse_special(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except PARSE_ERRORS:
            return "torch"  # damaged: the torch reader reports it
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return deploy.zip_kind(names) or "torch"
    # Safetensors first: its length prefix may begin with any byte, a pickle opcode included.
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"
    if head[:1] and head[:1] in _PICKLE_STARTS:
        return "torch"
    if deploy.looks_like_onnx(head):
        return "onnx"
    return "unknown"


def detect_once(path: str, seen: dict[str, Kind]) -> Kind:
    """:func:`detect_kind`, asked once per file by a caller that meets a file more than once (a file, then
    the files it resolves to); ``seen`` holds the answers so far."""
    key = os.path.normpath(path)
    if key not in seen:
        seen[key] = detect_kind(path)
    return seen[key]


def read_raw(path: str, *, trusted: bool = False, kind: Kind | None = None) -> Any:
    """The whole object a non-safetensors file holds: tensors and plain values.

    ``kind``: what :func:`detect_kind` said of ``path``, when the caller asked it already (not asked again).
    """
    try:
        return _read_raw(path, trusted=trusted, kind=kind or detect_kind(path))
    except TorchkeepError:
        raise
    except PARSE_ERRORS as exc:
        if trusted:
            raise
        raise CorruptCheckpointError(path, f"unreadable: {type(exc).__name__}: {exc}") from exc


def _read_raw(path: str, *, trusted: bool, kind: Kind) -> Any:
    if kind in ("npy", "npz"):
        return _numpy(path, kind)
    if kind in deploy.DEPLOY_KINDS:
        return _deployed(path, kind, trusted=trusted)
    if trusted:
        warn(f"{path}: loading with full pickle because trusted=True; this runs any code the file holds")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # trusted-path
        except (AttributeError, ImportError) as exc:  # a class or function the pickle names is not importable
            raise CorruptCheckpointError(
                path,
                f"cannot be unpickled in this program ({type(exc).__name__}: {exc}): the pickle needs that code "
                "importable under the same module and name; import or define it before loading (from the command "
                "line: put the folder of its module on PYTHONPATH)",
            ) from exc
    return read_torch_file(path)


def _deployed(path: str, kind: deploy.DeployKind, *, trusted: bool) -> dict[str, torch.Tensor]:
    """A deployment file's weights by name. ``trusted`` runs the format's own loader, with its code."""
    if not trusted or kind == "onnx":
        return deploy.read_weights(path, kind)
    warn(
        f"{path}: loading with {'torch.jit.load' if kind == 'torchscript' else 'torch.export.load'} because "
        "trusted=True; this runs the code the file holds"
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit.load's own deprecation
        if kind == "torchscript":
            state = torch.jit.load(path, map_location="cpu").state_dict()  # type: ignore[no-untyped-call]  # trusted-path
        else:
            state = torch.export.load(path).state_dict  # trusted-path
    return {k: v.detach() for k, v in state.items()}


def _numpy(path: str, kind: Kind) -> Any:
    """An .npy or .npz file: each array's header is checked against the bytes that back it before it is read."""
    numpy_structure(path, kind)  # the headers alone, checked
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise UnsafeCheckpointError(path, "holds NumPy object arrays, which are pickles; refused") from exc
        raise CorruptCheckpointError(path, f"unreadable NumPy file: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpointError(path, f"unreadable NumPy file: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        try:
            return {name: loaded[name] for name in loaded.files}
        except ValueError as exc:
            raise UnsafeCheckpointError(path, "holds NumPy object arrays, which are pickles; refused") from exc


def numpy_structure(path: str, kind: Kind | None = None) -> Any:
    """An .npy or .npz file's arrays as tensors on the meta device, from their headers alone.

    ``kind``: ``"npy"`` or ``"npz"`` when the caller has detected it already (else it is detected here).
    """
    out = {}
    try:
        if (kind or detect_kind(path)) == "npy":
            with open(path, "rb") as f:
                return _check_npy_header(f, os.path.getsize(path), path, "the array")
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                    raise CorruptCheckpointError(path, f"{info.filename!r} declares an impossible size")
                with archive.open(info) as member:
                    out[info.filename.removesuffix(".npy")] = _check_npy_header(
                        member, info.file_size, path, repr(info.filename)
                    )
    except (*PARSE_ERRORS, SyntaxError, tokenize.TokenError) as exc:  # NumPy parses the header as Python
        raise CorruptCheckpointError(path, f"unreadable NumPy file: {type(exc).__name__}: {exc}") from exc
    return out


def _check_npy_header(f: Any, size: int, path: str, what: str) -> torch.Tensor | None:
    """NumPy allocates an array from its header before reading it: the header must fit the bytes behind it.
    Returns the array's shape and dtype as a tensor on the meta device (None when not an array, or of a
    dtype torch lacks)."""
    head = f.read(8)
    if len(head) != 8 or not head.startswith(b"\x93NUMPY"):
        return None  # not an array: np.load reports it
    read_header = np.lib.format.read_array_header_1_0 if head[6] == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    if dtype.hasobject:
        raise UnsafeCheckpointError(path, f"{what} is a NumPy object array, which is a pickle; refused")
    if math.prod(shape) * dtype.itemsize > size:
        raise CorruptCheckpointError(path, f"{what} claims {math.prod(shape) * dtype.itemsize} bytes of data, "
                                     f"more than the {size} bytes that hold it")  # fmt: skip
    try:
        dtype_as_torch = torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except TypeError:
        return None  # strings, dates...: no tensor can hold them
    return torch.empty(shape, dtype=dtype_as_torch, device="meta")


def _tensors_only(mapping: Mapping[Any, Any], path: str) -> dict[str, torch.Tensor]:
    if torch_ao.has_entries(mapping):  # torch.ao quantized state: every entry as plain tensors, or a typed error
        mapping = torch_ao.flatten(mapping, torch_ao.reading_error(path)).tensors
    out: dict[str, torch.Tensor] = {}
    for key, value in mapping.items():
        if isinstance(value, np.ndarray) and holds_numbers(value):  # strings, dates...: left out, as classified
            value = array_tensor(value)
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            out[key] = value.detach() if value.requires_grad else value
    return out


def extract_state_dict(obj: Any, path: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """The model state dict inside what a file holds, found by the one classifier (weights/contents.py):
    itself, under a usual key (nested one level), or at ``key`` (``outer/inner`` one level down)."""
    if isinstance(obj, np.ndarray):
        raise CorruptCheckpointError(path, "holds a single NumPy array, not named weights; use load_raw")
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (trusted=True only)
        return dict(obj.state_dict())
    contents = classify(obj)
    if key is not None:
        chosen = weights_at(obj, contents, key)
        if chosen is None:
            raise CorruptCheckpointError(path, f"holds no weights at key={key!r}; it holds {describe_top(obj)}")
        return _tensors_only(chosen, path)
    weights = weights_at(obj, contents)
    if weights is None:
        raise CorruptCheckpointError(
            path,
            f"found no weights in it (the file itself is intact): it holds {describe_top(obj)}; "
            f"{_which_call(obj, contents.layout)}",
        )
    candidates = weights_candidates(contents.parts)
    if len(candidates) > 1:
        warn(f"{path}: holds weights under {candidates}; loaded {contents.weights_key!r} (pass key= to pick another)")
    return _tensors_only(weights, path)


def _short_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"array {value.dtype}{list(value.shape)}"
    if isinstance(value, Mapping):
        tensors = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict of {len(value)}" + (f" ({tensors} tensors)" if tensors else "")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def describe_top(obj: Any, limit: int = 12) -> str:
    """``a dict: 'epoch' (int), 'model_state' (dict of 4 (4 tensors))...``: what a file holds, at its top level."""
    if not isinstance(obj, Mapping):
        return f"a {_short_type(obj)}"
    items = [f"{k!r} ({_short_type(v)})" for k, v in list(obj.items())[:limit]]
    more = f", and {len(obj) - limit} more" if len(obj) > limit else ""
    return f"a dict of {len(obj)}: " + ", ".join(items) + more


def _which_call(obj: Any, layout: str) -> str:
    if layout == "optimizer state":
        return "it is an optimizer's state: load_checkpoint(path, optimizer=...) restores it, load_raw returns it"
    if layout == "scheduler state":
        return "it is a scheduler's state: load_checkpoint(path, scheduler=...) restores it, load_raw returns it"
    if layout == "scaler state":
        return "it is a GradScaler's state: load_checkpoint(path, scaler=...) restores it, load_raw returns it"
    if layout == "RNG state":
        return "it is a random generator state, not weights: load_raw returns it"
    if isinstance(obj, Mapping) and any(isinstance(v, Mapping) for v in obj.values()):
        return (
            "load_checkpoint(path, model=..., optimizer=...) restores a training checkpoint's objects, load_raw "
            "returns the whole structure, torchkeep inspect shows it; key= names where the weights are"
        )
    return "torchkeep.load_raw returns the whole object, torchkeep inspect shows it"
