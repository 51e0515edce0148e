"""torchkeep.load: weights from a file or a sharded folder, validated and checksum-verified."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch

from torchkeep import _config
from torchkeep._gc import gc_paused
from torchkeep.errors import CheckpointNotFoundError, CorruptCheckpointError
from torchkeep.format.deploy import DEPLOY_KINDS
from torchkeep.format.io import map_tensors, read_tensors, verify_mapped, verify_mapped_files
from torchkeep.format.layout import Header, read_header
from torchkeep.format.names import refuse_special
from torchkeep.format.pickle.dcp import is_dcp_dir, read_dcp
from torchkeep.state.devices import MapLocation, placer
from torchkeep.storage.remote import is_url
from torchkeep.weights.contents import extra_states_at
from torchkeep.weights.files import WeightFiles, resolve
from torchkeep.weights.legacy import Kind, detect_kind, detect_once, extract_state_dict, read_raw

CHECKPOINT_MANIFEST = "manifest.json"  # a torchkeep training checkpoint's folder has one
_MAGIC_HINTS = (
    (b"PK\x03\x04", "a zip archive (torch.save writes these)"),
    (b"\x80", "a pickle (legacy torch.save or pickle.dump)"),
    (b"\x93NUMPY", "a NumPy .npy file"),
)


def _describe_foreign(f: Any) -> str | None:
    f.seek(0)
    head = f.read(8)
    for magic, what in _MAGIC_HINTS:
        if head.startswith(magic):
            return what
    return None


def open_header(f: Any, path: str) -> Header:
    """Read a file's header, saying plainly when the file is another format altogether."""
    size = os.fstat(f.fileno()).st_size if hasattr(f, "fileno") else f.seek(0, os.SEEK_END)
    try:
        return read_header(f, path, size)
    except CorruptCheckpointError as exc:
        foreign = _describe_foreign(f)
        f.seek(0)
        prefix = f.read(9)
        declared = struct.unpack("<Q", prefix[:8])[0] if len(prefix) == 9 else 0
        if foreign is None or (prefix[8:9] == b"{" and 0 < declared <= size - 8):
            raise  # a safetensors header that fits the file: its own problem is the one to tell
        raise CorruptCheckpointError(
            path, f"not a valid safetensors file, and not readable as {foreign} either"
        ) from exc


def open_weights_file(path: str) -> BinaryIO:
    """An unbuffered reader, with a missing file or a folder reported as CheckpointNotFoundError (a FIFO or
    a device as CorruptCheckpointError: reading one could block forever)."""
    refuse_special(path)
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(path) from exc
    except IsADirectoryError as exc:
        raise CheckpointNotFoundError(path, "is a directory, not a weights file") from exc


def read_file(path: str, *, mmap: bool, verify: bool) -> tuple[Header, dict[str, torch.Tensor]]:
    """One file's header and its stored tensors (aliases not yet expanded).

    Mapped tensors are verified (when ``verify``) by hashing the mapped pages: nothing is copied.
    """
    header, tensors = _read_unverified(path, mmap=mmap, verify=verify)
    if mmap and verify:
        verify_mapped(header, tensors, path)
    return header, tensors


def _read_unverified(path: str, *, mmap: bool, verify: bool) -> tuple[Header, dict[str, torch.Tensor]]:
    """Mapped tensors not yet verified, or (``mmap=False``) tensors read into memory and verified as read."""
    with open_weights_file(path) as f:
        header = open_header(f, path)
        _advise_sequential(f)
        if not mmap:
            return header, read_tensors(f, header, path, verify=verify)
        return header, map_tensors(path, header)


def _advise_sequential(f: Any) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        advise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)


def read_weights(
    files: WeightFiles,
    *,
    mmap: bool,
    verify: bool,
    trusted: bool = False,
    key: str | None = None,
    seen: dict[str, Kind] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of a resolved set of files, checked against the index if there is one (``key``: where a
    pickled checkpoint dict keeps the weights, as :func:`load` takes it; ``seen``: the files' kinds, when the
    caller detected them already, as :func:`detect_once` keeps them; ``extra_state``: filled with the modules'
    extra states a pickled file holds beside its weights, which are not tensors)."""
    paths = [files.path(name) for name in files.files]
    seen = {} if seen is None else seen
    kinds = [detect_once(path, seen) for path in paths]
    ours = [path for path, kind in zip(paths, kinds, strict=True) if kind in ("safetensors", "unknown")]
    # The safetensors files (a sharded folder's shards) are read by a few threads; mapped ones are then
    # verified together, by one pool of hashing threads, before anything is returned.
    with ThreadPoolExecutor(max_workers=max(1, min(_config.IO_THREADS, len(ours)))) as pool:
        read = dict(zip(ours, pool.map(lambda p: _read_unverified(p, mmap=mmap, verify=verify), ours), strict=True))
    if mmap and verify:
        verify_mapped_files([(header, tensors, path) for path, (header, tensors) in read.items()])
    out: dict[str, torch.Tensor] = {}
    for name, path, kind in zip(files.files, paths, kinds, strict=True):
        if path in read:
            header, tensors = read[path]
            aliases = dict(header.aliases)
        else:
            raw = read_raw(path, trusted=trusted, kind=kind)
            tensors = raw if kind in DEPLOY_KINDS else extract_state_dict(raw, path, key)
            if extra_state is not None and kind not in DEPLOY_KINDS:
                extra_state.update(extra_states_at(raw, key))
            aliases = {}
        add_file(out, tensors, aliases, files.expected, name, path)
    return out


def check_against_index(held: Iterable[str], expected: Mapping[str, str] | None, name: str, path: str) -> None:
    """The tensors a shard holds against those its index lists for it (``expected``: the weight map)."""
    if expected is None:
        return
    listed = {k for k, v in expected.items() if v == name}
    stray = set(held) - listed
    if stray:
        raise CorruptCheckpointError(path, f"holds tensors its index does not list: {sorted(stray)[:5]}")
    absent = listed - set(held)
    if absent:
        raise CorruptCheckpointError(path, f"lacks tensors its index lists: {sorted(absent)[:5]}")


def add_file(
    out: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    expected: dict[str, str] | None,
    name: str,
    path: str,
) -> None:
    """Merge one file's tensors into ``out``, checked against the index's weight map if there is one."""
    check_against_index(tensors, expected, name, path)
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    for key, tensor in tensors.items():
        if key in out:
            raise CorruptCheckpointError(path, "tensor also stored in another shard", key=key)
        out[key] = tensor


@gc_paused
def load(
    path: str | os.PathLike[str],
    *,
    map_location: MapLocation = "cpu",
    mmap: bool | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    trusted: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load weights from any file users have, without running any code from it.

    Safetensors (torchkeep's or anyone's, single or sharded), torch.distributed.checkpoint
    directories (read in one process, chunks reassembled), torch.save archives (``.pt``,
    ``.pth``, ``.bin``, ``.ckpt``; zip or the legacy pre-1.6 format), Hugging Face
    ``pytorch_model.bin`` (sharded too), Lightning and dict checkpoints (their model state dict
    is returned), NumPy ``.npz``, and deployment files: TorchScript archives (``torch.jit.save``)
    and ExportedProgram archives (``torch.export.save``, ``.pt2``) give their parameters and
    buffers by name, ONNX models their initializers (needs ``pip install 'torchkeep[export]'``);
    none of their code is run. The format is found from the content, not the name.

    Args:
        path: a ``.safetensors`` file, a folder, or a ``*.safetensors.index.json`` file.
        map_location: as ``torch.load`` accepts (str, device, dict, callable), or ``"auto"``
            for the current accelerator if any.
        mmap: where the tensors' memory comes from. ``None`` (default): tensors of a safetensors
            file loaded to the CPU without a cast are backed by a private, copy-on-write map of the
            file (writes never reach it), verified by hashing the mapped pages, so no second copy
            is made; a cast or a device move makes a private copy. ``True``: mapped and lazy, nothing
            read until used, checksums not checked (``torchkeep verify`` does). ``False``: a private
            copy in fresh memory, verified as it is read. Mapped tensors read the file for as long
            as they live: a file replaced whole (torchkeep's saves, ``mv``) is safe; one rewritten in
            place (``cp``, ``shutil.copyfile``) changes their values, and one truncated in place ends
            the process (SIGBUS). Pass ``mmap=False`` when another program may rewrite the file.
        dtype: cast floating-point tensors to this dtype; integer and bool tensors keep theirs.
        verify: check each tensor against the checksum torchkeep recorded (files from other
            writers have none and are loaded unchecked; zip archives are CRC-checked).
        trusted: for pickle-based files only: allow full unpickling, which runs any code the file
            holds. Only for files you vouch for; a warning says so.
        key: for a checkpoint dict (torch.save, Lightning, DCP), where its weights are: a top-level key, or
            ``outer/inner`` one level down (``key="state_dict_ema"``). Without it the weights are found
            by the rules in FORMAT.md ("What a pickled file holds"), and a warning names the one taken
            when there are several.
        storage_options: for a URL (``s3://...``, ``gs://...``, ``memory://...``) of safetensors weights
            (a file, an index or a folder): passed to fsspec. Read into memory, verified.

    Returns:
        A dict of name -> tensor, in the file's order; tensors saved as shared come back shared.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: a damaged or malformed file, naming the file and the problem.
        UnsafeCheckpointError: a pickle that would run code (every refused global is named).
        ImportError: an ONNX file without the ``onnx`` package (``pip install 'torchkeep[export]'``).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if is_training_checkpoint(path, storage_options):  # its model's weights
        from torchkeep.checkpoint.io import checkpoint_weights

        tensors = checkpoint_weights(path, verify=verify, storage_options=storage_options)
    elif is_url(path):
        from torchkeep.weights.remote import load_url

        tensors = load_url(str(path), storage_options=storage_options, verify=verify)
    elif is_dcp_dir(path):
        tensors = extract_state_dict(read_dcp(path), os.fspath(path), key)
    else:
        mapped = mmap if mmap is not None else dtype is None and on_cpu(map_location)
        tensors = read_weights(resolve(path), mmap=mapped, verify=verify and mmap is not True, trusted=trusted, key=key)
    if dtype is None and isinstance(map_location, str) and map_location == "cpu":
        return tensors  # already where and what they should be
    return placed(tensors, map_location, dtype)


def placed(
    tensors: Mapping[str, torch.Tensor], map_location: MapLocation, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``tensors`` cast (floating point only) and moved where ``map_location`` says; shared ones stay shared."""
    place = placer(map_location)
    converted: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if id(tensor) not in converted:
            moved = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            converted[id(tensor)] = place(moved)
        out[key] = converted[id(tensor)]
    return out


def is_training_checkpoint(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> bool:
    """A torchkeep training checkpoint: a folder (or a URL) holding ``manifest.json``."""
    if not is_url(path):
        return (Path(path) / CHECKPOINT_MANIFEST).is_file()
    if str(path).endswith((".safetensors", ".json")):
        return False
    from torchkeep.storage.remote import RemoteStorage

    return RemoteStorage(str(path), storage_options).exists(CHECKPOINT_MANIFEST)


def on_cpu(map_location: MapLocation) -> bool:
    return map_location is None or (isinstance(map_location, (str, torch.device)) and str(map_location) == "cpu")


@gc_paused
def load_raw(path: str | os.PathLike[str], *, trusted: bool = False, map_location: MapLocation = "cpu") -> Any:
    """The whole structure a file holds (nested dicts, lists, tensors, plain values), safely.

    For a torchkeep checkpoint directory, one dict of its objects (``model``, ``optimizer``, ...,
    sharded tensors reassembled) and its plain values, as the tutorials' checkpoint dict holds them;
    for a DCP folder, its state with DCP's own nesting; for safetensors, the tensors; for
    pickle-based files, the unpickled object built from torchkeep's allowlist (``trusted=True``
    allows anything, running the file's code).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(p)
    if is_training_checkpoint(p):
        from torchkeep.checkpoint.io import read_checkpoint

        loaded = read_checkpoint(p, map_location=map_location)
        objects = {name: loaded.decode(node) for name, node in loaded.objects.items()}
        return {**objects, **loaded.state()}
    if is_dcp_dir(p):
        return place_all(read_dcp(p), placer(map_location))
    kind = None if p.is_dir() else detect_kind(str(p))
    if kind is None or kind in ("safetensors", "unknown"):
        return load(p, map_location=map_location)
    obj = read_raw(str(p), trusted=trusted, kind=kind)
    place = placer(map_location)
    return place_all(obj, place)


def place_all(obj: Any, place: Any) -> Any:
    """``obj`` with every tensor in it (nested in dicts, lists and tuples) put through ``place``; dicts in place."""
    if isinstance(obj, torch.Tensor):
        return place(obj)
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = place_all(value, place)
        return obj
    if isinstance(obj, list):
        return [place_all(v, place) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(place_all(v, place) for v in obj)
    return obj
